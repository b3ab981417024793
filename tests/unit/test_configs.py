"""Every shipped config parses and instantiates through the real CLI parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from clt_lightning.callbacks import EvaluationCallback, RetrievalCallback
from clt_lightning.cli import build_cli
from clt_lightning.data.datamodule import ActivationDataModule
from clt_lightning.module import CLTModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml"))
PAPER = [p for p in RUN_CONFIGS if p.stem.split("_")[1:2] in (["b32"], ["b16"])]
EXAMPLES = {
    "imagenet100_siglip_b16_abs_topk": "open_clip",
    "imagenet100_dinov2_b14_abs_topk": "timm",
}


def test_all_paper_runs_are_shipped() -> None:
    names = {p.stem for p in PAPER}
    expected = {
        f"{d}_{b}_{s}"
        for d in ("cifar100", "coco", "imagenet100")
        for b in ("b32", "b16")
        for s in ("jumprelu", "relu_topk", "abs_topk")
    }
    assert names == expected


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: p.stem)
def test_config_instantiates(config: Path, tmp_path: Path) -> None:
    cli = build_cli(
        [
            "--config",
            str(config),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    assert isinstance(cli.model, CLTModule)
    assert isinstance(cli.datamodule, ActivationDataModule)
    # evaluation at every epoch end and at fit end, retrieval at fit end (issue 14)
    (evaluation,) = [c for c in cli.trainer.callbacks if isinstance(c, EvaluationCallback)]
    assert evaluation.every_n_epochs == 1 and evaluation.at_fit_end
    assert evaluation.config.n_images is None  # the fit-end evaluation is `clt evaluate`'s
    assert any(isinstance(c, RetrievalCallback) for c in cli.trainer.callbacks)
    if config.stem == "quickstart":
        return
    if config.stem in EXAMPLES:
        assert cli.datamodule.teacher_config.family == EXAMPLES[config.stem]
        return
    dataset, backbone, sparsifier = config.stem.split("_", 2)
    hp = cli.model.hparams
    # the paper's settings (section 9): AdamW 2e-4, expansion 16, k = 128, 10 epochs, all tokens
    assert hp.lr == pytest.approx(2e-4) and hp.expansion == 16
    assert cli.model.sparsifier_config.name == sparsifier
    if sparsifier != "jumprelu":
        assert cli.model.sparsifier_config.k == 128
    assert cli.trainer.max_epochs == 10
    assert cli.datamodule.token_filter == "all"
    assert cli.datamodule.dataset_config.name == dataset
    assert (
        cli.datamodule.teacher_config.model_name == {"b32": "ViT-B-32", "b16": "ViT-B-16"}[backbone]
    )
    assert cli.datamodule.teacher_config.pretrained == "openai"
    # <= 10% of an epoch by the arithmetic in configs/callbacks/<dataset>.yaml
    assert evaluation.epoch_n_images == {"cifar100": 128, "imagenet100": 384, "coco": 384}[dataset]


@pytest.mark.parametrize("stem", sorted(EXAMPLES))
def test_backbone_examples_print_their_teacher(
    stem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(CONFIGS / f"{stem}.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    model_name = {"open_clip": "ViT-B-16-SigLIP", "timm": "vit_base_patch14_dinov2.lvd142m"}
    assert f"model_name: {model_name[EXAMPLES[stem]]}" in printed
    assert f"family: {EXAMPLES[stem]}" in printed
