"""The package's imports point one way: the layers of docs/architecture.md ("Data flow").

A module may import modules of its own layer or of a layer above it; an import that
points downstream (e.g. the data layer importing the training layer) fails here.
Imports under `if TYPE_CHECKING:` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "clt_lightning"

LAYERS = [  # upstream first; each entry a module name or a subpackage
    {"errors", "messages", "files", "hashing", "tokens", "checkpoint_contents", "metrics"},
    {"teacher", "teacher_loading", "teacher_checks", "backbones"},
    {"data"},
    {"models"},
    {"module", "checkpointing", "loggers"},
    {"evaluation"},
    {"commands", "features", "callbacks", "dashboard"},
    {"cli"},
]


def layer_of(module: str) -> int:
    """`clt_lightning.data.cache_format` -> the index of the layer holding `data`."""
    top = module.split(".")[1] if "." in module else ""
    return next(i for i, names in enumerate(LAYERS) if top in names)


def runtime_imports(path: Path) -> list[str]:
    """Package modules imported by `path`, skipping `if TYPE_CHECKING:` blocks."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith(
                "clt_lightning"
            ):
                module = child.module
                found.extend(f"{module}.{a.name}" if module == "clt_lightning" else module
                             for a in child.names)  # fmt: skip
            elif isinstance(child, ast.Import):
                found.extend(a.name for a in child.names if a.name.startswith("clt_lightning."))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_module_has_a_layer():
    names = {module_name(p) for p in PACKAGE.rglob("*.py") if module_name(p) != "clt_lightning"}
    unplaced = sorted(n for n in names if not any(n.split(".")[1] in s for s in LAYERS))
    assert unplaced == []


def test_imports_point_upstream():
    downstream = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        if importer == "clt_lightning":
            continue
        for imported in runtime_imports(path):
            if layer_of(imported) > layer_of(importer):
                downstream.append(f"{importer} imports {imported}")
    assert downstream == []
