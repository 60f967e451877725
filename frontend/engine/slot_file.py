"""A slot's KV cache on disk: llama-server's POST /slots/{id}?action=save|restore|erase.

The file holds the slot's tokens and, per layer, the K and V rows of its cells (position 0..n-1
in order), so it restores into any placement: other nodes, another stage split. Its header names
the model it belongs to (layers, K/V widths, the cache type, the vocabulary and a hash of the
GGUF's architecture metadata); a file that does not match, is cut short or too long, or does not
fit the slot is refused (it is untrusted input).

    magic "LRPCSLOT" | version u32 | n_layer u32 | n_embd_k u32 | n_embd_v u32 | kv type u32 |
    n_vocab u32 | sha256 of the architecture metadata [32] | n_tokens u32 |
    tokens i32[n_tokens] | per layer: K rows, then V rows (n_tokens x n_embd x type size bytes)

The KV reads and writes run on the engine thread (`Engine.call`: the nodes and the cells are its
own there); the file is read and written by the caller.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import time
from typing import TYPE_CHECKING

import numpy as np
from llamarpc.proto.types import GGMLType

from .kv_cells import ContextFull

if TYPE_CHECKING:
    from .engine import Engine
    from .loader import Model

MAGIC = b"LRPCSLOT"
VERSION = 1
HEADER = struct.Struct("<8sIIIIII32sI")
MAX_FILENAME = 255
_BAD_CHARS = set('/\\:*?"<>|')


class SlotFileError(ValueError):
    """A slot file that cannot be restored here (the request is a 400)."""


class SlotBusy(RuntimeError):
    """The slot is serving a request; llama-server defers the action until it is free."""


def valid_filename(name: object) -> bool:
    """A plain file name (llama.cpp's fs_validate_filename): no directory part, no '..', no
    control or reserved characters, no leading/trailing space, no trailing dot."""
    if not isinstance(name, str) or not 0 < len(name.encode("utf-8", "surrogatepass")) <= MAX_FILENAME:
        return False
    if name in (".", "..") or ".." in name or name[0] == " " or name[-1] in " .":
        return False
    for ch in name:
        o = ord(ch)
        if o < 0x20 or o == 0x7F or 0x80 <= o <= 0x9F or 0xD800 <= o <= 0xDFFF or ch in _BAD_CHARS \
                or o in (0x2215, 0x2216, 0xFF0F, 0xFF3C, 0xFEFF):
            return False
    return True


def _item_size(t: GGMLType) -> int:
    if t == GGMLType.F32:
        return 4
    if t == GGMLType.F16:
        return 2
    raise ValueError(f"KV cache type {t.name} cannot be saved")


@dataclasses.dataclass(frozen=True)
class Identity:
    n_layer: int
    n_embd_k: int
    n_embd_v: int
    kv_type: int
    n_vocab: int
    arch_hash: bytes

    @property
    def row_bytes(self) -> int:
        return self.n_embd_k * _item_size(GGMLType(self.kv_type))

    def data_bytes(self, n_tokens: int) -> int:
        return 4 * n_tokens + 2 * self.n_layer * n_tokens * self.row_bytes


def model_identity(model: Model) -> Identity:
    md = model.gguf.metadata
    arch = str(md.get("general.architecture", ""))
    keys = sorted(k for k in md if k.startswith(arch + "."))
    blob = json.dumps([arch] + [[k, md[k]] for k in keys], default=repr, sort_keys=True).encode()
    a = model.args
    kv_dim = int(a.kv_dim)  # type: ignore[attr-defined]
    return Identity(int(a.n_layer), kv_dim, kv_dim, int(model.pipeline.kv_type),  # type: ignore[attr-defined]
                    int(model.n_vocab), hashlib.sha256(blob).digest())


def _layer_refs(model: Model) -> list[tuple[object, object, object]]:
    """(backend, K ref, V ref) of every layer, in layer order, wherever it is placed."""
    out: dict[int, tuple[object, object, object]] = {}
    for s in model.pipeline.stages:
        for i, (k, v) in s.kv_refs.items():
            out[i] = (s.backend, k, v)
    return [out[i] for i in sorted(out)]


def _runs(cells: np.ndarray) -> list[tuple[int, int, int]]:
    """Cells as (first cell, index of its row, count) runs of consecutive cells."""
    runs: list[tuple[int, int, int]] = []
    for j, c in enumerate(cells.tolist()):
        if runs and runs[-1][0] + runs[-1][2] == c:
            c0, j0, n = runs[-1]
            runs[-1] = (c0, j0, n + 1)
        else:
            runs.append((c, j, 1))
    return runs


def slot_cells(engine: Engine, slot_id: int) -> np.ndarray:
    """The cells of the slot's cached tokens, in position order (position i at index i)."""
    kv = engine.kv
    sel = np.flatnonzero((kv.seq == slot_id) & (kv.pos >= 0))
    cells = sel[np.argsort(kv.pos[sel], kind="stable")].astype(np.int64)
    n = len(engine.slots[slot_id].cache)
    if cells.size != n or not np.array_equal(kv.pos[cells], np.arange(n)):
        raise RuntimeError(f"slot {slot_id}: its KV cells do not match its {n} cached tokens")
    return cells


def read_slot(engine: Engine, slot_id: int) -> bytes:
    """On the engine thread: the file's bytes for the slot's cached tokens and KV rows."""
    slot = _idle_slot(engine, slot_id)
    ident = model_identity(engine.model)
    cells = slot_cells(engine, slot_id)
    n = int(cells.size)
    parts = [HEADER.pack(MAGIC, VERSION, ident.n_layer, ident.n_embd_k, ident.n_embd_v, ident.kv_type,
                         ident.n_vocab, ident.arch_hash, n), np.asarray(slot.cache, "<i4").tobytes()]
    row = ident.row_bytes
    if n:
        lo, hi = int(cells.min()), int(cells.max()) + 1
        for backend, k, v in _layer_refs(engine.model):
            for ref in (k, v):
                raw = backend.get_tensor(ref.buffer_id, ref.offset + lo * row, (hi - lo) * row)  # type: ignore[attr-defined]
                rows = np.frombuffer(raw, np.uint8).reshape(hi - lo, row)
                parts.append(rows[cells - lo].tobytes())
    return b"".join(parts)


def parse_slot_file(data: bytes, ident: Identity, n_ctx_slot: int) -> tuple[list[int], memoryview]:
    """Check a file's bytes against this model and slot; (tokens, the KV rows)."""
    if len(data) < HEADER.size:
        raise SlotFileError("the file is too short for a slot file")
    magic, version, n_layer, n_k, n_v, kv_type, n_vocab, h, n_tokens = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SlotFileError("not a llamarpc slot file")
    if version != VERSION:
        raise SlotFileError(f"slot file version {version}, this server reads version {VERSION}")
    got = Identity(n_layer, n_k, n_v, kv_type, n_vocab, h)
    if got != ident:
        raise SlotFileError("the slot file was saved from another model or KV cache type")
    if n_tokens > n_ctx_slot:
        raise SlotFileError(f"the slot file holds {n_tokens} tokens, the slot context is {n_ctx_slot}")
    if len(data) != HEADER.size + ident.data_bytes(n_tokens):
        raise SlotFileError(f"the slot file has {len(data)} bytes, {n_tokens} tokens need "
                            f"{HEADER.size + ident.data_bytes(n_tokens)}")
    tokens = np.frombuffer(data, "<i4", n_tokens, HEADER.size)
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= ident.n_vocab):
        raise SlotFileError(f"the slot file holds a token id out of range [0, {ident.n_vocab})")
    return tokens.tolist(), memoryview(data)[HEADER.size + 4 * n_tokens:]


