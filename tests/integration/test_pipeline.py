"""The whole pipeline through the real `clt` CLI on a tiny teacher and a made ImageFolder.

cache -> fit -> evaluate -> export -> retrieve, each checked against an independent
computation: cached activations against open_clip's own `ln_2`/`mlp` outputs, the exported
CLT against the checkpoint's, the evaluation files against the contracts in docs/metrics.md.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from clt_lightning.cli import main
from clt_lightning.data.cache_reader import open_cache
from clt_lightning.models.clt import CrossLayerTranscoder

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CLASSES = ("circle", "square", "stripes")


def _draw(kind: str, rng: np.random.Generator) -> Image.Image:
    size = 40
    img = np.zeros((size, size, 3), dtype=np.uint8)
    colour = rng.integers(80, 255, size=3)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(12, 28, size=2)
    if kind == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(40, 120)
    elif kind == "square":
        r = rng.integers(5, 10)
        mask = (abs(yy - cy) < r) & (abs(xx - cx) < r)
    else:
        mask = (xx // rng.integers(3, 6)) % 2 == 0
    img[mask] = colour
    return Image.fromarray(img)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An ImageFolder (train/val x 3 classes), a weights file and a run YAML."""
    root = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for kind in CLASSES:
            folder = root / "images" / split / kind
            folder.mkdir(parents=True)
            for i in range(n):
                _draw(kind, rng).save(folder / f"{i}.png")
    config = json.loads((FIXTURES / "tiny-vit.json").read_text())
    torch.manual_seed(3)
    model = open_clip.CLIP(**config)
    weights = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    run = {
        "seed_everything": 0,
        "model": {
            "n_latents": 64,
            "lr": 3e-3,
            "warmup_steps": 2,
            "sparsifier": {"name": "abs_topk", "k": 8},
        },
        "data": {
            "teacher": {"model_config": str(FIXTURES / "tiny-vit.json"), "weights": str(weights)},
            "dataset": {"name": "imagefolder", "root": str(root / "images")},
            "cache_dir": str(root / "cache"),
            "batch_size": 51,
            "images_per_shard": 4,
        },
        "trainer": {
            "default_root_dir": str(root / "run"),
            "max_epochs": 2,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
        },
    }
    (root / "run.yaml").write_text(yaml.safe_dump(run))
    return {"root": root, "config": root / "run.yaml", "weights": weights, "run": root / "run"}


def _open_clip_activations(
    weights: Path, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (ln_2 output) and y (mlp output) [N, T, L, d] from open_clip's own modules via hooks."""
    config = json.loads((FIXTURES / "tiny-vit.json").read_text())
    model = open_clip.CLIP(**config).eval()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(weights))
    xs, ys = [], []
    hooks = []
    for block in model.visual.transformer.resblocks:
        hooks.append(block.ln_2.register_forward_hook(lambda m, i, o: xs.append(o)))
        hooks.append(block.mlp.register_forward_hook(lambda m, i, o: ys.append(o)))
    with torch.no_grad():
        model.encode_image(images)
    for h in hooks:
        h.remove()
    return torch.stack(xs, dim=2), torch.stack(ys, dim=2)


