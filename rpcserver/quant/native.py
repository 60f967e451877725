"""The compiled CPU kernels (``kernels.c``: quantized matmul; ``ops.c``: the other hot ops;
``program.c``: a run of them in one call):
built once per machine with the system C compiler, cached on disk, loaded with ctypes.

The library is compiled for the CPU it runs on (``-march=native``), so it lives in a cache keyed
by the source, the compiler and the CPU's flags: ``$LLAMARPC_KERNEL_CACHE``, else
``~/.cache/llamarpc/kernels``, else a temporary directory (a read-only install still works). A
warm start only loads the file (milliseconds); a cold one compiles it (a few seconds). Without a C
compiler ``load()`` returns None and the node runs the numpy reference kernels (slow, and said so
in the log).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = (Path(__file__).with_name("kernels.c"), Path(__file__).with_name("ops.c"),
           Path(__file__).with_name("program.c"))
HEADERS = (Path(__file__).with_name("common.h"),)
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math",
          "-fassociative-math", "-fno-signed-zeros", "-std=c11"]
QUANT_NAMES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
FLOAT_NAMES = ("f16", "bf16")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_threads = 0

P = ctypes.c_void_p
I64 = ctypes.c_int64


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("LLAMARPC_KERNEL_CACHE"):
        dirs.append(Path(os.environ["LLAMARPC_KERNEL_CACHE"]))
    dirs.append(Path.home() / ".cache" / "llamarpc" / "kernels")
    dirs.append(Path(tempfile.gettempdir()) / f"llamarpc-kernels-{os.getuid()}")
    return dirs


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


KEEP_BUILDS = 4   # builds kept per cache directory (other versions or CPUs sharing it), newest first


def _prune(d: Path, keep: int) -> None:
    """Drop all but the `keep` newest builds (a build another process has loaded stays mapped)."""
    try:
        builds = sorted(d.glob("llamarpc_quant_*.so"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in builds[keep:]:
            old.unlink()
    except OSError:
        pass


def _build(cc: str) -> Path:
    src = b"".join(p.read_bytes() for p in SOURCES + HEADERS if p.exists())
    ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(src + ver.encode() + " ".join(CFLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    for d in _cache_dirs():
        lib = d / f"llamarpc_quant_{key}.so"
        if lib.exists():
            try:
                os.utime(lib)   # most recently used: kept by _prune
            except OSError:
                pass
            return lib
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, suffix=".so.tmp")
            os.close(fd)
        except OSError:
            continue
        try:
            srcs = [str(p) for p in SOURCES if p.exists()]
            r = subprocess.run([cc, *CFLAGS, "-o", tmp, *srcs, "-lm"], capture_output=True, text=True, timeout=300)
            if r.returncode:   # a compiler without OpenMP (clang without libomp): one thread beats numpy
                flags = [f for f in CFLAGS if f != "-fopenmp"]
                r2 = subprocess.run([cc, *flags, "-o", tmp, *srcs, "-lm"], capture_output=True, text=True, timeout=300)
                if r2.returncode:
                    raise RuntimeError(f"{cc} failed: {r.stderr[-2000:]}")
                log.warning("%s could not build with OpenMP: the kernels run on one thread", cc)
            os.replace(tmp, lib)   # atomic: a concurrent builder's file is as good as ours
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("compiled the quantized kernels into %s", lib)
        _prune(d, keep=KEEP_BUILDS)
        return lib
    raise RuntimeError("no writable directory for the compiled kernels")


def _declare(lib: ctypes.CDLL) -> None:
    for t in QUANT_NAMES + FLOAT_NAMES:
        getattr(lib, f"{t}_dequant_rows").argtypes = [P, I64, I64, I64, I64, P]
        getattr(lib, f"{t}_gather_rows").argtypes = [P, I64, I64, P, I64, P]
        getattr(lib, f"{t}_gemv_exact").argtypes = [P, I64, I64, I64, P, I64, P]
        getattr(lib, f"{t}_gemm").argtypes = [P, I64, I64, I64, P, I64, P, I64]
    for t in QUANT_NAMES:
        getattr(lib, f"{t}_gemv_fast").argtypes = [P, I64, I64, I64, P, P, P, I64, P]
        getattr(lib, f"{t}_gemv_exact_multi").argtypes = [I64, P, P, I64, I64, P, I64, P]
    lib.quantize_q8.argtypes = [P, I64, I64, P, P, P]
    lib.set_blas.argtypes = [P, ctypes.c_int, P]
    lib.set_threads.argtypes = [ctypes.c_int]
    lib.run_program.argtypes = [P, I64]
    lib.run_program.restype = I64


def _hook_blas(lib: ctypes.CDLL) -> None:
    """Hand numpy's OpenBLAS sgemm to the kernels (for the tiles of large batches), and keep
    numpy's own BLAS calls on one thread: the kernels' threads do the node's parallel work, and
    two pools spinning on the same cores slowed both 4x (measured)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    for info in threadpool_info():
        if info.get("internal_api") != "openblas":
            continue
        blas = ctypes.CDLL(info["filepath"])
        prefix = info.get("prefix", "")
        for name, ilp64 in ((f"{prefix}cblas_sgemm64_", 1), ("scipy_cblas_sgemm64_", 1), ("cblas_sgemm64_", 1),
                            ("cblas_sgemm", 0)):
            fn = getattr(blas, name, None)
            if fn is not None:
                local = getattr(blas, "openblas_set_num_threads_local", None)
                lib.set_blas(ctypes.cast(fn, ctypes.c_void_p), ilp64,
                             ctypes.cast(local, ctypes.c_void_p) if local is not None else None)
                threadpool_limits(1, user_api="blas")
                log.debug("large batches: dequantized tiles through %s %s", info["filepath"], name)
                return
    log.info("no OpenBLAS sgemm found for the kernels: large batches go through numpy's matmul")


def load() -> ctypes.CDLL | None:
    """The kernel library, compiled on first use; None when it cannot be built here."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        cc = _compiler()
        try:
            if os.environ.get("LLAMARPC_NO_NATIVE"):
                raise RuntimeError("LLAMARPC_NO_NATIVE is set")
            if cc is None:
                raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
            lib = ctypes.CDLL(str(_build(cc)))
            _declare(lib)
            _hook_blas(lib)
            if _threads:
                lib.set_threads(_threads)
            _lib = lib
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            log.warning("quantized CPU kernels unavailable (%s): using the numpy reference kernels, "
                        "which are much slower", e)
            _lib = None
        _tried = True
        return _lib


def threads() -> int:
    if _lib is not None:
        return int(_lib.get_threads())
    return _threads or (os.cpu_count() or 1)


def set_threads(n: int) -> None:
    """Threads the kernels split rows over (the node's --threads)."""
    global _threads
    _threads = max(1, int(n))
    if _lib is not None:
        _lib.set_threads(_threads)
