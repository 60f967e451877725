"""One module per ``general.architecture``; each exposes args_from_metadata, tensor_names, rope_attrs and
build_graph."""
from __future__ import annotations

from types import ModuleType

from . import bert, gemma3, llama, nomic_bert, phi3, qwen2, qwen3

ARCHITECTURES: dict[str, ModuleType] = {"llama": llama, "qwen2": qwen2, "gemma3": gemma3, "qwen3": qwen3, "phi3": phi3,
                                   "bert": bert, "nomic-bert": nomic_bert}


def get_architecture(name: str) -> ModuleType:
    mod = ARCHITECTURES.get(name)
    if mod is None:
        raise ValueError(f"unknown model architecture {name!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    return mod
