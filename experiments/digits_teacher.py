"""A tiny CLIP trained on scikit-learn's digits: the offline teacher for the quickstart.

Pretrained CLIP weights need a download, so the offline quickstart trains its own teacher:
open_clip's `CLIP` class at a small size, trained contrastively on the 1,797 real 8x8
handwritten digits that ship inside scikit-learn (`experiments/digits_clip.py`), with
class-name captions built from `DIGIT_TEMPLATES`. It is trained once, written to a cache
folder and reused. `python -m experiments.digits_teacher --out DIR` builds (or reuses) it;
`make quickstart` calls `ensure_digits_teacher`.

Design decisions:

- The model is open_clip's own `CLIP`, described by an open_clip model-config JSON written
  next to the weights, so `TeacherConfig(model_config=..., weights=...)` loads it like any
  custom open_clip model; nothing here is special to the rest of the pipeline.
- Files are written atomically (`clt_lightning.files.atomic_write_bytes`);
  `teacher.json` is written last and records sha256 hashes of the weights and config, the
  settings that made them and the measured accuracy. A later call reuses the files only if
  the record matches the requested settings and both hashes check out; otherwise it
  retrains and says why in the log.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import open_clip
import torch
from safetensors.torch import load_file, save

from clt_lightning.data.dataset_readers import DIGIT_CLASS_NAMES, digits_split
from clt_lightning.errors import CLTError
from clt_lightning.evaluation.zeroshot import DIGIT_TEMPLATES
from clt_lightning.files import atomic_write_bytes
from clt_lightning.hashing import file_sha256
from experiments.digits_clip import TrainSettings, build_model, train_digits_clip

if TYPE_CHECKING:
    from clt_lightning.teacher import TeacherConfig

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(".cache/teachers/digits-clip")
"""Where `ensure_digits_teacher` keeps the teacher (relative to the working directory)."""

DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 32,
        "layers": 4,
        "width": 64,
        "head_width": 32,
        "patch_size": 8,
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}
"""open_clip model config of the teacher: 4 vision layers, width 64, 32x32 images, 17 tokens."""

FORMAT_VERSION = 1
"""Version of the training recipe and the `teacher.json` layout; bump to invalidate caches."""

MODEL_CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "weights.safetensors"
RECORD_FILE = "teacher.json"


class TeacherAccuracyError(CLTError):
    """The trained teacher's zero-shot accuracy is below the required minimum."""


@dataclass(frozen=True)
class DigitsTeacher:
    """A trained digits teacher on disk.

    Args:
        model_config: open_clip model-config JSON (the `model_config` of a `TeacherConfig`).
        weights: safetensors state dict of `open_clip.CLIP` (the `weights` of a `TeacherConfig`).
        accuracy: Zero-shot accuracy on the 360 held-out (`val`) digits.
        train_seconds: Wall-clock seconds the training took (when it was trained).
        seed: Seed the teacher was trained with.
        trained: True if this call trained it, False if it reused the cached files.
    """

    model_config: Path
    weights: Path
    accuracy: float
    train_seconds: float
    seed: int
    trained: bool

    def teacher_config(self, **overrides: Any) -> TeacherConfig:
        """The `TeacherConfig` that loads this teacher.

        Args:
            **overrides: Other `TeacherConfig` fields (precision, input_site, device).

        Returns:
            `TeacherConfig(model_config=..., weights=..., **overrides)`.
        """
        from clt_lightning.teacher import TeacherConfig

        return TeacherConfig(
            model_config=str(self.model_config), weights=str(self.weights), **overrides
        )


# ----------------------------------------------------------------------------- cache folder


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _recipe(model_config: dict[str, Any], settings: TrainSettings, seed: int) -> dict[str, Any]:
    """Everything that determines the weights; a cached teacher is reused only if it matches."""
    return {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "model_config": model_config,
        "settings": dataclasses.asdict(settings),
        "class_names": DIGIT_CLASS_NAMES,
        "templates": DIGIT_TEMPLATES,
        "split": {
            "train_sha256": hashlib.sha256(digits_split("train").tobytes()).hexdigest(),
            "val_sha256": hashlib.sha256(digits_split("val").tobytes()).hexdigest(),
        },
    }


def _load_cached(folder: Path, recipe: dict[str, Any]) -> dict[str, Any] | None:
    """The cached record if the folder holds a complete, intact teacher for `recipe`.

    Returns None (and logs why) when it is missing, made by another recipe, or corrupt.
    """
    record_path = folder / RECORD_FILE
    if not record_path.exists():
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("unreadable %s (%s); retraining the digits teacher", record_path, e)
        return None
    if record.get("recipe") != recipe:
        logger.info("%s was made with other settings; retraining the digits teacher", folder)
        return None
    for name, key in ((MODEL_CONFIG_FILE, "model_config_sha256"), (WEIGHTS_FILE, "weights_sha256")):
        path = folder / name
        if not path.exists() or file_sha256(path) != record.get(key):
            logger.warning("%s is missing or corrupt (sha256 mismatch); retraining", path)
            return None
    return record