def test_cache_matches_open_clip_modules(workspace: dict[str, Path]) -> None:
    assert main(["cache", "--config", str(workspace["config"])]) == 0
    cache = open_cache(workspace["root"] / "cache" / "train")
    assert cache.n_images == 24 and cache.n_layers == 3 and cache.d_model == 32
    shard = cache.load_shard(0)
    from clt_lightning.data.datasets import DatasetConfig, build_dataset
    from clt_lightning.teacher import Teacher, TeacherConfig

    teacher = Teacher(
        TeacherConfig(
            model_config=str(FIXTURES / "tiny-vit.json"), weights=str(workspace["weights"])
        )
    )
    dataset = build_dataset(
        DatasetConfig(name="imagefolder", root=str(workspace["root"] / "images")),
        "train",
        teacher.preprocess,
    )
    ids = shard["image_id"].tolist()
    images = torch.stack([dataset[i][0] for i in ids])
    x_ref, y_ref = _open_clip_activations(workspace["weights"], images)
    assert shard["x"].dtype == torch.float16
    torch.testing.assert_close(shard["x"].float(), x_ref, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(shard["y"].float(), y_ref, atol=2e-3, rtol=1e-3)
    assert shard["label"].tolist() == [dataset[i][1] for i in ids]


def test_fit_logs_per_layer_metrics_and_checkpoints(workspace: dict[str, Path]) -> None:
    assert main(["fit", "--config", str(workspace["config"])]) == 0
    run = workspace["run"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    with open(run / "metrics.csv") as f:
        header = next(csv.reader(f))
    for key in ("train/loss", "val/r2/layer_02", "val/r2/cls/layer_00", "val/mse/patches/mean"):
        assert key in header
    assert any((run / "wandb").glob("offline-run-*"))


def test_evaluate_writes_tables_and_figures(workspace: dict[str, Path]) -> None:
    ckpt = workspace["run"] / "checkpoints" / "last.ckpt"
    assert main(["evaluate", "--config", str(workspace["config"]), "--ckpt_path", str(ckpt)]) == 0
    out = workspace["run"] / "evaluation"
    for name in (
        "run.json",
        "cascade.json",
        "faithfulness.json",
        "contributions.json",
        "ablations.json",
        "reconstruction.json",
        "cascade.png",
        "contributions.png",
        "reconstruction.png",
        "cascade_top1.md",
        "faithfulness.md",
    ):
        assert (out / name).is_file(), name
    contributions = json.loads((out / "contributions.json").read_text())
    for group in ("cls", "patches"):
        column_sums = np.nansum(np.array(contributions[group], dtype=float), axis=0)
        np.testing.assert_allclose(column_sums, 1.0, atol=1e-6)
    cascade = json.loads((out / "cascade.json").read_text())
    assert set(cascade["modes"]) == {"cls", "patches", "all"}
    assert len(cascade["modes"]["cls"]["top1"]) == 3


def test_export_round_trip_on_raw_activations(workspace: dict[str, Path]) -> None:
    ckpt = workspace["run"] / "checkpoints" / "last.ckpt"
    out = workspace["root"] / "exported"
    assert (
        main(
            [
                "export",
                "--config",
                str(workspace["config"]),
                "--ckpt_path",
                str(ckpt),
                "--output_dir",
                str(out),
            ]
        )
        == 0
    )
    from clt_lightning.commands import load_clt

    original = load_clt(ckpt)
    exported = CrossLayerTranscoder.from_pretrained(out)
    x = open_cache(workspace["root"] / "cache" / "val").load_shard(0)["x"].float().flatten(0, 1)
    with torch.no_grad():
        torch.testing.assert_close(exported(x).y_hat, original(x).y_hat, atol=1e-4, rtol=1e-4)


def test_retrieve_writes_grid_and_neighbours(workspace: dict[str, Path]) -> None:
    ckpt = workspace["run"] / "checkpoints" / "last.ckpt"
    assert (
        main(
            [
                "retrieve",
                "--config",
                str(workspace["config"]),
                "--ckpt_path",
                str(ckpt),
                "--retrieval.query_index",
                "2",
                "--retrieval.k",
                "2",
            ]
        )
        == 0
    )
    folder = workspace["run"] / "retrieval"
    grids = list(folder.glob("retrieval_*.png"))
    assert grids and Image.open(grids[0]).size[0] > 300
    neighbours = json.loads(next(folder.glob("retrieval_*.json")).read_text())
    assert [layer["layer"] for layer in neighbours["layers"]] == [0, 1, 2]
    for layer in neighbours["layers"]:
        scores = [n["score"] for n in layer["neighbours"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True)
        assert all(n["class"] in CLASSES for n in layer["neighbours"])