def write_slot(engine: Engine, slot_id: int, tokens: list[int], rows: memoryview) -> None:
    """On the engine thread: the slot's cache becomes `tokens` at positions 0..n-1, its KV rows
    written to every layer's cells. A failure leaves the slot empty."""
    slot = _idle_slot(engine, slot_id)
    ident = model_identity(engine.model)
    n, row = len(tokens), ident.row_bytes
    kv = engine.kv
    kv.remove(slot_id)
    slot.cache = []
    if not n:
        return
    try:
        cells = kv.alloc(np.full(n, slot_id, np.int32), np.arange(n, dtype=np.int32))
    except ContextFull as e:
        raise SlotFileError(f"no room in the KV cache for the slot file: {e}") from None
    try:
        runs = _runs(cells)
        per = n * row
        by_backend: dict[int, tuple[object, list[tuple[int, int, np.ndarray]]]] = {}
        for li, (backend, k, v) in enumerate(_layer_refs(engine.model)):
            for h, ref in enumerate((k, v)):
                base = (2 * li + h) * per
                layer = np.frombuffer(rows, np.uint8, per, base).reshape(n, row)
                items = by_backend.setdefault(id(backend), (backend, []))[1]
                for c0, j0, cnt in runs:
                    items.append((ref.buffer_id, ref.offset + c0 * row, layer[j0:j0 + cnt]))  # type: ignore[attr-defined]
        for backend, items in by_backend.values():
            backend.set_tensors(items)  # type: ignore[attr-defined]
    except BaseException:
        kv.remove(slot_id)
        raise
    slot.cache = list(tokens)