def _save(folder: Path, model: open_clip.CLIP, record: dict[str, Any]) -> None:
    """Write config, weights, and last the record that marks the folder complete."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD_FILE).unlink(missing_ok=True)  # incomplete until rewritten below
    atomic_write_bytes(folder / MODEL_CONFIG_FILE, _json_bytes(record["recipe"]["model_config"]))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(folder / WEIGHTS_FILE, save(state, metadata={"format": "pt"}))
    record["model_config_sha256"] = file_sha256(folder / MODEL_CONFIG_FILE)
    record["weights_sha256"] = file_sha256(folder / WEIGHTS_FILE)
    atomic_write_bytes(folder / RECORD_FILE, _json_bytes(record))


def ensure_digits_teacher(
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    *,
    seed: int = 0,
    settings: TrainSettings | None = None,
    model_config: dict[str, Any] | None = None,
    min_accuracy: float = 0.9,
    force: bool = False,
    progress: bool = True,
) -> DigitsTeacher:
    """Return the digits teacher in `cache_dir`, training it first if needed.

    Args:
        cache_dir: Folder for `model_config.json`, `weights.safetensors` and `teacher.json`.
        seed: Training seed.
        settings: Training settings (default `TrainSettings()`).
        model_config: open_clip model config (default `DEFAULT_MODEL_CONFIG`).
        min_accuracy: Smallest acceptable val zero-shot accuracy.
        force: Retrain even if a valid cached teacher exists.
        progress: Show a progress bar while training.

    Returns:
        The teacher's paths, accuracy and training time.

    Raises:
        TeacherAccuracyError: The accuracy is below `min_accuracy` (a failed teacher is
            not cached as valid).
    """
    folder = Path(cache_dir).expanduser()
    model_config = copy.deepcopy(model_config or DEFAULT_MODEL_CONFIG)
    recipe = _recipe(model_config, settings or TrainSettings(), seed)
    record = None if force else _load_cached(folder, recipe)
    trained = record is None
    if record is None:
        record = _train_and_save(folder, recipe, min_accuracy, progress)
    else:
        logger.info("reusing the digits teacher in %s", folder)
        _check_accuracy(record["val_zero_shot_accuracy"], min_accuracy, folder)
    return DigitsTeacher(
        model_config=folder / MODEL_CONFIG_FILE,
        weights=folder / WEIGHTS_FILE,
        accuracy=record["val_zero_shot_accuracy"],
        train_seconds=record["train_seconds"],
        seed=seed,
        trained=trained,
    )


def _train_and_save(
    folder: Path, recipe: dict[str, Any], min_accuracy: float, progress: bool
) -> dict[str, Any]:
    """Train the teacher of `recipe`, check its accuracy, write the folder; the record."""
    seed = recipe["seed"]
    logger.info("training the digits teacher into %s (seed %d)", folder, seed)
    start = time.perf_counter()
    model, accuracy = train_digits_clip(
        recipe["model_config"], TrainSettings(**recipe["settings"]), seed, progress
    )
    record = {
        "recipe": recipe,
        "val_zero_shot_accuracy": accuracy,
        "train_seconds": round(time.perf_counter() - start, 2),
        "torch_version": torch.__version__,
        "open_clip_version": open_clip.__version__,
    }
    _check_accuracy(accuracy, min_accuracy, folder)
    _save(folder, model, record)
    logger.info(
        "digits teacher: val zero-shot accuracy %.4f after %.1f s",
        accuracy,
        record["train_seconds"],
    )
    return record


def _check_accuracy(accuracy: float, min_accuracy: float, folder: Path) -> None:
    if accuracy < min_accuracy:
        raise TeacherAccuracyError(
            f"digits teacher in {folder}: val zero-shot accuracy {accuracy:.4f} is below "
            f"min_accuracy {min_accuracy}; train longer (TrainSettings.epochs) or lower "
            "min_accuracy"
        )


def load_digits_clip(teacher: DigitsTeacher) -> open_clip.CLIP:
    """Rebuild the saved CLIP from its config and weights (strict), in eval mode."""
    model = build_model(json.loads(teacher.model_config.read_text()))
    model.load_state_dict(load_file(teacher.weights))
    return model.eval()


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m experiments.digits_teacher --out DIR`: build (or reuse) the teacher."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_CACHE_DIR), help="cache folder")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--model-config", help="open_clip model-config JSON (default: built in)")
    parser.add_argument("--min-accuracy", type=float, default=0.9)
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model_config = None
    if args.model_config:
        model_config = json.loads(Path(args.model_config).read_text())
    teacher = ensure_digits_teacher(
        args.out,
        seed=args.seed,
        settings=TrainSettings(epochs=args.epochs, batch_size=args.batch_size),
        model_config=model_config,
        min_accuracy=args.min_accuracy,
        force=args.force,
    )
    logger.info(
        "digits teacher: model_config=%s weights=%s val zero-shot accuracy=%.4f",
        teacher.model_config,
        teacher.weights,
        teacher.accuracy,
    )


if __name__ == "__main__":
    main()
