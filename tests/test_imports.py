"""The import graph: no cycles, dependencies point app -> actors -> kpistream, and the
Ray-free core never imports Ray, MLflow or prometheus-client (statically or at run time)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kpistream", "actors", "app")
HEAVY = ("ray", "mlflow", "prometheus_client", "ddsketch")   # ddsketch: a bench baseline only
LAYER = {"app": 2, "actors": 1, "kpistream": 0}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] in ("__init__", "__main__"):
                parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, int]]:
    """Every module ``name`` imports (anywhere in the file), as (module, line)."""
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:   # `from pkg import submodule` imports the submodule
                sub = f"{base}.{a.name}"
                found.append((sub if sub in mods else base, node.lineno))
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    heavy = []
    for m, path in mods.items():
        for target, line in _imports(m, path, mods):
            top = target.split(".")[0]
            if m.startswith("kpistream") and top in HEAVY:
                heavy.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
            if target in mods and target != m and not m.startswith(target + "."):
                graph[m].add(target)
    return graph, heavy


def test_core_never_imports_ray_mlflow_or_prometheus_client():
    _, heavy = _graph()
    assert heavy == []


def test_dependencies_point_app_actors_kpistream():
    graph, _ = _graph()
    wrong = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
             if LAYER[a.split(".")[0]] < LAYER[b.split(".")[0]]]
    assert wrong == []


def test_no_import_cycles():
    graph, _ = _graph()
    # Tarjan's strongly connected components; any component of 2+ modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
    """The checker itself: two modules importing each other are reported."""
    pkg = tmp_path / "kpistream"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from kpistream import b\n")
    (pkg / "b.py").write_text("from kpistream.a import f\nimport ray\n")
    for p in ("actors", "app"):
        (tmp_path / p).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph, heavy = _graph()
    assert graph["kpistream.a"] == {"kpistream.b"} and graph["kpistream.b"] == {"kpistream.a"}
    assert heavy == ["kpistream/b.py:2 imports ray"]
    try:
        test_no_import_cycles()
    except AssertionError:
        pass
    else:
        raise AssertionError("the cycle a <-> b was not reported")


def test_importing_every_core_module_loads_no_heavy_dependency():
    mods = sorted(m for m in _modules() if m.startswith("kpistream"))
    code = ("import importlib, json, sys\n"
            f"for m in {mods!r}:\n    importlib.import_module(m)\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
