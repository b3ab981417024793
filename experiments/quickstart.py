"""`make quickstart`: the whole method, offline, on real images, in minutes on a CPU.

Steps (each resumable; a rerun skips what is finished):
1. the teacher: a tiny CLIP trained by the project on scikit-learn's handwritten digits
   (`experiments.digits_teacher`; trained once, then reused from `.cache/teachers`);
2. `clt cache`: the train and val activation caches of that teacher;
3. `clt fit` for each of the paper's sparsifiers (JumpReLU, ReLU-TopK, Abs-TopK) with
   `configs/quickstart.yaml`, whose callbacks evaluate the CLT after every epoch (a subset
   of the val digits) and at the end of fit (all of them, what `clt evaluate` computes),
   and build the layer-wise retrieval grids ([CLS] and patch codes) for two digits: the
   same path as a paper run;
4. `clt features`: the latent store and browsable site of the ReLU-TopK CLT;
5. the report: `reports/quickstart/report.md`, built from what those callbacks wrote: the
   tables the paper shows (cascaded replacement, faithfulness, ablations, reconstruction),
   every figure, how the numbers moved during training, and a link to the latent site.

Usage: `python -m experiments.quickstart [--runs runs/quickstart] [--out reports/quickstart]
[--max-epochs N] [--sparsifiers relu_topk,...] [--n-images N]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from clt_lightning import cli  # noqa: E402
from clt_lightning.errors import CLTError  # noqa: E402
from experiments.digits_teacher import ensure_digits_teacher  # noqa: E402
from experiments.quickstart_report import write_report  # noqa: E402

log = logging.getLogger("quickstart")

CONFIG = "configs/quickstart.yaml"
SPARSIFIERS = ("jumprelu", "relu_topk", "abs_topk")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG, help="quickstart run config")
    parser.add_argument("--runs", default="runs/quickstart", help="folder of the three runs")
    parser.add_argument("--out", default="reports/quickstart", help="report folder")
    parser.add_argument("--teacher-dir", default=".cache/teachers/digits-clip")
    parser.add_argument("--cache-dir", default=None, help="override data.cache_dir")
    parser.add_argument("--sparsifiers", default=",".join(SPARSIFIERS))
    parser.add_argument("--max-epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument(
        "--n-images", type=int, default=None, help="evaluation images (default all 360)"
    )
    parser.add_argument(
        "--teacher-epochs", type=int, default=None, help="(tests) shorter teacher training"
    )
    parser.add_argument("--min-teacher-accuracy", type=float, default=0.9)
    return parser.parse_args(argv)


def clt(args: list[str]) -> None:
    """Run one `clt` subcommand in-process; a non-zero exit stops the quickstart."""
    log.info("clt %s", " ".join(args))
    code = cli.main(args)
    if code:
        raise SystemExit(f"quickstart: `clt {' '.join(args)}` failed with exit code {code}")


def common_overrides(opts: argparse.Namespace, teacher_dir: Path) -> list[str]:
    """Overrides shared by every command: where the teacher and the caches are."""
    args = [
        "--data.teacher.model_config",
        str(teacher_dir / "model_config.json"),
        "--data.teacher.weights",
        str(teacher_dir / "weights.safetensors"),
    ]
    if opts.cache_dir:
        args += ["--data.cache_dir", opts.cache_dir]
    return args


def callbacks_override(config: str, n_images: int | None) -> list[str]:
    """`--trainer.callbacks` with the config's callbacks, the fit-end evaluation limited to
    `n_images` (none when None: the config's own callbacks run unchanged)."""
    if n_images is None:
        return []
    callbacks = yaml.safe_load(Path(config).read_text())["trainer"]["callbacks"]
    for callback in callbacks:
        if callback["class_path"].endswith("EvaluationCallback"):
            init = callback.setdefault("init_args", {})
            init.setdefault("config", {})["n_images"] = n_images
            init["epoch_n_images"] = min(n_images, init.get("epoch_n_images", n_images))
    return ["--trainer.callbacks", json.dumps(callbacks)]


def run_one(sparsifier: str, opts: argparse.Namespace, common: list[str]) -> None:
    """Fit (or resume) one sparsifier's CLT; its callbacks evaluate it and build retrieval."""
    root = Path(opts.runs) / sparsifier
    last = root / "checkpoints" / "last.ckpt"
    if (root / "FIT_DONE").is_file() and (root / "evaluation" / "run.json").is_file():
        log.info("%s: finished earlier, skipping (delete %s to redo)", sparsifier, root)
        return
    fit = [
        "fit",
        "--config",
        opts.config,
        *common,
        "--model.sparsifier.name",
        sparsifier,
        "--trainer.default_root_dir",
        str(root),
        *callbacks_override(opts.config, opts.n_images),
    ]
    if opts.max_epochs is not None:
        fit += ["--trainer.max_epochs", str(opts.max_epochs)]
    if last.is_file():  # resumes; a finished fit only reruns the fit-end callbacks
        fit += ["--ckpt_path", str(last)]
    clt(fit)
    (root / "FIT_DONE").touch()


def run_features(opts: argparse.Namespace, common: list[str], sparsifier: str) -> None:
    """`clt features`: the latent site of one CLT in `<runs>/<sparsifier>/features` (the
    run's own folder: a refit CLT replaces it)."""
    root = Path(opts.runs) / sparsifier
    args = ["features", "--config", opts.config, *common]
    args += ["--ckpt_path", str(root / "checkpoints" / "last.ckpt")]
    args += ["--latents.output_dir", str(root / "features"), "--latents.overwrite", "true"]
    if opts.n_images is not None:
        args += ["--latents.max_images", str(opts.n_images)]
    clt(args)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts = parse_args(argv)
    sparsifiers = [s for s in opts.sparsifiers.split(",") if s]
    timings: dict[str, float] = {}
    start = time.perf_counter()
    try:
        kwargs = {"min_accuracy": opts.min_teacher_accuracy}
        if opts.teacher_epochs is not None:
            from experiments.digits_clip import TrainSettings

            kwargs["settings"] = TrainSettings(epochs=opts.teacher_epochs)
        ensure_digits_teacher(opts.teacher_dir, **kwargs)
    except CLTError as error:
        log.error("%s", error)
        return 2
    timings["teacher"] = time.perf_counter() - start
    common = common_overrides(opts, Path(opts.teacher_dir))
    step = time.perf_counter()
    clt(["cache", "--config", opts.config, *common])
    timings["cache"] = time.perf_counter() - step
    for sparsifier in sparsifiers:
        step = time.perf_counter()
        run_one(sparsifier, opts, common)
        timings[sparsifier] = time.perf_counter() - step
    step = time.perf_counter()
    run_features(opts, common, "relu_topk" if "relu_topk" in sparsifiers else sparsifiers[0])
    timings["features"] = time.perf_counter() - step
    timings["total"] = time.perf_counter() - start
    report = write_report(
        Path(opts.runs), Path(opts.out), teacher_record(opts.teacher_dir), timings
    )
    log.info("quickstart done in %.0f s; report: %s", timings["total"], report)
    return 0


def teacher_record(teacher_dir: str) -> dict:
    """The digits teacher's record (accuracy, settings) written by experiments/digits_teacher.py."""
    return json.loads((Path(teacher_dir) / "teacher.json").read_text())


if __name__ == "__main__":
    raise SystemExit(main())
