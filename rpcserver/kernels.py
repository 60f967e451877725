"""The op kernels, each written once against an array namespace ``xp`` (Python array API).

numpy, cupy and array-api-strict all run this code. Arguments are already validated for arity and
attribute ranges by the graph compiler; shape mismatches found here raise ``ShapeError`` which the
executor reports as INVALID_ARGUMENT. Activations are float32.
"""
from __future__ import annotations

import math
from typing import Any

from llamarpc.proto import pb

Array = Any


class ShapeError(ValueError):
    pass


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ShapeError(msg)


def _rows2d(x: Array, what: str) -> None:
    _check(x.ndim == 2, f"{what}: expected a 2-d [tokens, features] array, got shape {tuple(x.shape)}")


def get_rows(xp: Any, table: Array, ids: Array) -> Array:
    """Rows of a float table (quantized tables are gathered by the executor before dequantizing)."""
    _rows2d(table, "get_rows")
    _check(ids.ndim == 1, "get_rows: ids must be 1-d")
    if ids.shape[0]:
        _check(int(xp.min(ids)) >= 0 and int(xp.max(ids)) < table.shape[0],
               f"get_rows: ids must be in [0, {table.shape[0]})")
    return xp.astype(xp.take(table, ids, axis=0), xp.float32)


def rms_norm(xp: Any, x: Array, eps: float) -> Array:
    ms = xp.mean(x * x, axis=-1, keepdims=True)
    return x / xp.sqrt(ms + eps)


def check_groups(x: Array, group: int, w: Array | None) -> None:
    _rows2d(x, "rms_norm")
    g = group or x.shape[1]
    _check(g > 0 and x.shape[1] % g == 0, f"rms_norm: width {x.shape[1]} is not a multiple of head_dim {group}")
    if w is not None:
        _check(tuple(w.shape) == (g,), f"rms_norm: weight must be [{g}], got {tuple(w.shape)}")


