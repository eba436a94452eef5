"""The package's layout rules: no import cycle between modules, no argparse below the CLI,
one interface per kind of thing (adapters, methods, criteria, commands), old import paths
still working."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pyengine"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _top_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """pyengine modules imported at module level (what runs when the module is imported)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()

    def add(mod: str):
        while mod and mod not in known:
            mod = mod.rsplit(".", 1)[0] if "." in mod else ""
        if mod and mod != name:
            out.add(mod)

    for node in tree.body:  # module level only: imports inside functions run later
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pyengine"):
                    add(a.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if not base.startswith("pyengine"):
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                add(full if full in known else base)
    return out


def test_no_import_cycle_between_modules():
    mods = _modules()
    known = set(mods)
    graph = {m: _top_level_imports(m, p, known) for m, p in mods.items()}
    # a package's __init__ importing its own submodules is not a cycle of concern
    cycles = []
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph[m]:
            if n.startswith(m + ".") or m.startswith(n + "."):
                continue
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif state.get(n) is None:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if state.get(m) is None:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_argparse_below_the_cli():
    bad = []
    for name, path in _modules().items():
        if name.startswith("pyengine.cli"):
            continue
        text = path.read_text()
        if "argparse" in text:
            bad.append(name)
    assert not bad, f"argparse outside pyengine.cli: {bad}"


def test_every_kind_of_thing_has_one_registry():
    from pyengine.cli import COMMANDS, command
    from pyengine.methods.base import Method, methods
    from pyengine.methods.criteria import CRITERIA, criteria
    from pyengine.models import Adapter, adapters

    assert {a.name for a in adapters()} >= {"vit", "resnet"}
    assert all(isinstance(a, Adapter) for a in adapters())
    assert set(CRITERIA) == set(criteria()) == {"magnitude", "wanda", "ria", "taylor", "agf",
                                                "random"}
    # every criterion is also a one-shot method; every method is a Method
    assert set(CRITERIA) | {"hiap", "sss"} == set(methods())
    assert all(isinstance(m, Method) for m in methods().values())
    for name in COMMANDS:
        assert callable(command(name).run)


@pytest.mark.parametrize("old, new", [
    ("pyengine.importance", "pyengine.methods.criteria"),
    ("pyengine.allocate", "pyengine.structure.solver"),
    ("pyengine.optim", "pyengine.methods.apg"),
    ("pyengine.hiap", "pyengine.methods.hiap"),
    ("pyengine.spec", "pyengine.structure.spec"),
])
def test_old_import_paths_are_the_new_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)
    # and the module keeps its own identity
    assert importlib.import_module(new).__spec__.name == new


def test_old_module_names_do_not_shadow_public_functions():
    import pyengine
    import pyengine.spec  # noqa: F401  (the old module path of the Spec classes)
    assert callable(pyengine.spec) and pyengine.spec.__module__ == "pyengine.api"


def test_readme_python_api_imports():
    from pyengine.allocate import allocate  # noqa: F401
    from pyengine.importance import calibrate, score  # noqa: F401
    from pyengine.train import fit  # noqa: F401
    import pyengine
    assert callable(pyengine.optim.APG)
