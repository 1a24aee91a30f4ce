"""The package is layered: a module imports only from packages on lower layers (or from its own package), never
from a sibling on its own layer, and no two modules import each other even indirectly. Imports inside functions
count too: they are how cycles hid before (docs/architecture.md shows the layers)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

# bottom to top; packages on one layer are independent of each other
LAYERS = [
    {"errors"},
    {"config", "runtime"},
    {"storage", "data", "quant", "observability"},
    {"model", "tuning"},
    {"parallel", "checkpoint", "prepare"},
    {"tasks"},
    {"training", "inference"},
    {"planner"},
    {"api"},
    {"launchers"},
    {"cli"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
PACKAGE = REPO / "fsdp_ft"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every fsdp_ft module `path` imports, at any depth of the file (a name imported from a package counts as
    its submodule when there is one)."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fsdp_ft"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fsdp_ft")}
    return found - {module_name(path), "fsdp_ft"}


def unit(module: str) -> str:
    """The layer unit of a module: its subpackage, or the top-level module itself (cli, api, errors)."""
    return module.split(".")[1]


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_sits_on_a_layer():
    """A new top-level module or package must be given its place in LAYERS (and docs/architecture.md)."""
    assert not sorted({unit(m) for m in graph() if m != "fsdp_ft"} - set(LAYER))


def test_imports_point_down_never_sideways_or_up():
    wrong = []
    for module, targets in graph().items():
        if module == "fsdp_ft":
            continue
        for target in targets:
            a, b = unit(module), unit(target)
            if a != b and LAYER.get(b, 99) >= LAYER.get(a, -1):
                kind = "sideways" if LAYER.get(b) == LAYER.get(a) else "up"
                wrong.append(f"{module} -> {target} ({kind}: layer {LAYER.get(a)} to {LAYER.get(b)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles_between_modules():
    """Tarjan's strongly connected components over the module graph: every component is a single module."""
    g = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The premise of the two tests above: an import inside a function body is found like one at the top."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from fsdp_ft.training import trainer\n    import fsdp_ft.cli\n")
    assert {"fsdp_ft.training.trainer", "fsdp_ft.cli"} <= {
        t for node in ast.walk(ast.parse(source.read_text())) if isinstance(node, (ast.Import, ast.ImportFrom))
        for t in ([f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom)
                  else [a.name for a in node.names])}


def test_config_and_cli_import_without_torch():
    """Loading and checking a config (and `fsdp-ft --help`) never imports torch: launchers validate before any
    rank starts, and a typo costs no torch import."""
    code = ("import sys, fsdp_ft, fsdp_ft.config, fsdp_ft.cli; fsdp_ft.load_config; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def _fsdp_ft_imports(tree: ast.AST):
    """(line, module, names) of every `from fsdp_ft... import` in `tree`, also inside code strings (the snippets
    tests and launchers hand to `python -c`)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fsdp_ft"):
            yield node.lineno, node.module, [(a.name, a.asname) for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fsdp_ft"):
                    yield node.lineno, a.name, []
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value \
                and "fsdp_ft" in node.value:
            try:
                yield from _fsdp_ft_imports(ast.parse(node.value))
            except SyntaxError:
                pass


def _repo_python_files() -> list[Path]:
    return [p for d in ("fsdp_ft", "tests", "benchmarks", "launch") for p in (REPO / d).rglob("*.py")]


def test_every_import_of_fsdp_ft_resolves():
    """Every module and name imported from fsdp_ft anywhere in the repository exists, and every attribute read from
    an imported fsdp_ft module exists: a moved or renamed name fails here, not in a subprocess of a slow test."""
    import importlib

    def resolve(module: str, name: str | None = None):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            return None
        if name is None or hasattr(mod, name):
            return getattr(mod, name) if name else mod
        try:
            return importlib.import_module(f"{module}.{name}")
        except ImportError:
            return None

    missing = []
    for path in _repo_python_files():
        tree = ast.parse(path.read_text())
        modules = {}  # local name -> imported fsdp_ft module
        for line, module, names in _fsdp_ft_imports(tree):
            if resolve(module) is None:
                missing.append(f"{path.relative_to(REPO)}:{line}: {module}")
            for name, alias in names:
                value = resolve(module, name)
                if value is None:
                    missing.append(f"{path.relative_to(REPO)}:{line}: {module}.{name}")
                elif type(value).__name__ == "module":
                    modules[alias or name] = value
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                    and not hasattr(modules[node.value.id], node.attr):
                missing.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not missing, "\n".join(missing)


def test_no_private_name_crosses_a_package():
    """A name with a leading underscore is its package's own: another package importing it shows a boundary in
    the wrong place (make it public, or move the code)."""
    crossing = []
    for path in PACKAGE.rglob("*.py"):
        module = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fsdp_ft."):
                for alias in node.names:
                    if alias.name.startswith("_") and unit(node.module) != unit(module):
                        crossing.append(f"{module} imports {node.module}.{alias.name}")
    assert not crossing, crossing
