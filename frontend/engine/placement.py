"""Placement: which contiguous layer range goes to which backend."""
from __future__ import annotations

from collections.abc import Sequence


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


class PlacementError(ValueError):
    """The model does not fit on the given nodes; the message names the shortfall."""


def _stage_need(ranges: list[range], layer_cost: Sequence[int], first_cost: int, last_cost: int) -> list[int]:
    used = [i for i, r in enumerate(ranges) if len(r)]
    need = []
    for i, r in enumerate(ranges):
        n = sum(layer_cost[j] for j in r)
        if len(r) and i == used[0]:
            n += first_cost
        if len(r) and i == used[-1]:
            n += last_cost
        need.append(n)
    return need


def place_layers(layer_cost: Sequence[int], first_cost: int, last_cost: int, free: Sequence[int],
                 ratios: Sequence[float] | None = None, names: Sequence[str] | None = None) -> list[range]:
    """Contiguous layer ranges, one per node: by `ratios` when given (-ts), else in proportion to
    each node's free memory, moved so that every node's share fits its free memory. A model that
    cannot fit is a PlacementError naming the shortfall."""
    n = len(layer_cost)
    names = list(names or [f"node {i}" for i in range(len(free))])
    total_need = sum(layer_cost) + first_cost + last_cost
    if total_need > sum(free):
        raise PlacementError(
            f"the model needs {human_bytes(total_need)} on the nodes but they have {human_bytes(sum(free))} free "
            f"in total: short by {human_bytes(total_need - sum(free))}")
    if ratios is not None:
        ranges = split_layers(n, ratios)
        for nm, need, f in zip(names, _stage_need(ranges, layer_cost, first_cost, last_cost), free):
            if need > f:
                raise PlacementError(f"{nm} would need {human_bytes(need)} for its layers under this tensor split "
                                     f"but has {human_bytes(f)} free: short by {human_bytes(need - f)}")
        return ranges
    ranges = split_layers(n, [max(f, 0) for f in free])
    need = _stage_need(ranges, layer_cost, first_cost, last_cost)
    if all(nd <= f for nd, f in zip(need, free)):
        return ranges
    # greedy: fill each node in order as far as its free memory allows
    out, start = [], 0
    for i, f in enumerate(free):
        budget = f - (first_cost if start == 0 else 0)
        end = start
        while end < n and layer_cost[end] <= budget:
            budget -= layer_cost[end]
            end += 1
        if i == len(free) - 1 and end < n:
            break
        out.append(range(start, end))
        start = end
    if start < n or len(out) != len(free):
        raise PlacementError(f"the layers do not fit contiguously on {', '.join(names)} "
                             f"(model needs {human_bytes(total_need)}, {human_bytes(sum(free))} free in total)")
    need = _stage_need(out, layer_cost, first_cost, last_cost)
    for nm, nd, f in zip(names, need, free):
        if nd > f:
            raise PlacementError(f"{nm} is short by {human_bytes(nd - f)} for the output layer")
    return out
