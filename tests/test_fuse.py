"""The node's fused plan computes what the unfused plan computes, on the real model: prompt
logits, then token-by-token decode (both the batch and the single-row kernels)."""
from __future__ import annotations

import numpy as np
import pytest
from llamarpc.client.local import LocalBackend
from llamarpc.frontend.engine import LogitsProbe, load_model
from llamarpc.rpcserver.node import Node

PROMPT = "The lighthouse keeper climbed the stairs every evening to light the great lamp."


def _run(model_path, fuse: bool, mode: str) -> tuple[np.ndarray, np.ndarray, int]:
    node = Node(fuse=fuse, matmul_mode=mode)
    m = load_model(str(model_path), [LocalBackend(node=node)], n_ctx=256)
    try:
        ids = m.tokenizer.encode(PROMPT)
        g = LogitsProbe(m)
        prompt = g.eval(ids, all_logits=True)
        steps = np.stack([g.eval([t]) for t in ids[:6]])
        (plan,) = (p for graphs in node._graphs.values() for p in graphs.values())
        return prompt, steps, len(plan.ops) - len(plan.steps)
    finally:
        m.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_fused_plan_equals_unfused(model_path, mode):
    p0, s0, folded0 = _run(model_path, False, mode)
    p1, s1, folded1 = _run(model_path, True, mode)
    assert folded0 == 0
    # per layer: two norm+mul pairs become one step each, q/k/v and gate/up one step each
    assert folded1 >= 30 * 5
    if mode == "exact":
        assert np.abs(p0 - p1).max() <= 1e-4
        assert np.abs(s0 - s1).max() <= 1e-4
    else:
        # 8-bit activations: the fused norm's last-bit differences move some roundings of the
        # activations, which moves logits by up to what fast mode itself moves them (~0.8 on the
        # fixtures, scripts/fidelity_modes.py), never more
        assert np.abs(p0 - p1).max() <= 1.0 and np.abs(s0 - s1).max() <= 1.0
