"""The metric names README.md documents ("Metrics": the tables between <!-- metrics:KIND --> and
<!-- /metrics:KIND -->), and a /metrics text read with prometheus-client's parser."""
from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

README = Path(__file__).resolve().parent.parent / "README.md"


def documented(kind: str) -> list[str]:
    text = README.read_text()
    m = re.search(rf"<!-- metrics:{kind} -->(.*?)<!-- /metrics:{kind} -->", text, re.S)
    assert m, f"README.md has no metrics:{kind} table"
    names = re.findall(r"^\| `([a-z_]+:[a-z_]+)` \|", m.group(1), re.M)
    assert names, f"README.md's metrics:{kind} table names no metric"
    return names


def families(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """family name -> its samples (name, labels, value); raises on text that is no valid exposition."""
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def value(fams: dict, name: str, **labels: str) -> float:
    """The one sample called `name` with these labels (a counter's name with _total, a histogram's _count)."""
    base = re.sub(r"(_total|_count|_sum|_bucket)$", "", name)
    rows = [v for n, lab, v in fams.get(base, fams.get(name, [])) if n == name
            and all(lab.get(k) == x for k, x in labels.items())]
    assert len(rows) == 1, (name, labels, rows)
    return rows[0]


def served(fams: dict, name: str) -> bool:
    """Whether a documented name (a family, or a counter by its _total name) has samples."""
    base = name[:-6] if name.endswith("_total") else name
    return bool(fams.get(base) or fams.get(name))
