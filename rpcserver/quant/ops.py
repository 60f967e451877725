"""The compiled CPU versions of the hot non-matmul ops (``ops.c``, built with the quantized kernels
by ``native``): attention, rope, rms_norm and swiglu, each computing what its reference in
``rpcserver/kernels.py`` computes: attention within float32 rounding (its K/V cache writes bit for
bit), rms_norm bit for bit (numpy's summation order), rope with the reference's float64 angles,
swiglu within a few ulp (its own exp, vectorised, where the reference has numpy's tanh).

The wrappers take and return numpy arrays. Anything off the fast path (no compiler, an odd dtype or
layout, a shape the reference rejects) goes to the reference kernel with numpy as ``xp``, so errors
are the reference's ``ShapeError``s. The wrappers are lean on purpose: a decode step calls each of
them once per layer, and their Python time is the point.
"""
from __future__ import annotations

import ctypes
import struct
import sys
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from .. import kernels as K
from . import native

_NP = array_namespace(np.empty(0))
_F32, _F16, _I32 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int32)

_lib: Any = None
_ready = False
_run_attention: Any = None
_run_rope: Any = None
_run_rms: Any = None
_run_swiglu: Any = None

# every argument of an op in one byte string of 8-byte fields, as the ops_*_args structs in ops.c
_ATTENTION_ARGS = struct.Struct("=q5Q5q3Qq2Q4qdqdQ")
_ROPE_ARGS = struct.Struct("=q3Q5qQ")
_RMS_ARGS = struct.Struct("=qQ2qQdQ")


def _load() -> Any:
    """The library with the ops' argtypes declared, or None (then the reference kernels run)."""
    global _lib, _ready, _run_attention, _run_rope, _run_rms, _run_swiglu
    lib = native.load()
    if lib is not None:
        try:
            _run_attention, _run_rope, _run_rms = lib.op_attention_packed, lib.op_rope_packed, lib.op_rms_norm_mul_packed
            _run_swiglu = lib.op_swiglu
        except AttributeError:   # a library built without ops.c
            lib = None
        else:
            _run_swiglu.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
            _run_swiglu.restype = None
            for fn in (_run_attention, _run_rope, _run_rms):
                fn.argtypes = [ctypes.c_char_p]
            _run_attention.restype = ctypes.c_int
            _run_rope.restype = _run_rms.restype = None
    _lib, _ready = lib, True
    return lib


# -- array addresses -----------------------------------------------------------------------------
# `a.ctypes.data` costs ~1 us, more than a whole small op. Under CPython, id(a) is the array
# object's address and numpy's data pointer sits at a fixed offset in it (PyArrayObject_fields.data,
# what PyArray_DATA reads), so the ops get id(a) and that offset and read the pointer themselves.
# The offset is found once on arrays of known addresses; if it is not certain, addresses come from
# .ctypes.data (data_off -1). Every array passed is a plain np.ndarray that lives through the call.

def _probe_data_offset() -> int:
    if sys.implementation.name != "cpython":
        return -1
    probes = (np.empty(7, np.float32), np.arange(12, dtype=np.int32).reshape(3, 4)[1:],
              np.frombuffer(bytearray(16), np.uint8)[3:], np.zeros((2, 3), np.float16).T)
    found: set[int] | None = None
    for a in probes:
        want = a.ctypes.data
        offs = {off for off in range(8, 72, 8) if ctypes.c_void_p.from_address(id(a) + off).value == want}
        found = offs if found is None else found & offs
    return found.pop() if found and len(found) == 1 else -1


def _ctypes_address(a: np.ndarray) -> int:
    return a.ctypes.data


_DATA_OFF = _probe_data_offset()
_addr = id if _DATA_OFF >= 0 else _ctypes_address


def _is_i32(dt: np.dtype) -> bool:
    """int32 in this machine's byte order: the proto decoder's '<i4' arrays are equal, not identical."""
    return dt is _I32 or dt == _I32


# -- attention -----------------------------------------------------------------------------------

