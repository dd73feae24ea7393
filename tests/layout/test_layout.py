"""The package's layers, read from its source: each layer imports only from the layers below it,
no module imports a private name of another, and no two modules import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pyro_vae"

#: the layers bottom-up (docs/architecture.rst draws the same table); packages of one rank
#: stand side by side and do not import each other
LAYERS = {
    "util": 0,
    "core": 1,
    "infer": 2,
    "models": 2,
    "data": 3,
    "evaluate": 4,
    "runs": 5,
    "train": 6,
    "app": 7,
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = modules()


def type_checking_only(tree: ast.AST) -> set[ast.AST]:
    """The imports under ``if TYPE_CHECKING:``: they name a type for an annotation and run no
    code, so they may name a type of a layer above (a source of the data layer is annotated
    with the run's config)."""
    return {
        node
        for block in ast.walk(tree)
        if isinstance(block, ast.If)
        and isinstance(block.test, ast.Name)
        and block.test.id == "TYPE_CHECKING"
        for statement in block.body
        for node in ast.walk(statement)
    }


def imports(path: Path, annotations: bool = True) -> list[tuple[str, list[str], int]]:
    """(module imported, names imported from it, line) for every import in the file, at any
    depth (an import inside a function counts as much as one at the top); with
    ``annotations=False`` not those under ``if TYPE_CHECKING:``."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    skipped = set() if annotations else type_checking_only(tree)
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            names = [alias.name for alias in node.names]
            # "from pyro_vae.x import module" imports the module x.module
            target = node.module or ""
            for name in names:
                if f"{target}.{name}" in MODULES:
                    found.append((f"{target}.{name}", [], node.lineno))
            found.append(
                (target, [n for n in names if f"{target}.{n}" not in MODULES], node.lineno)
            )
        elif isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
    return [
        (module, names, line)
        for module, names, line in found
        if module == "pyro_vae" or module.startswith("pyro_vae.")
    ]


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_belongs_to_a_layer():
    loose = [
        m
        for m in MODULES
        if m.count(".") >= 1
        and layer(m) is None
        and m not in ("pyro_vae.__main__", "pyro_vae.cli", "pyro_vae.lightning")
    ]
    assert not loose, f"modules outside the layer packages: {loose}"


def test_each_layer_imports_only_from_the_layers_below():
    wrong = []
    for module, path in MODULES.items():
        own = layer(module)
        if own is None:
            continue  # the top-level package and its entry points may import anything
        for target, _, line in imports(path, annotations=False):
            theirs = layer(target)
            if theirs is None:
                wrong.append(f"{module}:{line} imports the top-level package {target}")
            elif theirs != own and LAYERS[theirs] >= LAYERS[own]:
                wrong.append(f"{module}:{line} ({own}) imports {target} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_no_private_name_crosses_a_module():
    wrong = [
        f"{module}:{line} imports {target}.{name}"
        for module, path in MODULES.items()
        for target, names, line in imports(path)
        if target != module
        for name in names
        if name.startswith("_")
    ]
    assert not wrong, "\n".join(wrong)


def resolve(target: str) -> str:
    """The module an import names (``pyro_vae.runs`` for a name it exports)."""
    while target not in MODULES and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def test_no_import_cycle():
    graph = {
        module: {resolve(t) for t, _, _ in imports(path, annotations=False)} - {module}
        for module, path in MODULES.items()
    }
    # a package's __init__ re-exports its modules: an edge into the package is an edge into
    # what it re-exports, so a module importing its own package's __init__ is a cycle
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # the top-level package imports lazily from everywhere: leave it out of the cycles
    cycles = [c for c in cycles if not c.startswith("pyro_vae ->") and " pyro_vae ->" not in c]
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize(
    "rule",
    [
        test_each_layer_imports_only_from_the_layers_below,
        test_no_private_name_crosses_a_module,
        test_no_import_cycle,
    ],
)
def test_the_checks_catch_a_violation(rule, tmp_path, monkeypatch):
    """Each rule fails on a package that breaks it (so a passing rule means something)."""
    bad = {
        test_each_layer_imports_only_from_the_layers_below: (
            "pyro_vae.util.bad",
            "from pyro_vae.train.fit import fit\n",
        ),
        test_no_private_name_crosses_a_module: (
            "pyro_vae.util.bad",
            "from pyro_vae.util.io import _private\n",
        ),
        test_no_import_cycle: ("pyro_vae.util.bad", "import pyro_vae.util.bad2\n"),
    }[rule]
    path = tmp_path / "bad.py"
    path.write_text(bad[1])
    extra = {bad[0]: path}
    if rule is test_no_import_cycle:
        other = tmp_path / "bad2.py"
        other.write_text("import pyro_vae.util.bad\n")
        extra["pyro_vae.util.bad2"] = other
    monkeypatch.setattr(f"{__name__}.MODULES", {**MODULES, **extra})
    with pytest.raises(AssertionError):
        rule()


def test_the_console_script_names_a_function_that_exists():
    """``pyro-vae`` (setup.cfg's entry point) names a module and function of the package."""
    import configparser
    import importlib

    setup = configparser.ConfigParser()
    setup.read(PACKAGE.parent / "setup.cfg")
    scripts = [
        line.split("=", 1)
        for line in setup["options.entry_points"]["console_scripts"].strip().splitlines()
    ]
    assert [name.strip() for name, _ in scripts] == ["pyro-vae"]
    for _, target in scripts:
        module, function = target.strip().split(":")
        assert callable(getattr(importlib.import_module(module), function))
