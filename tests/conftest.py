from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
FIXTURES = ROOT / "tests" / "fixtures"

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def model_path() -> Path:
    if not MODEL.exists():
        pytest.skip(f"{MODEL.relative_to(ROOT)} is absent: run scripts/get-model.sh")
    return MODEL


def greedy(model, ids: list[int], n: int, ignore_eos: bool = False) -> list[int]:
    """Up to `n` greedy tokens after `ids`, through the engine (one task on one slot): it stops
    after an end-of-generation token unless `ignore_eos` bans them, as llama.cpp's does."""
    from llamarpc.frontend.engine import Engine, EngineConfig, FinalEvent, TaskParams
    from llamarpc.frontend.sampling import SamplingParams

    engine = Engine(model, EngineConfig(warmup=False))
    engine.start()
    try:
        params = TaskParams(sampling=SamplingParams(temperature=0.0), n_predict=n, ignore_eos=ignore_eos,
                            cache_prompt=False)
        last = list(engine.stream(ids, params))[-1]
    finally:
        engine.stop()
    if not isinstance(last, FinalEvent):
        raise RuntimeError(f"generation failed: {last}")
    return last.tokens


@pytest.fixture(scope="session")
def smollm(model_path: Path):
    from llamarpc.client.local import LocalBackend
    from llamarpc.frontend.engine import load_model

    model = load_model(str(model_path), [LocalBackend()], n_ctx=1024)
    yield model
    model.close()