def erase_slot(engine: Engine, slot_id: int) -> int:
    """On the engine thread: forget the slot's cached tokens; how many there were."""
    slot = _idle_slot(engine, slot_id)
    n = len(slot.cache)
    engine.kv.remove(slot_id)
    slot.cache = []
    return n


def _idle_slot(engine: Engine, slot_id: int):  # noqa: ANN202 - slot.Slot
    if not 0 <= slot_id < len(engine.slots):
        raise SlotFileError("Invalid slot ID")
    slot = engine.slots[slot_id]
    if slot.busy:
        raise SlotBusy(f"slot {slot_id} is processing a request")
    return slot


# -- the actions, from any thread ------------------------------------------------------------------
def save(engine: Engine, slot_id: int, directory: str, filename: str) -> dict:
    t0 = time.perf_counter()
    data = engine.call(lambda e: read_slot(e, slot_id)).result()
    n_tokens = HEADER.unpack_from(data)[-1]
    path = os.path.join(directory, filename)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return {"id_slot": slot_id, "filename": filename, "n_saved": n_tokens, "n_written": len(data),
            "timings": {"save_ms": 1e3 * (time.perf_counter() - t0)}}


def restore(engine: Engine, slot_id: int, directory: str, filename: str) -> dict:
    t0 = time.perf_counter()
    ident = model_identity(engine.model)
    path = os.path.join(directory, filename)
    try:
        size = os.path.getsize(path)
        if size > HEADER.size + ident.data_bytes(engine.n_ctx_slot):
            raise SlotFileError(f"the slot file has {size} bytes, more than a slot can hold")
        with open(path, "rb") as f:
            data = f.read(size + 1)
    except OSError as e:
        raise SlotFileError(f"cannot read the slot file: {e.strerror}") from None
    tokens, rows = parse_slot_file(data, ident, engine.n_ctx_slot)
    engine.call(lambda e: write_slot(e, slot_id, tokens, rows)).result()
    return {"id_slot": slot_id, "filename": filename, "n_restored": len(tokens), "n_read": len(data),
            "timings": {"restore_ms": 1e3 * (time.perf_counter() - t0)}}


def erase(engine: Engine, slot_id: int) -> dict:
    n = engine.call(lambda e: erase_slot(e, slot_id)).result()
    return {"id_slot": slot_id, "n_erased": n}
