"""The tree reads as the design (DESIGN.md, "Layout"): every import between llamarpc modules points
one way, and there is no import cycle, counting imports inside functions and under TYPE_CHECKING
(a cycle that only a lazy import breaks is still a cycle). Read from the source with `ast`;
nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# installed name -> folder (pyproject.toml's package-dir)
TOP = {"llamarpc.proto": "proto", "llamarpc.rpcserver": "rpcserver", "llamarpc.client": "client",
       "llamarpc.frontend": "frontend"}
# which top-level package may import which (besides itself)
TOP_ALLOWED = {
    "llamarpc.proto": set(),
    "llamarpc.rpcserver": {"llamarpc.proto"},
    "llamarpc.client": {"llamarpc.proto", "llamarpc.rpcserver"},
    "llamarpc.frontend": {"llamarpc.client", "llamarpc.proto"},
}
CLIENT_MAY_IMPORT_RPCSERVER = {"llamarpc.client.local"}     # LocalBackend: an in-process node
# frontend's packages, lowest first: a module may import its own package and those below it
FRONTEND = ["model", "sampling", "engine", "api", "cli"]
# cycles that were there when this test came, owned by other work: each names why; none may grow
KNOWN_CYCLES: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for name, folder in TOP.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if any(p.startswith(".") or p == "__pycache__" for p in rel.parts) or "_pb2" in path.name:
                continue
            mods[".".join([name, *parts])] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The llamarpc modules `name` imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    pkg = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:      # `import a.b.c` of a name that is no module: its module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _top(mod: str) -> str:
    return ".".join(mod.split(".")[:2])


def _frontend_package(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "frontend" else None


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, targets in graph.items():
        for b in targets:
            ta, tb = _top(a), _top(b)
            if ta != tb:
                if tb not in TOP_ALLOWED[ta] or (ta == "llamarpc.client" and tb == "llamarpc.rpcserver"
                                                 and a not in CLIENT_MAY_IMPORT_RPCSERVER):
                    bad.append(f"{a} -> {b}")
                continue
            pa, pb = _frontend_package(a), _frontend_package(b)
            if pa not in FRONTEND or pb not in FRONTEND or pa == pb:
                continue        # a module outside the five packages: test_frontend_modules_live_in_its_packages
            if FRONTEND.index(pb) > FRONTEND.index(pa):
                bad.append(f"{a} -> {b}")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert [c for c in cycles(_graph()) if frozenset(c) not in KNOWN_CYCLES] == []


def test_imports_point_one_way():
    assert upward_arrows(_graph()) == []


def test_frontend_modules_live_in_its_packages():
    stray = [m for m in _graph() if m.startswith("llamarpc.frontend.") and _frontend_package(m) not in FRONTEND]
    assert stray == []
    for pkg in FRONTEND:
        init = ROOT / "frontend" / pkg / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, f"frontend/{pkg}/__init__.py needs a module docstring"


def test_the_checks_catch_what_they_are_for():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    up = {"llamarpc.frontend.model.x": {"llamarpc.frontend.engine.y"},
          "llamarpc.frontend.engine.y": {"llamarpc.frontend.model.x", "llamarpc.frontend.sampling"},
          "llamarpc.proto.z": {"llamarpc.client"},
          "llamarpc.client.remote": {"llamarpc.rpcserver.node"}}
    assert upward_arrows(up) == ["llamarpc.client.remote -> llamarpc.rpcserver.node",
                                 "llamarpc.frontend.model.x -> llamarpc.frontend.engine.y",
                                 "llamarpc.proto.z -> llamarpc.client"]
