"""The package's shape: stage packages do not import each other, foundations import no stage, at most two levels.

Read from the source with ``ast`` (imports inside functions count too), so a lazy import cannot slip past.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "alignment"
STAGES = ("select", "train", "evaluate")
DRIVERS = ("cli", "pipeline", "search", "report")  # above the stages: they may import them


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def dotted(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every ``alignment.*`` module ``path`` imports, relative imports resolved, ``from x import y`` as x.y too."""
    here = dotted(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m == "alignment" or m.startswith("alignment.")}


def top(module: str) -> str | None:
    """The part of the package a module belongs to: a stage, a driver or a foundation's own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_stage_imports_another_and_no_foundation_imports_a_stage(path):
    own = top(dotted(path))
    reached = {top(m) for m in imported(path)} - {None, own}
    if own in STAGES:
        assert not reached & (set(STAGES) | set(DRIVERS)), f"{path}: a stage package imports {reached}"
    elif own not in DRIVERS:
        assert not reached & (set(STAGES) | set(DRIVERS)), f"{path}: a foundation imports {reached}"


def test_the_checker_sees_a_stage_importing_another(tmp_path, monkeypatch):
    # The rule above is only as good as ``imported``: a relative import across packages must resolve.
    fake = tmp_path / "alignment" / "select" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ..train import fit\n    from .. import models\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "alignment")
    assert {"alignment.train", "alignment.train.fit", "alignment.models"} <= imported(fake)


def test_at_most_two_levels():
    deep = [p for p in modules() if len(p.relative_to(PACKAGE).parts) > 3]
    assert not deep, f"modules deeper than alignment/<package>/<package>/: {deep}"
