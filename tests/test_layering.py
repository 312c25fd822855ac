"""The import boundaries of shared/DESIGN.md section 2: ``modeling/`` is pure PyTorch (no fvcore,
config, data or engine), ``data/`` does not import the models."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "projects" / "BoxTeacher" / "boxteacher"


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules a file of the package imports (relative imports resolved)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]  # a module's package; for an __init__.py, its own
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


FORBIDDEN = {
    "modeling": (
        "fvcore",
        "yacs",
        "boxteacher.config",
        "boxteacher.data",
        "boxteacher.engine",
        "boxteacher.evaluation",
        "boxteacher.build",
    ),
    "data": ("boxteacher.modeling", "boxteacher.engine", "boxteacher.build"),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_stay_inside_its_boundary(layer):
    offending = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for name in imported_modules(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer])
    }
    assert not offending, f"{layer}/ imports across its boundary: {sorted(offending)}"


def test_the_checker_sees_relative_imports():
    names = imported_modules(PACKAGE / "modeling" / "teacher.py")
    assert "boxteacher.geometry.resized_shape" in names and "boxteacher.modeling.layers" in names


def test_the_detector_imports_no_teacher_or_pseudo_label_code():
    """CondInst is taught through a teacher view (modeling/teacher.py) and learns from criteria:
    the detector itself knows neither the teacher nor the pseudo labels."""
    teacher_side = ("teacher", "pseudo_labels", "boxteacher", "guided_filter")
    names = imported_modules(PACKAGE / "modeling" / "meta_arch.py")
    offending = sorted(
        n
        for n in names
        for t in teacher_side
        if n == f"boxteacher.modeling.{t}" or n.startswith(f"boxteacher.modeling.{t}.")
    )
    assert not offending, offending
