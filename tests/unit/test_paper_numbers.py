"""`experiments.paper_numbers` against a fresh parse of the paper's text in `shared/paper/`.

The shared folder sits beside the repository (`<repo>/../shared`, in CI too); the cross-checks
skip where it is absent. The structural tests run everywhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from experiments import paper_numbers as pn

PAPER_DIR = Path(__file__).parents[2].parent / "shared" / "paper"
SUPPLEMENTARY = PAPER_DIR / "supplementary.txt"
FACTS = PAPER_DIR / "facts.md"

DATASET_KEYS = {"CIFAR-100": "cifar100", "COCO": "coco", "ImageNet-100": "imagenet100"}
MODE_KEYS = {"CLS": "cls", "Patches": "patches", "All": "all"}
needs_supplementary = pytest.mark.skipif(
    not SUPPLEMENTARY.is_file(), reason=f"{SUPPLEMENTARY} not present"
)
needs_facts = pytest.mark.skipif(not FACTS.is_file(), reason=f"{FACTS} not present")


def _table_blocks(text: str) -> dict[int, tuple[str, list[list[str]]]]:
    """Table number -> (caption, tab-separated rows up to the first blank line after them)."""
    blocks: dict[int, tuple[str, list[list[str]]]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"Table (\d+)\. (.*)", line)
        if not match:
            continue
        rows: list[list[str]] = []
        for row in lines[i + 1 :]:
            if row.startswith("Table ") or (rows and not row.strip()):
                break
            if "\t" in row:
                rows.append(row.split("\t"))
        blocks[int(match.group(1))] = (match.group(2), rows)
    return blocks


@pytest.fixture(scope="module")
def supplementary_tables() -> dict[int, tuple[str, list[list[str]]]]:
    return _table_blocks(SUPPLEMENTARY.read_text(encoding="utf-8"))


def test_grid_is_complete_and_rectangular() -> None:
    keys = {(t.dataset, t.backbone, t.mode) for t in pn.CASCADE_TABLES}
    assert len(keys) == 18
    assert [t.number for t in pn.CASCADE_TABLES] == list(range(6, 24))
    for table in pn.CASCADE_TABLES:
        assert len(table.rows) == pn.N_LAYERS
        assert all(len(row) == 3 for row in table.rows)
    assert pn.paper_top1("cifar100", "b32", "patches", "abs_topk")[0] == 48.68
    assert pn.paper_top1("digits", "b32", "cls", "jumprelu") is None
    assert pn.paper_top1("cifar100", "b32", "cls", "batch_topk") is None


def test_published_regularities_hold() -> None:
    """11->11 rows of [CLS] and all tokens coincide; the poster's CLS column sums to 1."""
    for dataset in pn.DATASETS:
        for backbone in pn.BACKBONES:
            cls_rows = pn.cascade_table(dataset, backbone, "cls").rows
            all_rows = pn.cascade_table(dataset, backbone, "all").rows
            assert cls_rows[-1] == all_rows[-1]
    assert sum(pn.CLS_LAST_TARGET_CONTRIBUTIONS) == pytest.approx(1.0, abs=1e-9)


@needs_supplementary
def test_cascade_tables_match_supplementary(supplementary_tables) -> None:
    caption_re = re.compile(r"on (\S+) for ViT-B/(\d+) with (\w+) tokens")
    for number in range(6, 24):
        caption, rows = supplementary_tables[number]
        dataset, patch, mode = caption_re.search(caption).groups()
        table = pn.cascade_table(DATASET_KEYS[dataset], f"b{patch}", MODE_KEYS[mode])
        assert table is not None and table.number == number
        assert rows[0] == ["Range", "JR", "RTK", "ATK"]
        assert [r[0] for r in rows[1:]] == [f"{s}→11" for s in range(12)]
        parsed = tuple(tuple(float(v) for v in r[1:]) for r in rows[1:])
        assert parsed == table.rows, f"Table {number}"


@needs_supplementary
def test_baselines_match_captions(supplementary_tables) -> None:
    caption_re = re.compile(r"on (\S+) for .*ViT-B/32: ([\d.]+) and ViT-B/16: ([\d.]+)\.")
    for number in range(6, 24):
        dataset, b32, b16 = caption_re.search(supplementary_tables[number][0]).groups()
        assert pn.BASELINE_TOP1[(DATASET_KEYS[dataset], "b32")] == float(b32)
        assert pn.BASELINE_TOP1[(DATASET_KEYS[dataset], "b16")] == float(b16)


@needs_supplementary
def test_table5_matches_supplementary(supplementary_tables) -> None:
    _, rows = supplementary_tables[5]
    data = [r for r in rows if re.match(r"\d", r[0])]
    assert len(data) == len(pn.FAITHFULNESS)
    for row, ours in zip(data, pn.FAITHFULNESS, strict=True):
        window, mode = re.match(r"([\d-]+) \^\{(\w+)\}", row[0]).groups()
        assert (ours["window"], ours["mode"]) == (window, MODE_KEYS[mode])
        assert ours["start"] == int(window.split("-")[0])
        values = [float(v.rstrip("%")) for v in row[1:]]  # ".034" and "+0.07" parse as is
        assert values == [ours[m] for m in pn.FAITHFULNESS_METRICS], row[0]


@needs_facts
def test_poster_numbers_match_facts() -> None:
    text = FACTS.read_text(encoding="utf-8")
    names = {"CIFAR-100": "cifar100", "COCO": "coco", "ImageNet-100": "imagenet100"}
    ablations = re.findall(r"\| (\S+) \| (all|CLS) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", text)
    assert len(ablations) == len(pn.ABLATIONS)
    for (dataset, mode, *values), row in zip(ablations, pn.ABLATIONS, strict=True):
        assert (row.dataset, row.mode) == (names[dataset], mode.lower())
        assert [row.baseline, row.drop_top1, row.keep_topk] == [float(v) for v in values]
    assert "keep top-4" in text and pn.ABLATION_K == 4

    recon = re.findall(r"(CIFAR-100|ImageNet-100) B/(\d+): (.*)", text)
    assert len(recon) == 2
    sparsifiers = {"JumpReLU": "jumprelu", "ReLU-TopK": "relu_topk", "Abs-TopK": "abs_topk"}
    n_checked = 0
    for dataset, patch, line in recon:
        for name, mse, r2, cos in re.findall(r"([\w-]+) (\.\d+)/(\.\d+)/(\.\d+)", line):
            key = (names[dataset], f"b{patch}", sparsifiers[name])
            assert pn.RECONSTRUCTION_AVERAGES[key] == (float(mse), float(r2), float(cos))
            n_checked += 1
    assert n_checked == len(pn.RECONSTRUCTION_AVERAGES) == 6

    cls_line = re.search(r"sources L0\.\.L11\):\s*\n\s*((?:\.\d+ ?)+)", text).group(1)
    assert tuple(float(v) for v in cls_line.split()) == pn.CLS_LAST_TARGET_CONTRIBUTIONS
    patches_line = re.search(r"diagonal dominates \(([^)]*)\)", text).group(1)
    assert tuple(float(v) for v in patches_line.split()) == pn.PATCHES_DIAGONAL_CONTRIBUTIONS
