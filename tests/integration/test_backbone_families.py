"""cache -> fit -> evaluate -> export through the real CLI for each non-CLIP backbone family.

Tiny random-weight models built offline (tests/tiny_backbones.py): SigLIP (open_clip with a
timm trunk: no [CLS], zero-shot head) and DINOv2 with registers (timm: cls + 4 registers,
linear-probe head). The open_clip ViT family runs the same pipeline in test_pipeline.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from clt_lightning.data.cache_reader import open_cache
from clt_lightning.teacher import Teacher, TeacherConfig
from tests.integration.tiny_run import quiet_cli, write_config
from tests.tiny_backbones import write_siglip_config, write_timm_kwargs

N_IMAGES = 80  # the first 80 digits train images cover all 10 classes (the probe needs each)


def teacher_section(family: str, folder: Path) -> dict:
    if family == "siglip":
        return {"model_config": str(write_siglip_config(folder))}
    return {
        "family": "timm",
        "model_name": "vit_small_patch14_reg4_dinov2",
        "model_config": str(write_timm_kwargs(folder, "dinov2_reg")),
    }


@pytest.mark.parametrize("family", ["siglip", "dinov2_reg"])
def test_cache_fit_evaluate_export(family: str, tmp_path: Path) -> None:
    teacher_cfg = teacher_section(family, tmp_path)
    config = write_config(
        tmp_path / "run.yaml",
        tmp_path / "cache",
        tmp_path / "run",
        **{
            "data.teacher": teacher_cfg,
            "data.dataset.max_images": N_IMAGES,
            "data.images_per_shard": 20,
            "data.cache_batch_size": 20,
            "data.batch_size": 64,
            "model.sparsifier": {"name": "jumprelu", "threshold_init": 0.1},
            "trainer.max_epochs": 1,
        },
    )
    args = ["--config", str(config)]
    assert quiet_cli(["cache", *args])[0] == 0
    teacher = Teacher(TeacherConfig(**teacher_cfg))
    cache = open_cache(tmp_path / "cache" / "train")
    assert cache.tokens_per_image == teacher.tokens_per_image
    assert cache.manifest["teacher"] == json.loads(json.dumps(teacher.identity()))
    code, err = quiet_cli(["fit", *args])
    assert code == 0, err
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    groups = {"siglip": ["patches"], "dinov2_reg": ["cls", "registers", "patches"]}[family]
    for group in groups:
        assert f"val/r2/{group}/mean" in metrics
    assert ("val/r2/cls/mean" in metrics) == (family != "siglip")
    out = tmp_path / "eval"
    code, err = quiet_cli(
        ["evaluate", *args, "--ckpt_path", str(ckpt), "--evaluation.output_dir", str(out),
         "--evaluation.n_images", "20", "--evaluation.classifier_cache", str(tmp_path / "cls")]
    )  # fmt: skip
    assert code == 0, err
    cascade = json.loads((out / "cascade.json").read_text())
    assert sorted(cascade["modes"]) == sorted([*groups, "all"])
    reconstruction = json.loads((out / "reconstruction.json").read_text())
    assert sorted(reconstruction) == sorted([*groups, "all"])
    probes = list((tmp_path / "cls").glob("probe-*.safetensors"))
    assert len(probes) == (1 if family == "dinov2_reg" else 0)
    code, err = quiet_cli(
        ["export", *args, "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "ct"),
         "--format", "circuit-tracer"]
    )  # fmt: skip
    assert code == 0, err
    exported = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert exported["model_kind"] == "cross_layer_transcoder"
    assert len(list((tmp_path / "ct").glob("W_dec_*.safetensors"))) == teacher.n_layers


def test_cls_filter_on_siglip_is_one_line(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "run.yaml",
        tmp_path / "cache",
        tmp_path / "run",
        **{"data.teacher": teacher_section("siglip", tmp_path), "data.token_filter": "cls"},
    )
    assert quiet_cli(["cache", "--config", str(config)])[0] == 0
    code, err = quiet_cli(["fit", "--config", str(config)])
    assert code == 2
    lines = [line for line in err.splitlines() if "token_filter" in line]
    assert lines and "no cls tokens" in lines[-1] and "['all', 'patches']" in lines[-1]


def test_unknown_timm_name_is_one_line(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "run.yaml",
        tmp_path / "cache",
        tmp_path / "run",
        **{"data.teacher": {"family": "timm", "model_name": "vit_small_patch14_dinov"}},
    )
    code, err = quiet_cli(["cache", "--config", str(config)])
    assert code == 2
    assert "did you mean" in err and "vit_small_patch14_dinov2" in err
    assert "Traceback" not in err


def test_online_fit_on_register_tokens(tmp_path: Path) -> None:
    """`source: online` with `token_filter: registers`: 4 register tokens per image trained."""
    config = write_config(
        tmp_path / "run.yaml",
        tmp_path / "cache",
        tmp_path / "run",
        **{
            "data.teacher": teacher_section("dinov2_reg", tmp_path),
            "data.source": "online",
            "data.token_filter": "registers",
            "data.batch_size": 8,
            "trainer.max_epochs": 1,
        },
    )
    code, err = quiet_cli(["fit", "--config", str(config)])
    assert code == 0, err
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val/r2/registers/mean" in header and "val/r2/patches/mean" not in header
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 16 * 4 // 8  # 16 train images x 4 registers, 8 per batch
