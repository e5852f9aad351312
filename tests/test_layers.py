"""The package's layers, as the README's Development section lists them: a module imports only
from its own layer and those below it (function-level imports included), and nothing below
`runtime/` imports Ray (the model, its parallel layout and the trainer are plain torch)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moe_ray"
# Bottom up: each entry is a top-level module or package of moe_ray.
LAYERS = [
    {"config", "secrets", "system"},
    {"model", "balance", "data", "spec", "tracking", "plots"},
    {"parallel", "sizing"},
    {"train", "storage"},
    {"inference", "speculative"},
    {"hf"},
    {"runtime"},
    {"submit", "console", "cli"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported module's dotted name, line) of every import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "moe_ray":  # `from moe_ray import submit`: the names are modules
                found += [(f"moe_ray.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((node.module, node.lineno))
    return found


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if top != "__init__":
            yield path, top


def test_every_module_has_a_layer():
    assert {top for _, top in modules()} == set(LAYER)


def test_lower_layers_never_import_upper_ones():
    wrong = []
    for path, top in modules():
        for name, line in imports_of(path):
            parts = name.split(".")
            if parts[0] == "moe_ray" and len(parts) > 1 and LAYER[parts[1]] > LAYER[top]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({top}) imports {name}")
            if parts[0] == "ray" and LAYER[top] < LAYER["runtime"]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({top}, below runtime) imports {name}")
    assert wrong == []


def test_the_checker_sees_an_upward_and_a_function_level_import(tmp_path):
    source = "import torch\n\ndef f():\n    from moe_ray.runtime.driver import run_job\n    import ray.train\n"
    (tmp_path / "m.py").write_text(source)
    assert imports_of(tmp_path / "m.py") == [("torch", 1), ("moe_ray.runtime.driver", 4), ("ray.train", 5)]
