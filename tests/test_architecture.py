"""The layering of docs/architecture.md, checked on every import of the package.

Every ``import``/``from ... import`` of peftlab's own modules, at module level and inside
functions, must point to a lower floor (or stay inside its own package, without a circle).
A function-level import of the package's own modules is allowed only with a ``# lazy:``
comment on its line saying why (keeping ``peftlab --help`` fast), and there are at most
MAX_LAZY of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "peftlab"

# Bottom to top. A unit is a top-level module or subpackage of peftlab; units on one floor do
# not import each other. Keep in step with the picture in docs/architecture.md.
FLOORS: list[tuple[str, ...]] = [
    ("peftlab", "errors"),            # the package root holds only __version__
    ("io", "hub", "options"),         # ground floor utilities
    ("config", "tracking"),
    ("checkpoints",),
    ("rundir",),
    ("models", "optim", "kernels"),
    ("data",),
    ("methods",),
    ("evaluation",),
    ("build",),
    ("runs",),
    ("train",),
    ("export", "bounds", "profiling"),
    ("studies", "analysis"),
    ("cli",),
    ("__main__",),
]
FLOOR = {unit: i for i, units in enumerate(FLOORS) for unit in units}
MAX_LAZY = 30


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "peftlab"


def _imports(path: Path):
    """(line, target module, inside a function?, source line) for each import of peftlab's own modules."""
    text = path.read_text()
    tree = ast.parse(text)
    lines = text.splitlines()
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base_mod = ".".join(base + ([node.module] if node.module else []))
            else:
                base_mod = node.module or ""
            # `from . import x` may name a submodule: count it as an import of that submodule
            targets = [f"{base_mod}.{a.name}" if _is_module(f"{base_mod}.{a.name}") else base_mod for a in node.names]
        else:
            continue
        q, lazy = node, False
        while q in parents:
            q = parents[q]
            if isinstance(q, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy = True
                break
        for t in dict.fromkeys(targets):
            if t == "peftlab" or t.startswith("peftlab."):
                yield node.lineno, t, lazy, lines[node.lineno - 1]


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


FILES = sorted(PKG.rglob("*.py"))


def test_every_unit_has_a_floor():
    units = {unit_of(module_name(p)) for p in FILES}
    missing = sorted(units - set(FLOOR))
    assert not missing, f"put {missing} on a floor in FLOORS (tests/test_architecture.py) and docs/architecture.md"


def test_every_import_points_down():
    bad = []
    for path in FILES:
        mod = module_name(path)
        me = unit_of(mod)
        for line, target, _, src in _imports(path):
            other = unit_of(target)
            if other == me or me not in FLOOR:  # a unit without a floor fails test_every_unit_has_a_floor
                continue
            if FLOOR.get(other, len(FLOORS)) >= FLOOR[me]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {me} (floor {FLOOR[me]}) imports {target} "
                           f"(floor {FLOOR.get(other)}): {src.strip()}")
    assert not bad, "imports against the layering of docs/architecture.md:\n" + "\n".join(bad)


def test_no_import_circles():
    """No circle among modules, counting module-level and function-level imports alike."""
    graph: dict[str, set[str]] = {}
    for path in FILES:
        mod = module_name(path)
        graph.setdefault(mod, set())
        for _, target, _, _ in _imports(path):
            if _is_module(target) and target != mod:
                graph[mod].add(target)
        # importing a submodule runs its package's __init__ first
        parent = mod.rpartition(".")[0]
        if parent and path.name != "__init__.py":
            graph[mod].add(parent)
    for mod in list(graph):
        graph[mod] = {t for t in graph[mod] if not mod.startswith(t + ".")}  # a package's own __init__ is its parent
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_function_level_imports_of_own_modules_are_few_and_explained():
    lazy = [(path, line, src) for path in FILES for line, _, is_lazy, src in _imports(path) if is_lazy]
    unexplained = [f"{p.relative_to(ROOT)}:{line}: {src.strip()}" for p, line, src in lazy if "# lazy:" not in src]
    assert not unexplained, ("function-level imports of peftlab's own modules need a `# lazy: why` comment (only to keep "
                             "`peftlab --help` fast); move them to module level otherwise:\n" + "\n".join(unexplained))
    assert len(lazy) <= MAX_LAZY, f"{len(lazy)} function-level imports of own modules (at most {MAX_LAZY})"


@pytest.mark.parametrize("broken", ["up", "lazy"])
def test_the_guard_catches_a_broken_layering(tmp_path, monkeypatch, broken):
    """The checks above fail on a planted upward import and on an unexplained lazy import."""
    fake = tmp_path / "peftlab"
    (fake / "config").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "cli.py").write_text("")
    body = "from .. import cli\n" if broken == "up" else "def f():\n    from ..io import x\n"
    (fake / "config" / "__init__.py").write_text(body)
    (fake / "io.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "PKG", fake)
    monkeypatch.setattr(__import__(__name__), "FILES", sorted(fake.rglob("*.py")))
    check = test_every_import_points_down if broken == "up" else test_function_level_imports_of_own_modules_are_few_and_explained
    with pytest.raises(AssertionError, match="config/__init__.py:"):
        check()
