"""The package's layering, kept by a test (issue 19): module-level imports between bayestwin's
modules form no cycle, and each layer imports only the layers below it at module level.

Order, bottom to top: errors and small utilities -> data -> families -> engine -> population,
twin, forecast, decision, dosing -> review, trials -> io -> zoo -> cli. An import inside a
function may reach up (``Population.save`` imports ``io``; ``io.load`` builds a ``Population``):
that is how the few convenience methods are written, and it creates no import-order dependence.
One back edge is banned outright: ``io`` resolving model-zoo names (``zoo`` depends on ``io``; the
name lookup lives in :func:`bayestwin.zoo.load`).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "bayestwin"

#: The lowest layer each module may be in (prefix match, longest wins).
LAYERS = {
    "bayestwin.errors": 0,
    "bayestwin._atomic": 0,
    "bayestwin._memory": 0,
    "bayestwin.cache": 0,  # the compiled-program cache: jax and platformdirs only
    "bayestwin.settings": 0,  # options and progress bars: tqdm only
    "bayestwin.tomlspec": 0,
    "bayestwin.decision": 0,
    "bayestwin.data": 1,
    "bayestwin.families": 2,
    "bayestwin.engine": 3,
    "bayestwin.review.convergence": 3,  # the gate every fit and twin applies
    "bayestwin.review.batched": 3,
    "bayestwin.review.advice": 3,
    "bayestwin.review.twins": 3,  # per-twin diagnostics the engine's conditioning computes
    "bayestwin.io": 3,  # module level: only errors and _atomic; builds objects lazily
    "bayestwin.population": 4,
    "bayestwin.twin": 4,
    "bayestwin.forecast": 4,
    "bayestwin.dosing": 4,
    "bayestwin.review": 5,
    "bayestwin.trials": 5,
    "bayestwin.engine.many": 5,  # twins at scale sit above Population
    "bayestwin.federated": 5,  # fits across sites: above Population (ep.py itself is pure maths)
    "bayestwin.privacy": 5,  # private_fit builds a Population; module level: errors only
    "bayestwin.zoo": 6,
    "bayestwin.trials.cli": 7,
    "bayestwin.cli": 7,
}


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    known = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    if not known:
        pytest.fail(f"{module} has no layer: add it to LAYERS in tests/test_layers.py")
    return LAYERS[max(known, key=len)]


MODULES = {_name(p): p for p in ROOT.rglob("*.py")}


def _imports(module: str, lazy: bool) -> set[str]:
    """bayestwin modules imported by ``module``: at module level, or (``lazy``) anywhere."""
    tree = ast.parse(MODULES[module].read_text())
    nodes = ast.walk(tree) if lazy else tree.body
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bayestwin"):
            for alias in node.names:  # `from bayestwin import decision` imports a submodule
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("bayestwin")}
    return out - {module}


def test_module_level_imports_form_no_cycle():
    graph = {m: {d for d in _imports(m, lazy=False) if d in MODULES} for m in MODULES}
    inits = {m for m in MODULES if MODULES[m].name == "__init__.py"}
    seen, stack = set(), []

    def visit(m):  # a package's __init__ re-exports its modules: edges into it are not cycles
        if m in stack:
            raise AssertionError(" -> ".join([*stack[stack.index(m) :], m]))
        if m in seen:
            return
        stack.append(m)
        for d in graph[m]:
            if d not in inits or d == "bayestwin":
                visit(d)
        stack.pop()
        seen.add(m)

    for m in sorted(MODULES):
        if m not in inits:
            visit(m)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if MODULES[m].name != "__init__.py"))
def test_each_module_imports_only_lower_layers_at_module_level(module):
    up = [d for d in _imports(module, lazy=False) if d in MODULES and _layer(d) > _layer(module)]
    up = [d for d in up if MODULES[d].name != "__init__.py" or d == "bayestwin"]
    assert not up, f"{module} (layer {_layer(module)}) imports {up} at module level"


def test_io_never_resolves_zoo_names():
    assert "bayestwin.zoo" not in _imports("bayestwin.io", lazy=True)
