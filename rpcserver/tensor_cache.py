"""The node's on-disk cache of weight bytes, keyed by their sha256.

Only weights are cached (a client asks for it per SetTensor); activations never are. Files are
written atomically and checked against their hash when read, so a torn or corrupted file is a
miss, never wrong weights. The cache survives node restarts.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class TensorCache:
    def __init__(self, directory: str | os.PathLike | None, max_total: int = 64 << 30) -> None:
        """`max_total` bounds the whole cache on disk: least recently used files go first."""
        self.dir = Path(directory) if directory else None
        self.max_total = max_total
        # files this process wrote or hashed, with the (size, mtime) they had then: not re-hashed
        self._verified: dict[bytes, tuple[int, int]] = {}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def _path(self, digest: bytes) -> Path:
        assert self.dir is not None and len(digest) == 32
        return self.dir / digest.hex()

    def get(self, digest: bytes, size: int) -> bytes | None:
        """The cached bytes with this hash and size, or None."""
        out = np.empty(size, np.uint8)
        return out.tobytes() if size >= 0 and self.read_into(digest, out) else None

    def read_into(self, digest: bytes, out: np.ndarray) -> bool:
        """Fill `out` (a uint8 host array of the entry's size) straight from the cache file, one
        copy; False (and `out` unspecified) on a miss or a file that fails its hash."""
        if self.dir is None or len(digest) != 32:
            return False
        p = self._path(digest)
        try:
            st = p.stat()
            if st.st_size != out.nbytes:
                return False
            with open(p, "rb") as f:
                if f.readinto(memoryview(out)) != out.nbytes:
                    return False
        except OSError:
            return False
        if self._verified.get(digest) != (st.st_size, st.st_mtime_ns):
            if hashlib.sha256(out).digest() != digest:
                log.warning("cache file %s does not match its hash; dropping it", p.name)
                p.unlink(missing_ok=True)
                return False
        try:
            os.utime(p)  # recently used: evicted last
            st = p.stat()
            self._verified[digest] = (st.st_size, st.st_mtime_ns)
        except OSError:
            pass
        return True

    def put(self, digest: bytes, data: bytes | memoryview) -> None:
        if self.dir is None or len(digest) != 32 or len(data) > self.max_total:
            return
        p = self._path(digest)
        if p.exists():
            return
        self._evict(self.max_total - len(data))
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
            st = p.stat()
            self._verified[digest] = (st.st_size, st.st_mtime_ns)
        except OSError:
            log.warning("could not write cache file %s", p, exc_info=True)
            Path(tmp).unlink(missing_ok=True)

    def _evict(self, budget: int) -> None:
        """Delete least recently used files until the cache holds at most `budget` bytes."""
        assert self.dir is not None
        files = []
        for f in self.dir.iterdir():
            if len(f.name) == 64:
                try:
                    st = f.stat()
                except OSError:
                    continue
                files.append((st.st_mtime, st.st_size, f))
        total = sum(s for _, s, _ in files)
        for _, size, f in sorted(files):
            if total <= budget:
                break
            f.unlink(missing_ok=True)
            total -= size
            log.info("cache: evicted %s (%d bytes)", f.name[:12], size)
