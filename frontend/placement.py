"""Placement: which contiguous layer range goes to which backend."""
from __future__ import annotations

from typing import Sequence


def split_layers(n_layer: int, ratios: Sequence[float]) -> list[range]:
    """Contiguous layer ranges in proportion to `ratios` (llama.cpp's -ts), largest remainder
    rounding; a zero ratio gets no layers."""
    if not ratios or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"tensor split must be non-negative numbers with a positive sum, got {list(ratios)}")
    total = float(sum(ratios))
    exact = [n_layer * r / total for r in ratios]
    counts = [int(e) for e in exact]
    order = sorted(range(len(ratios)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: n_layer - sum(counts)]:
        counts[i] += 1
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out


def format_table(rows: list[dict[str, object]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    width = {c: max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in cols}
    line = "  ".join(str(c).ljust(width[c]) for c in cols)
    body = ["  ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join([line, "  ".join("-" * width[c] for c in cols), *body])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