def _cache_layout(c: np.ndarray) -> tuple[int, int] | None:
    """(f16 flag, row stride in elements) of a cache the kernel can write in place, else None."""
    dt = c.dtype
    if dt is not _F32 and dt is not _F16:
        if dt != _F32 and dt != _F16:
            return None
        dt = _F32 if dt == _F32 else _F16
    if type(c) is not np.ndarray:
        return None
    flags = c.flags
    if not flags.writeable:
        return None
    if flags.c_contiguous:
        return dt is _F16, c.shape[1]
    s0, s1 = c.strides
    size = dt.itemsize
    if (s1 != size and c.shape[1] > 1) or s0 < 0 or s0 % size:
        return None
    return dt is _F16, s0 // size


def attention(q, k, v, k_cache, v_cache, cells, tok_pos, tok_seq, kv_pos, kv_seq, *,
              n_head: int, n_head_kv: int, head_dim: int, scale: float,
              sliding_window: int = 0, softcap_: float = 0.0, causal: bool = True) -> np.ndarray:
    """kernels.attention on numpy arrays: writes k/v into k_cache/v_cache (in place) at `cells`.
    Not `causal` (no sliding window then): the compiled kernel gets every token's position as
    INT32_MAX, so that its `kv_pos <= tok_pos` bound holds for every cell."""
    lib = _lib if _ready else _load()
    if not causal:
        if sliding_window:
            raise K.ShapeError("attention: a non-causal attention has no sliding window")
        tok_pos = np.full(np.shape(tok_pos), np.iinfo(np.int32).max, np.int32)
    n = q.shape[0]
    kvw = n_head_kv * head_dim
    if (lib is None or q.ndim != 2 or n_head_kv <= 0 or head_dim <= 0 or n_head % n_head_kv
            or q.shape[1] != n_head * head_dim or k.shape != (n, kvw) or v.shape != (n, kvw)
            or k_cache.ndim != 2 or k_cache.shape[1] != kvw or v_cache.shape != k_cache.shape
            or not (_is_i32(cells.dtype) and _is_i32(tok_pos.dtype) and _is_i32(tok_seq.dtype)
                    and _is_i32(kv_pos.dtype) and _is_i32(kv_seq.dtype))
            or cells.shape != (n,) or tok_pos.shape != (n,) or tok_seq.shape != (n,)
            or kv_pos.ndim != 1 or kv_seq.shape != kv_pos.shape or kv_pos.shape[0] > k_cache.shape[0]
            or (n and not kv_pos.shape[0])):   # the reference's max over no cell raises: so do we
        return _ref_attention(q, k, v, k_cache, v_cache, cells, tok_pos, tok_seq, kv_pos, kv_seq, n_head, n_head_kv,
                              head_dim, scale, sliding_window, softcap_)
    kl, vl = _cache_layout(k_cache), _cache_layout(v_cache)
    if kl is None or vl is None:
        return _ref_attention(q, k, v, k_cache, v_cache, cells, tok_pos, tok_seq, kv_pos, kv_seq, n_head, n_head_kv,
                              head_dim, scale, sliding_window, softcap_)
    q = np.ascontiguousarray(q, _F32)
    k = np.ascontiguousarray(k, _F32)
    v = np.ascontiguousarray(v, _F32)
    cells, tok_pos, tok_seq = np.ascontiguousarray(cells), np.ascontiguousarray(tok_pos), np.ascontiguousarray(tok_seq)
    kv_pos, kv_seq = np.ascontiguousarray(kv_pos), np.ascontiguousarray(kv_seq)
    m = k_cache.shape[0]
    out = np.empty((n, n_head * head_dim), _F32)
    a = _addr
    rc = _run_attention(_ATTENTION_ARGS.pack(
        _DATA_OFF, a(q), a(k), a(v), a(k_cache), a(v_cache), kl[1], vl[1], kl[0], vl[0], m,
        a(cells), a(tok_pos), a(tok_seq), n, a(kv_pos), a(kv_seq), kv_pos.shape[0],
        n_head, n_head_kv, head_dim, scale, sliding_window, softcap_ if softcap_ > 0 else 0.0, a(out)))
    if rc:
        if rc == -2:
            raise K.ShapeError(f"attention: cells must be in [0, {m})")
        raise MemoryError("attention: no memory for the scratch scores")
    return out


def _ref_attention(q, k, v, k_cache, v_cache, cells, tok_pos, tok_seq, kv_pos, kv_seq, n_head, n_head_kv, head_dim,
                   scale, sliding_window, softcap_):
    return K.attention(_NP, q, k, v, k_cache, v_cache, cells, tok_pos, tok_seq, kv_pos, kv_seq, n_head=n_head,
                       n_head_kv=n_head_kv, head_dim=head_dim, scale=scale, sliding_window=sliding_window,
                       softcap_=softcap_)


