"""The sampler chain, sampler by sampler, against llama.cpp's rules (src/llama-sampling.cpp)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from llamarpc.frontend.sampling import (
    DEFAULT_SAMPLERS,
    Cand,
    Sampler,
    SamplingParams,
    samplers_from_chars,
    samplers_from_names,
    token_probs,
)
from llamarpc.frontend.sampling.dry import DryState, apply_dry
from llamarpc.frontend.sampling.steps import min_p, temp_ext, top_n_sigma, top_p, typical, xtc

V = 50
OFF = dict(top_k=0, top_p=1.0, min_p=0.0)   # every truncation off


def logits(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=V).astype(np.float32) * 3


def cand(lg: np.ndarray) -> Cand:
    return Cand(np.arange(lg.size), lg.astype(np.float32).copy())


def draws(params: SamplingParams, lg: np.ndarray, n: int = 300) -> set[int]:
    s = Sampler(params, V)
    return {s.sample(lg) for _ in range(n)}


def test_positional_params_of_the_one_shot_cli():
    p = SamplingParams(0.5, 7, 0.9, 0.1, 42)
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.seed) == (0.5, 7, 0.9, 0.1, 42)
    assert p.samplers == DEFAULT_SAMPLERS and p.repeat_penalty == 1.0 and p.dry_multiplier == 0.0


def test_temperature_zero_is_greedy():
    lg = logits()
    assert draws(SamplingParams(temperature=0.0, seed=1), lg, 20) == {int(np.argmax(lg))}


def test_same_seed_same_tokens_other_seed_other_tokens():
    lg = logits()
    a = Sampler(SamplingParams(temperature=1.5, seed=7, **OFF), V)
    b = Sampler(SamplingParams(temperature=1.5, seed=7, **OFF), V)
    c = Sampler(SamplingParams(temperature=1.5, seed=8, **OFF), V)
    ta = [a.sample(lg) for _ in range(40)]
    assert ta == [b.sample(lg) for _ in range(40)]
    assert ta != [c.sample(lg) for _ in range(40)]


def test_top_k_limits_the_draws():
    lg = logits()
    top3 = set(np.argsort(-lg)[:3].tolist())
    got = draws(SamplingParams(temperature=5.0, top_k=3, top_p=1.0, min_p=0.0, seed=3), lg)
    assert got == top3


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    lg = logits(1)
    c = cand(lg)
    top_p(c, 0.7, 0)
    p = np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
    order = np.argsort(-p)
    n = int(np.searchsorted(np.cumsum(p[order]), 0.7) + 1)
    assert c.ids.tolist() == order[:n].tolist()


def test_min_p_threshold_relative_to_the_top_token():
    lg = logits(2)
    c = cand(lg)
    min_p(c, 0.2, 0)
    p = np.exp(lg - lg.max())
    assert set(c.ids.tolist()) == set(np.flatnonzero(p >= 0.2 - 1e-6).tolist())


def test_typical_keeps_tokens_closest_to_the_entropy():
    lg = np.array([5.0, 4.9, 1.0, 0.0, -3.0], np.float32)
    c = cand(lg)
    typical(c, 0.5, 0)
    p = np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
    h = -(p * np.log(p)).sum()
    order = np.argsort(np.abs(-np.log(p) - h), kind="stable")
    n = int(np.flatnonzero(np.cumsum(p[order]) > 0.5)[0]) + 1
    assert c.ids.tolist() == order[:n].tolist()


def test_xtc_removes_all_but_the_least_likely_top_choice():
    lg = np.log(np.array([0.4, 0.3, 0.2, 0.06, 0.04], np.float32))
    c = cand(lg)
    xtc(c, 1.0, 0.1, 1, np.random.default_rng(0))
    assert c.ids.tolist() == [2, 3, 4]        # 0.4 and 0.3 go, 0.2 (the last above 0.1) stays
    c = cand(lg)
    xtc(c, 1.0, 0.6, 1, np.random.default_rng(0))   # threshold > 0.5: disabled
    assert len(c) == 5


def test_top_n_sigma_masks_below_max_minus_n_std():
    lg = np.array([10.0, 9.5, 0.0, -1.0, -2.0], np.float32)
    c = cand(lg)
    top_n_sigma(c, 1.0)
    kept = c.ids[np.isfinite(c.logits)].tolist()
    std = float(np.std(lg))
    assert kept == [i for i in np.argsort(-lg) if lg[i] >= lg.max() - std]


def test_dynamic_temperature_lies_within_the_range():
    lg = logits(4)
    c = cand(lg)
    temp_ext(c, 1.0, 0.5, 1.0)
    ratio = (lg.max() - lg.min()) / (c.logits.max() - c.logits.min())
    assert 0.5 - 1e-4 <= ratio <= 1.5 + 1e-4


def test_repeat_presence_frequency_penalties():
    lg = np.zeros(V, np.float32)
    lg[3], lg[4], lg[5] = 2.0, 1.9, -1.0
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.1), V)
    s.accept_many([3])
    assert s.sample(lg) == 4                       # 2.0 / 1.1 < 1.9
    s = Sampler(SamplingParams(temperature=0.0, presence_penalty=0.5, repeat_last_n=2), V)
    s.accept_many([3, 7, 8])                       # 3 fell out of the last-2 window
    assert s.sample(lg) == 3
    s = Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.06), V)
    s.accept_many([3, 3])                          # 2.0 - 2 * 0.06 < 1.9
    assert s.sample(lg) == 4
    c = cand(lg)
    s = Sampler(SamplingParams(repeat_penalty=2.0), V)
    s.accept(5)
    s._penalties(c)
    assert c.logits[5] == pytest.approx(-2.0)      # negative logits are multiplied


def test_logit_bias_false_bans_a_token():
    lg = logits()
    best = int(np.argmax(lg))
    s = Sampler(SamplingParams(temperature=0.0, logit_bias=((best, -math.inf),)), V)
    assert s.sample(lg) != best


def test_dry_penalizes_the_token_that_extends_a_repeat():
    st = DryState(multiplier=1.0, base=2.0, allowed_length=2, penalty_last_n=64, total_context=4096, breakers={})
    for t in [1, 2, 3, 4, 9, 1, 2, 3]:             # "1 2 3" seen before, followed by 4
        st.accept(t)
    c = cand(np.zeros(V, np.float32))
    apply_dry(st, c)
    assert c.logits[4] == pytest.approx(-1.0 * 2.0 ** (3 - 2))
    assert np.count_nonzero(c.logits) == 1
    st.breakers = {2: [()]}                        # a breaker inside the repeat cuts it short
    c = cand(np.zeros(V, np.float32))
    apply_dry(st, c)
    assert np.count_nonzero(c.logits) == 0


def test_dry_breakers_from_the_vocabulary(tmp_path):
    from llamarpc.frontend.model.tokenizer import Tokenizer
    from llamarpc.frontend.sampling.dry import dry_breakers
    from synth import write_model

    path = tmp_path / "m.gguf"
    write_model(path, n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_ff=64)
    tok = Tokenizer.from_gguf(str(path))
    br = dry_breakers(tok, ["\n", "or"])
    nl = tok.encode("\n", add_special=False)[0]
    assert () in br[nl]
    o = tok.encode("o", add_special=False)[0]
    r = tok.encode("r", add_special=False)[0]
    assert (r,) in br[o]                            # "o" starts "or": the tail is "r"
    assert () in br[tok.token_to_id("or")]


def test_mirostat_v2_is_seeded_and_adapts_mu():
    lg = logits(5)
    a = Sampler(SamplingParams(mirostat=2, mirostat_tau=3.0, seed=11), V)
    b = Sampler(SamplingParams(mirostat=2, mirostat_tau=3.0, seed=11), V)
    assert [a.sample(lg) for _ in range(30)] == [b.sample(lg) for _ in range(30)]
    assert a.mu != 6.0
    m1 = Sampler(SamplingParams(mirostat=1, mirostat_tau=0.1, seed=1), V)
    assert {m1.sample(lg) for _ in range(20)} == {int(np.argmax(lg))}   # a tiny target surprise: greedy


def test_sampler_order_names_chars_and_unknowns():
    assert samplers_from_names(["Top-K", "temp", "typical_p", "penalties"]) == ("top_k", "temperature", "typ_p",
                                                                              "penalties")
    assert samplers_from_chars("edskypmxt") == DEFAULT_SAMPLERS
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers_from_names(["top_k", "bogus"])
    with pytest.raises(ValueError):
        samplers_from_chars("kz")


def test_custom_order_matters():
    lg = logits(6)
    # temperature first then top_k=1: still greedy; without top_k a hot temperature spreads
    assert draws(SamplingParams(temperature=3.0, top_k=1, samplers=("temperature", "top_k"), seed=2), lg) == \
        {int(np.argmax(lg))}
    assert len(draws(SamplingParams(temperature=3.0, samplers=("temperature",), seed=2), lg)) > 5


def test_token_probs_and_post_sampling_candidates():
    lg = logits(7)
    ids, pr = token_probs(lg, 3)
    full = np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
    assert ids.tolist() == np.argsort(-full)[:3].tolist() and np.allclose(pr, np.sort(full)[::-1][:3])
    res = Sampler(SamplingParams(top_k=4, seed=1), V).sample_full(lg)
    assert res.ids.size <= 4 and res.token in res.ids.tolist() and res.probs.sum() == pytest.approx(1.0)
