"""The package layout's import rules (clf_core/__init__.py): an import goes down or to the base,
never up, and training/ and labeling/ never import each other. Checked from the source (every
import statement, at module level or inside a function), so a rule broken anywhere fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "clf_core"
ALLOWED = {                        # room -> rooms it may import (the base always)
    "base": set(),
    "model": set(),
    "review": set(),
    "training": {"model", "review"},
    "labeling": {"model", "review"},
}


def room(module: str) -> str:
    """clf_core.labeling.table -> labeling; clf_core.storage -> base."""
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in ALLOWED else "base"


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clf_core"):
            found += [node.module] if node.module.count(".") >= 1 else [f"clf_core.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("clf_core")]
    return found


def modules() -> list[tuple[str, Path]]:
    return [(".".join(("clf_core", *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__"), p)
            for p in sorted(ROOT.rglob("*.py"))]


@pytest.mark.parametrize("module,path", modules(), ids=[m for m, _ in modules()])
def test_imports_go_down_never_up(module, path):
    here = room(module)
    wrong = [m for m in imports(path) if room(m) != "base" and room(m) != here and room(m) not in ALLOWED[here]]
    assert not wrong, f"{module} ({here}) imports {wrong}: {here} may import {sorted(ALLOWED[here]) or 'only'} the base"


def test_the_rule_check_can_fail(tmp_path):
    bad = tmp_path / "clf_core" / "model" / "x.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from clf_core.labeling.table import LabeledTable\nfrom clf_core import storage\n"
                   "def f():\n    from clf_core.training import job\n")
    assert [m for m in imports(bad) if room(m) not in ("base", "model")] == ["clf_core.labeling.table",
                                                                            "clf_core.training"]


def test_every_folder_says_what_it_holds_and_may_import():
    for package in ("model", "review", "training", "labeling"):
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text())) or ""
        assert "May import" in doc, package
        for module in sorted(p.stem for p in (ROOT / package).glob("*.py") if p.stem != "__init__"):
            assert module in doc, f"clf_core/{package}/__init__.py does not mention {module}"