# -- rope ----------------------------------------------------------------------------------------

_inv_freq: dict[tuple[int, float, float], tuple[np.ndarray, int]] = {}


def _freqs(n_dims: int, freq_base: float, freq_scale: float) -> int:
    """The address of freq_scale * base^(-2i/n_dims) in float64, computed as the reference does."""
    key = (n_dims, freq_base, freq_scale)
    hit = _inv_freq.get(key)
    if hit is None:
        i = np.arange(n_dims // 2, dtype=np.float64)
        a = np.ascontiguousarray(float(freq_scale) * np.pow(np.float64(freq_base), -2.0 * i / n_dims))
        if len(_inv_freq) >= 64:
            _inv_freq.clear()
        hit = _inv_freq[key] = (a, a.ctypes.data)
    return hit[1]


def rope(x, pos, head_dim: int, n_dims: int, mode: int, freq_base: float, freq_scale: float,
         out: np.ndarray | None = None) -> np.ndarray:
    """kernels.rope on numpy arrays; `out` (a C-contiguous float32 array shaped as x, x itself for
    in place) receives the result when given."""
    lib = _lib if _ready else _load()
    if (lib is None or x.ndim != 2 or head_dim <= 0 or x.shape[1] % head_dim or not _is_i32(pos.dtype)
            or pos.shape != (x.shape[0],) or n_dims < 0 or n_dims > min(head_dim, 8192) or n_dims % 2):
        r = K.rope(_NP, x, pos, head_dim, n_dims, mode, freq_base, freq_scale)
        if out is not None:
            out[...] = r
            return out
        return r
    x = np.ascontiguousarray(x, _F32)
    pos = np.ascontiguousarray(pos)
    if out is None:
        out = np.empty(x.shape, _F32)
    elif (type(out) is not np.ndarray or out.dtype is not _F32 or out.shape != x.shape or not out.flags.c_contiguous
          or not out.flags.writeable):
        raise ValueError("rope: out must be a writable C-contiguous float32 array shaped as x")
    _run_rope(_ROPE_ARGS.pack(_DATA_OFF, _addr(x), _addr(out), _addr(pos), x.shape[0], x.shape[1], head_dim, n_dims, mode,
                              _freqs(n_dims, freq_base, freq_scale)))
    return out


# -- rms_norm ------------------------------------------------------------------------------------

def rms_norm(x, eps: float, w=None) -> np.ndarray:
    """kernels.rms_norm on numpy arrays (over the last axis), times the weight `w` when given (a
    row of x.shape[-1] values, broadcast as the mul op would)."""
    lib = _lib if _ready else _load()
    kk = x.shape[-1] if x.ndim else 0
    if (lib is None or kk == 0 or x.size == 0
            or (w is not None and (w.ndim == 0 or w.ndim > x.ndim or w.size != kk or w.shape[-1] != kk))):
        r = K.rms_norm(_NP, x, eps)
        return r if w is None else K.mul(_NP, r, w)
    x = np.ascontiguousarray(x, _F32)
    out = np.empty(x.shape, _F32)
    if w is None:
        pw = 0
    else:
        w = np.ascontiguousarray(w, _F32)
        pw = _addr(w)
    _run_rms(_RMS_ARGS.pack(_DATA_OFF, _addr(x), x.size // kk, kk, pw, eps, _addr(out)))
    return out


# -- swiglu --------------------------------------------------------------------------------------

def swiglu(gate, up) -> np.ndarray:
    """kernels.swiglu on numpy arrays: silu(gate) * up, within a few ulp of the reference."""
    lib = _lib if _ready else _load()
    if (lib is None or type(gate) is not np.ndarray or type(up) is not np.ndarray or gate.shape != up.shape
            or gate.dtype != _F32 or up.dtype != _F32):
        return K.swiglu(_NP, gate, up)
    gate, up = np.ascontiguousarray(gate), np.ascontiguousarray(up)
    out = np.empty(gate.shape, _F32)
    _run_swiglu(gate.ctypes.data, up.ctypes.data, gate.size, out.ctypes.data)
    return out
