"""LoRA adapters (llama.cpp's ``--lora`` / ``--lora-scaled``): GGUF files with ``general.type =
adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` and, per adapted base tensor ``W`` (numpy
shape [n_out, n_in]), ``W.lora_a`` [r, n_in] and ``W.lora_b`` [n_out, r] (ggml's ne reversed, as
llama.cpp's src/llama-adapter.cpp checks them). A matmul ``x @ W.T`` becomes
``x @ W.T + s * ((x @ A.T) @ B.T)`` with ``s = scale * alpha / r`` (``scale`` when alpha is 0).

The graph takes each adapter's scale as an input per token row, already times alpha / r and
repeated over the r columns of ``x @ A.T`` (``lora.{id}.{r}`` F32[n, r]; ``lora_out.{id}.{r}``
F32[rows, r] for the output head, which sees only the rows whose logits are wanted), so changing
scales never re-registers a graph and requests with different scales share a batch. The two small
matmuls, the same-shape MUL by the scale and the ADD are ordinary ops: the node validates them as
it validates every op, and compiled programs have records for them (F16/BF16/Q8_0 A/B; an F32
matmul is a Python step between records, as for an F32 base weight).
A model without adapters builds the plain graph (`LoraGraphBuilder` is not used).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

from llamarpc.client import GraphBuilder, TensorRef, Value
from llamarpc.proto.types import GGMLType

from .gguf_file import GGUFFile, ModelLoadError, TensorInfo

log = logging.getLogger(__name__)

SUFFIX_A, SUFFIX_B = ".lora_a", ".lora_b"
MAX_ADAPTERS = 64
# what llama.cpp's convert_lora_to_gguf.py writes (--outtype f32 / f16 / bf16 / q8_0)
AB_TYPES = {GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0}


@dataclasses.dataclass(frozen=True)
class LoraPair:
    base: str           # the base model's tensor name
    a: TensorInfo       # [r, n_in]
    b: TensorInfo       # [n_out, r]

    @property
    def rank(self) -> int:
        return self.b.shape[1]


@dataclasses.dataclass
class LoraAdapter:
    id: int
    path: str
    alpha: float
    scale: float                        # the global (user) scale; POST /lora-adapters sets it
    gguf: GGUFFile
    pairs: dict[str, LoraPair]          # base tensor name -> its A/B

    def factor(self, base: str) -> float:
        """alpha / rank of one tensor's pair (1 when alpha is 0): llama.cpp's get_scale()."""
        return self.alpha / self.pairs[base].rank if self.alpha else 1.0

    def to_json(self) -> dict:
        """llama-server's GET /lora-adapters entry (task_name / prompt_prefix from the adapter's
        adapter.lora.* metadata, "" when absent)."""
        md = self.gguf.metadata
        return {"id": self.id, "path": self.path, "scale": self.scale,
                "task_name": _text(md.get("adapter.lora.task_name")),
                "prompt_prefix": _text(md.get("adapter.lora.prompt_prefix"))}


def _text(v: object) -> str:
    return v if isinstance(v, str) else ""


def load_adapter(path: str, index: int, scale: float, model: GGUFFile) -> LoraAdapter:
    """Open and check one adapter against the base model; a ModelLoadError names the file and
    what is wrong (not an adapter, another architecture, a tensor the model lacks, a wrong shape)."""
    g = GGUFFile(path)
    md = g.metadata

    def bad(msg: str) -> ModelLoadError:
        return ModelLoadError(f"LoRA adapter {path}: {msg}")

    if md.get("general.type") != "adapter":
        raise bad(f"expected general.type 'adapter', got {md.get('general.type')!r}")
    if md.get("adapter.type") != "lora":
        raise bad(f"expected adapter.type 'lora', got {md.get('adapter.type')!r}")
    arch = md.get("general.architecture")
    if arch != model.architecture:
        raise bad(f"architecture {arch!r} does not match the model's {model.architecture!r}")
    if "adapter.alora.invocation_tokens" in md:
        raise bad("activated LoRA (adapter.alora.invocation_tokens) is not supported")
    alpha = md.get("adapter.lora.alpha", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha != alpha or abs(alpha) > 1e6:
        raise bad(f"adapter.lora.alpha {alpha!r} is not a finite number")
    halves: dict[str, dict[str, TensorInfo]] = {}
    for name, t in g.tensors.items():
        if name.endswith(SUFFIX_A) or name.endswith(SUFFIX_B):
            halves.setdefault(name[:-len(SUFFIX_A)], {})[name[-1]] = t
        elif name.endswith("_norm.weight"):
            log.warning("LoRA adapter %s: norm tensor %s ignored (as llama.cpp does)", path, name)
        else:
            raise bad(f"tensor {name!r} has an unexpected suffix (expected .lora_a / .lora_b)")
    if not halves:
        raise bad("holds no .lora_a / .lora_b tensors")
    pairs: dict[str, LoraPair] = {}
    for base, ab in sorted(halves.items()):
        if set(ab) != {"a", "b"}:
            raise bad(f"the pair for {base!r} lacks its {'lora_b' if 'a' in ab else 'lora_a'}")
        w = model.tensors.get(base)
        if w is None:
            raise bad(f"tensor {base!r} does not exist in the base model (wrong base model?)")
        if base == "token_embd.weight":
            raise bad("a LoRA of token_embd.weight (the embedding lookup) is not supported")
        a, b = ab["a"], ab["b"]
        for t in (a, b):
            if int(t.type) not in AB_TYPES:
                raise bad(f"tensor {t.name!r} has type {t.type.name}; LoRA tensors may be "
                          f"{', '.join(sorted(x.name for x in AB_TYPES))}")
        if len(w.shape) != 2 or len(a.shape) != 2 or len(b.shape) != 2:
            raise bad(f"{base!r}: the base and its A/B must be matrices (shapes {w.shape}, {a.shape}, {b.shape})")
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0]:
            raise bad(f"{base!r} has an incorrect shape: lora_a {a.shape}, lora_b {b.shape} for a base weight "
                      f"{w.shape} (expected [r, {w.shape[1]}] and [{w.shape[0]}, r]; wrong base model?)")
        if a.shape[0] != b.shape[1] or a.shape[0] <= 0:
            raise bad(f"{base!r}: lora_a {a.shape} and lora_b {b.shape} disagree on the rank "
                      "(lora_a is not transposed?)")
        pairs[base] = LoraPair(base, a, b)
    log.info("LoRA adapter %d: %s, %d tensors, rank %s, alpha %g, scale %g", index, path, len(pairs),
             "/".join(str(r) for r in sorted({p.rank for p in pairs.values()})), alpha, scale)
    return LoraAdapter(index, path, float(alpha), float(scale), g, pairs)


def load_adapters(specs: Sequence[tuple[str, float]], model: GGUFFile) -> list[LoraAdapter]:
    """Each (path, scale) in order: the adapters' ids are their positions."""
    if len(specs) > MAX_ADAPTERS:
        raise ModelLoadError(f"{len(specs)} LoRA adapters: at most {MAX_ADAPTERS}")
    return [load_adapter(p, i, s, model) for i, (p, s) in enumerate(specs)]


