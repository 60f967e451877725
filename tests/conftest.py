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


@pytest.fixture(scope="session")
def smollm(model_path: Path):
    from llamarpc.client.local import LocalBackend
    from llamarpc.frontend.model import load_model

    model = load_model(str(model_path), [LocalBackend()], n_ctx=1024)
    yield model
    model.close()
