"""The import layers of docs/architecture.md, checked statically on every source file (imports inside functions too).

The import-time tests (test_import_light.py, test_runtime_imports.py) prove what a fresh interpreter loads; this scan
also sees the lazy imports a run would reach later, so "runtime never imports torch" holds on every code path.
"""

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Layer of each subpackage; plain modules directly in dmpo_edge/ are the core. A new subpackage must be placed here
# (and on the page) before it can import anything.
SUBPACKAGE_LAYER = {
    "dmpo_edge.commands": "commands",
    "dmpo_edge.models": "models",
    "dmpo_edge.runtime": "runtime",
    "dmpo_edge.calib": "calib",
    "dmpo_edge.compile": "compile",
}
TOP_MODULE_LAYER = {"dmpo_edge.cli": "commands", "dmpo_edge.__main__": "commands"}

# Which layers each layer may import (lazily or not). Lower layers never reach up: a Jetson install of the runtime
# carries no torch, and the command line is the only place that composes everything.
MAY_IMPORT = {
    "core": {"core"},
    "runtime": {"core", "runtime"},
    "calib": {"core", "runtime", "calib"},
    "models": {"core", "models"},
    "compile": {"core", "runtime", "calib", "models", "compile"},
    "commands": {"core", "runtime", "calib", "models", "compile", "commands"},
}
# Third-party packages a module may import at module level (import time); everything else goes inside functions.
EAGER_THIRD_PARTY = {"numpy", "packaging"}
EAGER_THIRD_PARTY_MODELS = EAGER_THIRD_PARTY | {"torch"}  # models/ is torch code, imported only where torch is needed
# Never imported from runtime/ or calib/, not even inside a function.
TORCH_FAMILY = {"torch", "torchvision", "torch_tensorrt", "timm", "modelopt", "efficientnet_lite_pytorch"}
# Calls that import a module named by a string literal: ``require("torch", ...)`` and importlib.
IMPORTING_CALLS = {"require", "available", "import_module", "installed_version"}


def _package_dirs() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]["package-dir"]


def _modules() -> dict:
    """module name -> (path, is_package), following pyproject's package-dir mapping (compile/ is dmpo_edge.compile)."""
    mods = {}
    for package, folder in _package_dirs().items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, files in os.walk(base):
            rel_dir = os.path.relpath(dirpath, base)
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in files:
                if not f.endswith(".py"):
                    continue
                parts = [] if rel_dir == "." else rel_dir.split(os.sep)
                is_pkg = f == "__init__.py"
                name = ".".join([package] + parts + ([] if is_pkg else [f[:-3]]))
                mods[name] = (os.path.join(dirpath, f), is_pkg)
    return mods


def _type_checking(node) -> bool:
    """``if TYPE_CHECKING:``: imports only a type checker reads (never at run time), so they count as lazy."""
    t = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(source: str, module: str, is_package: bool, known=()) -> list:
    """-> [(imported module, lazy, line)]; lazy = inside a function. Relative imports resolved; ``from a import b``
    yields ``a.b`` too when that is a module of ours."""
    out = []

    def absolute(level, name):
        if not level:
            return name
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([name] if name else []))

    def visit(node, lazy):
        for ch in ast.iter_child_nodes(node):
            inner = lazy or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or _type_checking(ch)
            if isinstance(ch, ast.Import):
                out.extend((a.name, lazy, ch.lineno) for a in ch.names)
            elif isinstance(ch, ast.ImportFrom):
                target = absolute(ch.level, ch.module)
                subs = [f"{target}.{a.name}" for a in ch.names if f"{target}.{a.name}" in known]
                if len(subs) < len(ch.names):  # names from the module itself, not only its submodules
                    out.append((target, lazy, ch.lineno))
                out.extend((sub, lazy, ch.lineno) for sub in subs)
            elif isinstance(ch, ast.Call):
                fn = ch.func.id if isinstance(ch.func, ast.Name) else getattr(ch.func, "attr", None)
                if fn in IMPORTING_CALLS and ch.args and isinstance(ch.args[0], ast.Constant) \
                        and isinstance(ch.args[0].value, str):
                    out.append((ch.args[0].value, lazy, ch.lineno))
            visit(ch, inner)

    visit(ast.parse(source), False)
    return out


def layer_of(module: str) -> str | None:
    if module in TOP_MODULE_LAYER:
        return TOP_MODULE_LAYER[module]
    for package, layer in SUBPACKAGE_LAYER.items():
        if module == package or module.startswith(package + "."):
            return layer
    return "core" if module.count(".") <= 1 else None


@pytest.fixture(scope="module")
def graph():
    mods = _modules()
    edges = {}
    for name, (path, is_pkg) in mods.items():
        with open(path, encoding="utf-8") as f:
            edges[name] = imports_of(f.read(), name, is_pkg, known=mods)
    return mods, edges


def _where(mods, module, line) -> str:
    return f"{os.path.relpath(mods[module][0], ROOT)}:{line}"


def _ours(target: str, mods) -> str | None:
    while target not in mods and "." in target:
        target = target.rsplit(".", 1)[0]
    return target if target in mods else None


