"""The package's layout: the pipeline's modules import in one direction (README, "How it works").

Every ``from .x import`` counts, function-level (lazy) ones included: a lazy import hides
a cycle from the interpreter, not from the reader."""
import ast
import pathlib

import lmmjax

PKG = pathlib.Path(lmmjax.__file__).parent

#: the pipeline's stages; a module may import from its own stage or lower ones
LEVELS = {
    0: ["_cache", "_compute", "_dist", "_export", "_linalg", "formula", "tables", "summary", "scaling",
        "residual", "datasets"],
    1: ["covariance"],
    2: ["likelihood"],
    3: ["design", "contrasts", "responses", "checkpoint", "kenward_roger", "start"],
    4: ["optimize", "bucketed", "batchfit"],                                # optimizers
    5: ["engine"],                                                          # the fit's entry point
    6: ["inference", "confint", "effectsize", "emmeans", "plots", "varpart"],  # on a fitted model
    7: ["results", "batchresult"],                                          # result classes
    8: ["model", "gls", "batch", "compare", "simulation", "singlecell", "cli"],  # user entry points
}
LEVEL = {m: k for k, ms in LEVELS.items() for m in ms}


def _graph() -> dict:
    files = {p.stem: p for p in PKG.glob("*.py") if p.stem != "__init__"}
    files["datasets"] = PKG / "datasets" / "__init__.py"
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and name != "datasets":
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        graph[name] = deps - {name}
    return graph


def test_every_module_has_a_stage():
    assert set(_graph()) == set(LEVEL), "add new modules to LEVELS (and to README's pipeline)"


def test_imports_point_down_the_pipeline():
    bad = [f"{m} (stage {LEVEL[m]}) imports {d} (stage {LEVEL[d]})"
           for m, deps in _graph().items() for d in deps if d in LEVEL and LEVEL[d] > LEVEL[m]]
    assert not bad, bad


def test_no_import_cycles():
    graph = _graph()
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in graph.get(m, ()):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [m, d]))
            if d in graph and d not in state:
                visit(d, path + [m])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [])
