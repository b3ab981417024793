"""The README's file tree names every module of the package, and only files that exist.

A module moved or added without its README line fails here, so the tree a newcomer reads
first is the tree they get.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LISTED_FOLDERS = ("clt_lightning", "benchmarks", "experiments")


def readme_paths() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Files", 1)[1].split("```", 2)[1]
    return [line.split()[0] for line in block.splitlines() if line.strip()]


def expand(path: str) -> list[str]:
    """`a/{x,y}_{1,2}.yaml` -> the four names it stands for."""
    parts = re.split(r"\{([^}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def test_every_listed_path_exists():
    missing = [p for line in readme_paths() for p in expand(line) if not (ROOT / p).exists()]
    assert missing == []


def test_every_module_is_listed_once():
    listed = [p for line in readme_paths() for p in expand(line)]
    modules = sorted(
        p.relative_to(ROOT).as_posix()
        for folder in LISTED_FOLDERS
        for p in (ROOT / folder).rglob("*.py")
        if p.name != "__init__.py"  # a package marker; listed only when it holds code
    )
    assert [m for m in modules if m not in listed] == []
    assert sorted(p for p in listed if listed.count(p) > 1) == []