def parse_scales(value: object, adapters: Sequence[LoraAdapter]) -> tuple[float, ...]:
    """A request's or POST /lora-adapters' ``[{"id": N, "scale": S}, ...]`` as one scale per adapter:
    the adapters not listed get 0 (llama.cpp's parse_lora_request). A ValueError says what is wrong."""
    if not isinstance(value, list):
        raise ValueError("'lora' must be an array of {\"id\", \"scale\"} objects")
    scales = [0.0] * len(adapters)
    for e in value:
        if not isinstance(e, dict):
            raise ValueError("each 'lora' entry must be an object with 'id' and 'scale'")
        i, s = e.get("id", -1), e.get("scale", 0.0)
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(adapters):
            raise ValueError(f"invalid adapter id {i!r} (there are {len(adapters)} LoRA adapters)")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or s != s or abs(s) > 1e6:
            raise ValueError(f"adapter {i}: 'scale' must be a finite number, got {s!r}")
        scales[i] = float(s)
    return tuple(scales)


# -- the graph --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LoraTerm:
    adapter: int
    a: TensorRef
    b: TensorRef
    factor: float       # alpha / rank (1 when alpha is 0)
    head: bool          # the output head: its rows are the wanted ones (``lora_out.*``)

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclasses.dataclass(frozen=True)
class ScaleInput:
    """One scale input of a graph: adapter `adapter`'s scale times `factor`, over `rank` columns."""
    adapter: int
    rank: int
    factor: float
    head: bool

    @property
    def name(self) -> str:
        return f"{'lora_out' if self.head else 'lora'}.{self.adapter}.{self.rank}"


def _key(buffer_id: int, offset: int, shape: Sequence[int]) -> tuple[int, int, tuple[int, ...]]:
    return buffer_id, offset, tuple(shape)


class LoraGraphBuilder(GraphBuilder):
    """A GraphBuilder whose matmul by an adapted stored weight adds every adapter's
    ``(x A^T * scale_row * alpha/r) B^T``. `unused` after building: the adapted tensors the
    architecture's graph never multiplied by as a whole (a row view of a fused weight, say)."""

    def __init__(self, terms: Mapping[TensorRef, Sequence[LoraTerm]]) -> None:
        super().__init__()
        self._terms = {_key(r.buffer_id, r.offset, r.shape): (r, list(ts)) for r, ts in terms.items()}
        self._scales: dict[str, tuple[ScaleInput, Value]] = {}
        self._used: set[tuple[int, int, tuple[int, ...]]] = set()

    @property
    def scale_inputs(self) -> list[ScaleInput]:
        return [s for s, _ in self._scales.values()]

    @property
    def unused(self) -> list[TensorRef]:
        return [r for k, (r, _) in self._terms.items() if k not in self._used]

    def _scale(self, term: LoraTerm) -> Value:
        s = ScaleInput(term.adapter, term.rank, term.factor, term.head)
        hit = self._scales.get(s.name)
        if hit is None:
            hit = self._scales[s.name] = (s, self.input(s.name, GGMLType.F32, ("r" if s.head else "n", s.rank)))
        return hit[1]

    def matmul(self, x: Value, w: Value) -> Value:
        y = super().matmul(x, w)
        if w.kind != "tensor":
            return y
        t = self._tensors[w.index]
        key = _key(t.buffer_id, t.offset, t.shape)
        entry = self._terms.get(key)
        if entry is None:
            return y
        self._used.add(key)
        for term in entry[1]:
            h = self.mul(super().matmul(x, self.tensor(term.a)), self._scale(term))
            y = self.add(y, super().matmul(h, self.tensor(term.b)))
        return y
