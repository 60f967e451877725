"""A loaded model: the GGUF file, its architecture module and args, its tokenizer (all from
`model/`), and the pipeline that places its layers on backends: what the engine runs."""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

from llamarpc.client import Backend
from llamarpc.proto.types import GGMLType

from ..model.arch import get_architecture
from ..model.chat_builtin import BUILTIN_TEMPLATES
from ..model.chat_template import template_error
from ..model.gguf_file import GGUFFile, ModelLoadError
from ..model.lora import LoraAdapter, load_adapters
from ..model.tokenizer import Tokenizer
from .pipeline import Pipeline, Progress

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Model:
    gguf: GGUFFile
    args: object
    tokenizer: Tokenizer
    pipeline: Pipeline
    n_ctx: int
    load_seconds: float
    adapters: list[LoraAdapter] = dataclasses.field(default_factory=list)   # --lora, ids in order

    @property
    def n_vocab(self) -> int:
        return self.args.n_vocab  # type: ignore[attr-defined]

    @property
    def chat_template(self) -> str | None:
        t = self.gguf.metadata.get("tokenizer.chat_template")
        return t if isinstance(t, str) else None

    def close(self) -> None:
        self.pipeline.close()


def load_model(path: str, backends: Sequence[Backend], n_ctx: int = 0,
               tensor_split: Sequence[float] | None = None, kv_type: GGMLType = GGMLType.F32,
               progress: Progress | None = None, lora: Sequence[tuple[str, float]] = ()) -> Model:
    """Open `path`, check it can be run, and place it on `backends`. Every problem with the file
    is a ModelLoadError naming the file and the problem."""
    t0 = time.perf_counter()
    gguf = GGUFFile(path)
    try:
        arch = get_architecture(gguf.architecture)
        shapes = {n: t.shape for n, t in gguf.tensors.items()}
        args = arch.args_from_metadata(gguf.metadata, shapes)
        tokenizer = Tokenizer.from_metadata(gguf.metadata)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    if n_ctx <= 0:
        n_ctx = min(args.n_ctx_train, 4096)
    template = gguf.metadata.get("tokenizer.chat_template")
    if not isinstance(template, str):
        log.info("%s has no tokenizer.chat_template: chat requests use chatml, as llama-server's, unless "
                 "--chat-template names one (a jinja template or a built-in: %s)", path, ", ".join(BUILTIN_TEMPLATES))
    elif (why := template_error(template)) is not None:
        log.warning("%s: its tokenizer.chat_template is unusable (%s): chat requests fail with a 400 unless "
                    "--chat-template / --chat-template-file gives another", path, why)
    adapters = load_adapters(lora, gguf)    # (path, scale) each: checked against the model
    pipeline = Pipeline(gguf, arch, args, backends, n_ctx, tensor_split, kv_type, progress, adapters)
    dt = time.perf_counter() - t0
    log.info("loaded %s (%s, %d layers) in %.2f s", path, args.arch, args.n_layer, dt)
    return Model(gguf, args, tokenizer, pipeline, n_ctx, dt, adapters)
