"""The package's layering rules, checked on the source: diffusion/ is pure tensor math; entry points share
``utils`` instead of importing each other; callbacks and entry points ask the model, not its network."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffusion_lightning"
ENTRY_POINTS = ["train", "sample", "evaluate", "report", "bench"]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against the package)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "diffusion").glob("*.py")), ids=lambda p: p.name)
def test_diffusion_imports_no_lightning_nor_hydra(path):
    bad = {m for m in imported_modules(path) if m.split(".")[0] in ("lightning", "pytorch_lightning", "hydra",
                                                                     "omegaconf")}  # fmt: skip
    bad |= {m for m in imported_modules(path) if m.startswith("diffusion_lightning.") and not
            m.startswith("diffusion_lightning.diffusion")}  # fmt: skip
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_points_do_not_import_each_other(entry):
    others = {f"diffusion_lightning.{e}" for e in ENTRY_POINTS if e != entry}
    imported = imported_modules(PACKAGE / f"{entry}.py")
    assert not imported & others, f"{entry}.py imports {sorted(imported & others)}"


@pytest.mark.parametrize(
    "path", [*sorted((PACKAGE / "callbacks").glob("*.py")), PACKAGE / "sample.py", PACKAGE / "evaluate.py"],
    ids=lambda p: p.name,
)
def test_callbacks_and_entry_points_ask_the_model_not_its_network(path):
    """No ``<module>.net.`` (image size, classes, channels) and no ``.diffusion`` table outside the model."""
    source = path.read_text()
    assert not re.findall(r"\.net\.\w+|\.diffusion\.\w+", source), path.name