def test_the_scan_sees_lazy_and_string_imports():
    src = ("import numpy\nfrom . import bundle\n\ndef f():\n    import torch\n    from ..compile import export\n"
           "    require('tensorrt', 'x')\n")
    known = {"dmpo_edge.runtime.bundle"}
    got = {(m, lazy) for m, lazy, _ in imports_of(src, "dmpo_edge.runtime.x", False, known)}
    assert got == {("numpy", False), ("dmpo_edge.runtime.bundle", False), ("torch", True),
                   ("dmpo_edge.compile", True), ("tensorrt", True)}, got


def test_every_module_has_a_layer(graph):
    mods, _ = graph
    assert len(mods) > 40 and "dmpo_edge.runtime.pipeline" in mods and "dmpo_edge.compile.compiler" in mods
    unplaced = sorted(m for m in mods if layer_of(m) is None)
    assert not unplaced, f"place these in SUBPACKAGE_LAYER and docs/architecture.md: {unplaced}"


def test_layers_import_only_what_they_may(graph):
    mods, edges = graph
    bad = []
    for m, imps in edges.items():
        src = layer_of(m)
        for target, lazy, line in imps:
            t = _ours(target, mods) if target.startswith("dmpo_edge") else None
            if t is not None and layer_of(t) not in MAY_IMPORT[src]:
                bad.append(f"{_where(mods, m, line)} ({src}) imports {target} ({layer_of(t)}){' lazily' if lazy else ''}")
    assert not bad, "imports against docs/architecture.md's layers:\n" + "\n".join(bad)


def test_runtime_and_calib_never_import_torch(graph):
    mods, edges = graph
    bad = [f"{_where(mods, m, line)} imports {t}" for m, imps in edges.items() if layer_of(m) in ("runtime", "calib")
           for t, _, line in imps if t.split(".")[0] in TORCH_FAMILY]
    assert not bad, "runtime/ and calib/ run on a Jetson install without torch:\n" + "\n".join(bad)


def test_heavy_packages_are_imported_inside_functions(graph):
    mods, edges = graph
    bad = []
    for m, imps in edges.items():
        allowed = EAGER_THIRD_PARTY_MODELS if layer_of(m) == "models" else EAGER_THIRD_PARTY
        for target, lazy, line in imps:
            top = target.split(".")[0]
            if lazy or top in ("dmpo_edge", "__future__") or top in sys.stdlib_module_names or top in allowed:
                continue
            bad.append(f"{_where(mods, m, line)} imports {target} at import time")
    assert not bad, ("import these inside the function that needs them (dmpo_edge._lazy.require names the extra):\n"
                     + "\n".join(bad))


def find_cycles(g: dict) -> list:
    """Every back edge of a depth-first walk of ``g`` (module -> set of modules), as the path that closes it."""
    cycles, state = [], {}

    def walk(v, path):
        state[v] = 1
        for w in sorted(g.get(v, ())):
            if state.get(w) == 1:
                cycles.append(path[path.index(w):] + [w])
            elif w not in state:
                walk(w, path + [w])
        state[v] = 2

    for m in sorted(g):
        if m not in state:
            walk(m, [m])
    return cycles


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles(graph):
    mods, edges = graph
    # Import-time edges between modules: a cycle there breaks depending on which module is imported first.
    g = {m: {_ours(t, mods) for t, lazy, _ in imps if not lazy and t.startswith("dmpo_edge")} - {None, m}
         for m, imps in edges.items()}
    # A package's __init__ importing its own submodules is how packages are built; a submodule reaching back up to
    # its package's __init__ is the cycle that matters, and it is kept.
    for m in g:
        g[m] = {t for t in g[m] if not (mods[m][1] and t.startswith(m + "."))}
    cycles = find_cycles(g)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    # Between layers the graph is a DAG even with lazy imports: MAY_IMPORT only points down.
    order = ["core", "runtime", "models", "calib", "compile", "commands"]
    for layer, may in MAY_IMPORT.items():
        assert all(order.index(t) <= order.index(layer) for t in may), layer


# Files over the size limit whose split is under way; the test below fails when one of them no longer needs to be here.
OVER_LIMIT_PENDING = {"runtime/bench.py"}
SIZE_LIMIT = 500


def test_big_files_say_why_they_are_one_piece():
    """A file in runtime/, compile/, calib/, dmpo_edge/ or benchmarks/ over 500 lines says at its top (first 40 lines)
    why it is one piece, in a sentence that names the 500 lines."""
    missing, stale = [], []
    for folder in ("runtime", "compile", "calib", "dmpo_edge", "benchmarks"):
        for dirpath, dirnames, files in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in files:
                if not f.endswith((".py", ".sh")):
                    continue
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
                with open(path, encoding="utf-8") as fh:
                    lines = fh.readlines()
                explained = "500 lines" in "".join(lines[:40])
                if rel in OVER_LIMIT_PENDING:
                    if len(lines) <= SIZE_LIMIT or explained:
                        stale.append(rel)
                elif len(lines) > SIZE_LIMIT and not explained:
                    missing.append(f"{rel} ({len(lines)} lines)")
    assert not missing, "split these along their jobs, or say at the top why each is one piece: " + ", ".join(missing)
    assert not stale, "done: remove from OVER_LIMIT_PENDING: " + ", ".join(stale)