def rms_norm_groups(xp: Any, x: Array, eps: float, group: int, w: Array | None = None) -> Array:
    """RMS_NORM with attrs.head_dim = group > 0 (QK-norm): each run of `group` features of a row
    (one attention head) is normalized on its own (group 0: the whole row), then times the
    optional second operand `w` [group]."""
    check_groups(x, group, w)
    n, c = x.shape
    group = group or c
    y = rms_norm(xp, xp.reshape(x, (n * (c // group), group)), eps)
    if w is not None:
        y = y * w
    return xp.reshape(y, (n, c))


def layer_norm(xp: Any, x: Array, eps: float) -> Array:
    mu = xp.mean(x, axis=-1, keepdims=True)
    d = x - mu
    var = xp.mean(d * d, axis=-1, keepdims=True)
    return d / xp.sqrt(var + eps)


def matmul(xp: Any, x: Array, w: Array) -> Array:
    """x[N, K] @ w[M, K].T -> [N, M]; w is float (the executor dequantizes stored weights)."""
    _rows2d(x, "matmul")
    _check(w.ndim == 2 and w.shape[1] == x.shape[1],
           f"matmul: x {tuple(x.shape)} and weight {tuple(w.shape)} do not agree on K")
    return xp.matmul(x, xp.matrix_transpose(w))


def _broadcastable(a: Array, b: Array, what: str) -> None:
    for da, db in zip(reversed(a.shape), reversed(b.shape)):
        _check(da == db or da == 1 or db == 1, f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)} do not broadcast")


def add(xp: Any, a: Array, b: Array) -> Array:
    _broadcastable(a, b, "add")
    return a + b


def mul(xp: Any, a: Array, b: Array) -> Array:
    _broadcastable(a, b, "mul")
    return a * b


def sigmoid(xp: Any, x: Array) -> Array:
    # the tanh form never overflows and is ~15x faster in numpy than exp with a where()
    return 0.5 * (1.0 + xp.tanh(0.5 * x))


def silu(xp: Any, x: Array) -> Array:
    return x * sigmoid(xp, x)


def gelu(xp: Any, x: Array) -> Array:
    # tanh approximation, as ggml_gelu
    return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def swiglu(xp: Any, gate: Array, up: Array) -> Array:
    _check(gate.shape == up.shape, f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    return silu(xp, gate) * up


def softmax(xp: Any, x: Array) -> Array:
    m = xp.max(x, axis=-1, keepdims=True)
    e = xp.exp(x - m)
    return e / xp.sum(e, axis=-1, keepdims=True)


def softcap(xp: Any, x: Array, cap: float) -> Array:
    return cap * xp.tanh(x / cap)


def rope_cos_sin(xp: Any, pos: Array, n_dims: int, freq_base: float, freq_scale: float) -> tuple[Array, Array]:
    """cos/sin [N, n_dims/2] of theta_i = freq_scale * pos * base^(-2i/n_dims), computed in float64."""
    half = n_dims // 2
    i = xp.astype(xp.arange(half), xp.float64)
    inv_freq = float(freq_scale) * xp.pow(xp.asarray(float(freq_base), dtype=xp.float64), -2.0 * i / n_dims)
    theta = xp.astype(pos, xp.float64)[:, None] * inv_freq[None, :]
    return xp.astype(xp.cos(theta), xp.float32), xp.astype(xp.sin(theta), xp.float32)


def rope(xp: Any, x: Array, pos: Array, head_dim: int, n_dims: int, mode: int,
         freq_base: float, freq_scale: float, memo: dict | None = None) -> Array:
    """Rotary embedding over the first n_dims of each head: mode 0 rotates adjacent pairs
    (x[2i], x[2i+1]) like ggml's normal mode; mode 2 (neox) rotates (x[i], x[i + n_dims/2]).
    `memo` (one per Compute) shares cos/sin between the ropes of every layer for the same pos."""
    _rows2d(x, "rope")
    n, width = x.shape
    _check(width % head_dim == 0, f"rope: width {width} is not a multiple of head_dim {head_dim}")
    _check(pos.ndim == 1 and pos.shape[0] == n, f"rope: pos must be [{n}], got {tuple(pos.shape)}")
    h = width // head_dim
    xh = xp.reshape(x, (n, h, head_dim))
    key = (id(pos), n_dims, freq_base, freq_scale)
    hit = memo.get(key) if memo is not None else None
    if hit is None or hit[0] is not pos:
        hit = (pos, *rope_cos_sin(xp, pos, n_dims, freq_base, freq_scale))
        if memo is not None:
            memo[key] = hit
    cos, sin = hit[1][:, None, :], hit[2][:, None, :]
    half = n_dims // 2
    if mode == 2:
        x0, x1 = xh[:, :, :half], xh[:, :, half:n_dims]
        rot = xp.concat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    else:
        x0, x1 = xh[:, :, 0:n_dims:2], xh[:, :, 1:n_dims:2]
        rot = xp.reshape(xp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1), (n, h, n_dims))
    if n_dims < head_dim:
        rot = xp.concat([rot, xh[:, :, n_dims:]], axis=-1)
    return xp.reshape(rot, (n, width))


MAX_SHIFT = 1 << 24     # |delta| of a ROPE_SHIFT: positions are below this anyway


def rope_shift(xp: Any, cache: Array, cells: Array, delta: Array, head_dim: int, n_dims: int, mode: int,
               freq_base: float, freq_scale: float) -> Array:
    """Context shift, in place: cache[cells[i]] = rope(cache[cells[i]], delta[i]). RoPE turns
    each pair by pos * theta, so turning a cached K (at p) by delta gives the K at p + delta. The
    rows go through float32 and back to the cache's type (F32 or F16). Returns the cells."""
    _rows2d(cache, "rope_shift: k_cache")
    n = cells.shape[0] if cells.ndim == 1 else -1
    _check(n >= 0 and delta.shape == (n,), f"rope_shift: cells and delta must be [N], got {tuple(cells.shape)} "
           f"and {tuple(delta.shape)}")
    if n == 0:
        return cells
    m = cache.shape[0]
    _check(int(xp.min(cells)) >= 0 and int(xp.max(cells)) < m, f"rope_shift: cells must be in [0, {m})")
    _check(int(xp.max(xp.abs(xp.astype(delta, xp.int64)))) <= MAX_SHIFT, f"rope_shift: |delta| must be at most {MAX_SHIFT}")
    order = xp.argsort(cells)
    sc, sd = xp.take(cells, order, axis=0), xp.take(delta, order, axis=0)
    _check(n == 1 or bool(xp.all(sc[1:] != sc[:-1])), "rope_shift: cells must be distinct")
    rows = xp.astype(xp.take(cache, sc, axis=0), xp.float32)
    write_cells(xp, cache, sc, rope(xp, rows, sd, head_dim, n_dims, mode, freq_base, freq_scale))
    return cells


def write_cells(xp: Any, cache: Array, cells: Array, new: Array) -> None:
    """cache[cells[t]] = new[t], one slice assignment per run of consecutive cells (the array API
    has no integer-array assignment; runs are few: the frontend allocates cells in order)."""
    n = cells.shape[0]
    if n == 0:
        return
    new = xp.astype(new, cache.dtype)
    breaks = xp.nonzero(cells[1:] != cells[:-1] + 1)[0] if n > 1 else xp.zeros((0,), dtype=xp.int64)
    starts = [0] + [int(b) + 1 for b in breaks] + [n]
    for a, b in zip(starts[:-1], starts[1:]):
        c = int(cells[a])
        cache[c:c + (b - a), ...] = new[a:b, ...]


def attention_mask(xp: Any, tok_pos: Array, tok_seq: Array, kv_pos: Array, kv_seq: Array,
                   sliding_window: int, causal: bool = True) -> Array:
    """[N, L] bool: token t may see cell c (same sequence, not empty, and when `causal` not in its
    future)."""
    vis = (kv_seq[None, :] == tok_seq[:, None]) & (kv_pos[None, :] >= 0)
    if causal:
        vis = vis & (kv_pos[None, :] <= tok_pos[:, None])
    if sliding_window > 0:
        vis = vis & (tok_pos[:, None] - kv_pos[None, :] < sliding_window)
    return vis


def attention(xp: Any, q: Array, k: Array, v: Array, k_cache: Array, v_cache: Array,
              cells: Array, tok_pos: Array, tok_seq: Array, kv_pos: Array, kv_seq: Array,
              *, n_head: int, n_head_kv: int, head_dim: int, scale: float,
              sliding_window: int = 0, softcap_: float = 0.0, causal: bool = True) -> Array:
    """Write the new K/V rows into the caches at `cells`, then attend over the first L cells
    (`causal` False: over all of the token's sequence, as an encoder does)."""
    n = q.shape[0]
    kvw = n_head_kv * head_dim
    _check(q.ndim == 2 and q.shape[1] == n_head * head_dim,
           f"attention: q must be [N, {n_head * head_dim}], got {tuple(q.shape)}")
    for name, a in (("k", k), ("v", v)):
        _check(a.shape == (n, kvw), f"attention: {name} must be [{n}, {kvw}], got {tuple(a.shape)}")
    for name, a in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check(a.ndim == 2 and a.shape[1] == kvw, f"attention: {name} must be [cells, {kvw}], got {tuple(a.shape)}")
    m = k_cache.shape[0]
    _check(v_cache.shape[0] == m, "attention: k_cache and v_cache have different cell counts")
    for name, a in (("cells", cells), ("tok_pos", tok_pos), ("tok_seq", tok_seq)):
        _check(a.ndim == 1 and a.shape[0] == n, f"attention: {name} must be [{n}], got {tuple(a.shape)}")
    ln = kv_pos.shape[0]
    _check(kv_pos.ndim == 1 and kv_seq.shape == (ln,), "attention: kv_pos and kv_seq must be 1-d of equal length")
    _check(ln <= m, f"attention: {ln} visible cells but the cache has {m}")
    if n:
        _check(int(xp.min(cells)) >= 0 and int(xp.max(cells)) < m, f"attention: cells must be in [0, {m})")
    write_cells(xp, k_cache, cells, k)
    write_cells(xp, v_cache, cells, v)
    if n == 0:
        return xp.zeros((0, n_head * head_dim), dtype=xp.float32)
    g = n_head // n_head_kv
    kc = xp.astype(k_cache[:ln, ...], xp.float32)
    vc = xp.astype(v_cache[:ln, ...], xp.float32)
    qh = xp.reshape(xp.permute_dims(xp.reshape(q, (n, n_head_kv, g, head_dim)), (1, 2, 0, 3)), (n_head_kv, g * n, head_dim))
    kh = xp.permute_dims(xp.reshape(kc, (ln, n_head_kv, head_dim)), (1, 2, 0))        # [Hkv, D, L]
    vh = xp.permute_dims(xp.reshape(vc, (ln, n_head_kv, head_dim)), (1, 0, 2))        # [Hkv, L, D]
    scores = xp.reshape(xp.matmul(qh, kh), (n_head_kv, g, n, ln)) * scale
    if softcap_ > 0:
        scores = softcap(xp, scores, softcap_)
    vis = attention_mask(xp, tok_pos, tok_seq, kv_pos, kv_seq, sliding_window, causal)
    scores = xp.where(vis[None, None, :, :], scores, xp.asarray(-xp.inf, dtype=xp.float32))
    mx = xp.max(scores, axis=-1, keepdims=True)
    mx = xp.where(xp.isfinite(mx), mx, xp.zeros_like(mx))
    e = xp.exp(scores - mx)
    s = xp.sum(e, axis=-1, keepdims=True)
    p = e / xp.where(s > 0, s, xp.ones_like(s))
    out = xp.matmul(xp.reshape(p, (n_head_kv, g * n, ln)), vh)                       # [Hkv, G*N, D]
    out = xp.permute_dims(xp.reshape(out, (n_head_kv, g, n, head_dim)), (2, 0, 1, 3))
    return xp.reshape(out, (n, n_head * head_dim))


def pool(xp: Any, x: Array, seq: Array, pooling: int, n_seq: int) -> Array:
    """Per-sequence pooling of token rows: 1 mean, 2 first (cls), 3 last."""
    _rows2d(x, "pool")
    _check(seq.shape == (x.shape[0],), "pool: seq must have one id per row")
    rows = []
    for s in range(n_seq):
        sel = seq == s
        cnt = int(xp.sum(xp.astype(sel, xp.int32)))
        _check(cnt > 0, f"pool: sequence {s} has no rows")
        if pooling == 1:
            rows.append(xp.sum(xp.where(sel[:, None], x, xp.zeros_like(x)), axis=0) / cnt)
        else:
            idx = xp.nonzero(sel)[0]
            rows.append(x[int(idx[0] if pooling == 2 else idx[-1]), ...])
    return xp.stack(rows, axis=0)


OP_ARITY: dict[int, tuple[int, int]] = {
    pb.GET_ROWS: (2, 2), pb.RMS_NORM: (1, 2), pb.LAYER_NORM: (1, 1), pb.MATMUL: (2, 2),
    pb.ADD: (2, 2), pb.MUL: (2, 2), pb.SCALE: (1, 1), pb.ROPE: (2, 2), pb.ATTENTION: (10, 10),
    pb.SILU: (1, 1), pb.GELU: (1, 1), pb.SWIGLU: (2, 2), pb.SOFTMAX: (1, 1), pb.SOFTCAP: (1, 1),
    pb.POOL: (2, 2), pb.ROPE_SHIFT: (3, 3),
}
