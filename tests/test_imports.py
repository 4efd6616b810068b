"""The house's import rules, read statically (ast) from the source tree.

* No upward import: a layer imports only itself and the layers below it
  (kernels <- engine <- export / bench <- trifuse's cli and serve).
* No import circle between modules, counting imports at any depth (a function-level import
  still ties the two modules together: each needs the other to be whole).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"kernels": "trifuse.kernels", "engine": "trifuse.engine", "export": "trifuse.export",
           "bench": "trifuse.bench", "trifuse": "trifuse"}
#: layer -> the layers it may import (its own included)
ALLOWED = {"kernels": {"kernels"}, "engine": {"engine", "kernels"},
           "export": {"export", "engine", "kernels"}, "bench": {"bench", "export", "engine", "kernels"},
           "trifuse": set(FOLDERS)}
#: top-level modules of trifuse/ that every layer may use: the package itself (lazy names, version)
#: and the helper that lets the source folders stand aside for bare-name imports
NEUTRAL = {"trifuse", "trifuse.sourcetree"}


def _modules() -> dict:
    """module name -> (layer, path) for every .py file of the package."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [] if rel.parts == ("__init__",) else list(rel.parts)
            if parts and parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = (folder, path)
    return out


def _layer_of(name: str, modules: dict):
    for candidate in (name, *(name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1))):
        if candidate in modules:
            return candidate
    return None


def _imports(name: str, path: Path, modules: dict) -> set:
    """The package's modules ``path`` imports (absolute ``trifuse.*`` or relative), anywhere in it."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        for t in targets:
            if t.split(".")[0] != "trifuse":
                continue
            hit = _layer_of(t, modules)
            if hit is not None and hit != name:
                found.add(hit)
    return found


def _graph():
    modules = _modules()
    return modules, {name: _imports(name, path, modules) for name, (_, path) in modules.items()}


def _folder(name: str, modules: dict) -> str:
    return modules[name][0]


def test_no_upward_import():
    modules, graph = _graph()
    assert "trifuse.engine.pipelines" in modules or "trifuse.engine.pipelines" in {
        _layer_of(m, modules) for m in modules}, "the walk found the engine"
    bad = []
    for name, targets in graph.items():
        layer = _folder(name, modules)
        for t in sorted(targets):
            if t in NEUTRAL:
                continue
            if _folder(t, modules) not in ALLOWED[layer]:
                bad.append(f"{name} ({layer}) imports {t} ({_folder(t, modules)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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


def _package_edges(name: str, targets: set, modules: dict) -> set:
    """Edges that count for circles: a package's ``__init__`` importing its own submodules (to
    re-export them) and a submodule importing its parent package's ``__init__`` are how
    packages are built, not circles between subjects; every other edge counts."""
    keep = set()
    for t in targets:
        if t.startswith(name + "."):  # a package importing its own submodule
            continue
        if name.startswith(t + "."):  # a submodule importing its parent package
            continue
        keep.add(t)
    return keep


def test_no_import_circle():
    modules, graph = _graph()
    graph = {n: _package_edges(n, t, modules) for n, t in graph.items()}
    circles = {tuple(c) for c in _cycles(graph)}
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in sorted(circles))


def test_the_checks_see_a_circle_and_an_upward_import():
    """The finder itself: a made-up graph with a circle, and the rule table against a known case."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert "trifuse" not in ALLOWED["engine"] and "engine" in ALLOWED["export"]
