"""What the HTTP layer knows: the settings it was started with and the model/engine once loaded."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable

from ..engine import Engine, Model
from ..model.chat_template import CHATML_TEMPLATE
from ..sampling import SamplingParams
from .metrics import Observer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServerSettings:
    model_path: str
    aliases: tuple[str, ...] = ()           # --alias a,b: /v1/models lists each
    n_parallel: int = 1
    n_predict: int = -1
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    chat_template: str | None = None        # jinja text from --chat-template / --chat-template-file
    system_prompt: str | None = None        # for llm-api's /chat
    api_keys: tuple[str, ...] = ()
    metrics: bool = False
    slots: bool = False
    webui: bool = True                      # the chat page at / (--no-webui: off)
    timeout: float = 600.0
    cache_prompt: bool = True
    ignore_eos: bool = False
    cors_origins: tuple[str, ...] = ("*",)  # '*' reflects any Origin, with credentials (as llama-server)
    max_body: int = 4 << 20                 # bytes; a larger request body is a 413
    max_json_depth: int = 64                # deeper nesting is a 400
    embeddings: bool = False                # --embeddings (--reranking sets it too)
    pooling: str | None = None              # --pooling; None: the model's own
    slot_save_path: str = ""                # --slot-save-path: POST /slots/{id}?action=save|restore here
    chat_template_kwargs: dict = dataclasses.field(default_factory=dict)  # --chat-template-kwargs
    reasoning_format: str = "auto"          # --reasoning-format: none | deepseek | auto
    reasoning_budget: int = -1              # --reasoning-budget: 0 renders templates with enable_thinking=false

    @property
    def model_name(self) -> str:
        return self.aliases[0] if self.aliases else self.model_path


class ServerState:
    """Shared by every handler. `model` and `engine` are None until loading finishes."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.model: Model | None = None
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.start_time = time.time()
        self.on_ready: list[Callable[[], None]] = []
        self.observer = Observer()          # /metrics: its registry

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def attach(self, model: Model, engine: Engine) -> None:
        self.model, self.engine = model, engine
        self.observer.attach(engine)
        for cb in self.on_ready:
            cb()

    @property
    def chat_template(self) -> str:
        t = self.settings.chat_template
        if t:
            return CHATML_TEMPLATE if t.strip() == "chatml" else t
        if self.model is not None and self.model.chat_template:
            return self.model.chat_template
        return CHATML_TEMPLATE

    def models_json(self) -> dict:
        """/v1/models and /models as llama-server answers both: `data` (OpenAI's list, one entry per
        --alias name) and `models` (the Ollama-style array)."""
        names = list(self.settings.aliases) or [self.settings.model_path]
        meta = self.model_meta() if self.ready else None
        data = [{"id": n, "aliases": names, "object": "model", "created": self.created, "owned_by": "llamacpp",
                 "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]}, "meta": meta}
                for n in names]
        models = [{"name": n, "model": n, "modified_at": "", "size": "", "digest": "", "type": "model",
                   "description": "", "tags": [""], "capabilities": ["completion"], "parameters": "",
                   "details": {"parent_model": "", "format": "gguf", "family": "", "families": [""],
                               "parameter_size": "", "quantization_level": ""}} for n in names]
        return {"models": models, "object": "list", "data": data}

    def model_meta(self) -> dict:
        m = self.model
        if m is None:
            return {}
        n_params = sum(int(_prod(t.shape)) for t in m.gguf.tensors.values())
        vocab_type = 2 if m.tokenizer.model == "gpt2" else 1
        return {"vocab_type": vocab_type, "n_vocab": m.n_vocab, "n_ctx_train": m.args.n_ctx_train,  # type: ignore[attr-defined]
                "n_embd": m.args.n_embd, "n_params": n_params,  # type: ignore[attr-defined]
                "size": os.path.getsize(m.gguf.path)}


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
