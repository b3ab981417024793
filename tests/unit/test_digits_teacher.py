"""The offline digits teacher: data path, loss, zero-shot head, cache folder, accuracy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from clt_lightning.data.dataset_readers import DIGIT_CLASS_NAMES, digits_split
from clt_lightning.data.datasets import DatasetConfig, build_dataset
from clt_lightning.evaluation.zeroshot import DIGIT_TEMPLATES
from clt_lightning.teacher import Teacher, TeacherConfig
from experiments import digits_clip as dc
from experiments import digits_teacher as ot

TINY_CONFIG = Path(__file__).parents[1] / "fixtures" / "tiny-vit.json"
# Two optimiser steps of the tiny fixture model: enough to exercise every code path.
FAST = dc.TrainSettings(epochs=1, batch_size=512)


@pytest.fixture(scope="module")
def tiny_config() -> dict:
    return json.loads(TINY_CONFIG.read_text())


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory, tiny_config: dict) -> Path:
    """A cache folder holding a teacher trained once with FAST settings (copy before changing)."""
    folder = tmp_path_factory.mktemp("digits-clip")
    teacher = ot.ensure_digits_teacher(
        folder, settings=FAST, model_config=tiny_config, min_accuracy=0.0, progress=False
    )
    assert teacher.trained
    return folder


def _ensure(folder: Path, tiny_config: dict, **kwargs) -> ot.DigitsTeacher:
    kwargs = {"settings": FAST, "model_config": tiny_config, "min_accuracy": 0.0, **kwargs}
    return ot.ensure_digits_teacher(folder, progress=False, **kwargs)


def _copy(trained_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_dir, tmp_path / "digits-clip"))


def test_split_and_names_are_the_datasets() -> None:
    train, val = digits_split("train"), digits_split("val")
    perm = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(train, np.sort(perm[:1437]))
    np.testing.assert_array_equal(val, np.sort(perm[1437:]))
    assert DIGIT_CLASS_NAMES[0] == "zero" and DIGIT_CLASS_NAMES[9] == "nine"
    assert len(DIGIT_CLASS_NAMES) == 10


def test_templates_fit_the_context_length() -> None:
    """No caption is truncated (a cut caption could lose its class name)."""
    context = ot.DEFAULT_MODEL_CONFIG["text_cfg"]["context_length"]
    tokenizer = open_clip.SimpleTokenizer(context_length=context)
    for template in DIGIT_TEMPLATES:
        for name in DIGIT_CLASS_NAMES:
            assert len(tokenizer.encode(template.format(name))) + 2 <= context, template


def test_inputs_are_the_teachers_preprocess_of_the_digits(
    tiny_config: dict, tmp_path: Path
) -> None:
    """Training images = what `Teacher.preprocess` makes of the real digits (sklearn's pixels)."""
    from sklearn.datasets import load_digits

    teacher = Teacher(TeacherConfig(model_config=str(TINY_CONFIG)))
    images, labels = dc.load_digits("val", dc.eval_transform(tiny_config))
    index = digits_split("val")
    digits = load_digits()
    np.testing.assert_array_equal(labels.numpy(), digits.target[index])
    dataset = build_dataset(DatasetConfig(name="digits"), "val", teacher.preprocess)
    for i in (0, 17, len(index) - 1):
        assert torch.equal(images[i], dataset[i][0])
        # independent path: sklearn pixels -> PIL -> open_clip's own image_transform
        pixels = np.round(digits.images[index[i]] * 255 / 16).astype(np.uint8)
        pil = Image.fromarray(pixels).convert("RGB")
        expected = open_clip.image_transform(32, is_train=False)(pil)
        assert torch.equal(images[i], expected)
    background = dc.background_value(tiny_config)
    assert torch.allclose(images[0][:, 0, 0], background.flatten())  # corner pixel is black


def test_random_affine_without_ranges_is_identity_and_fills_black(tiny_config: dict) -> None:
    images, _ = dc.load_digits("val", dc.eval_transform(tiny_config))
    images = images[:8]
    background = dc.background_value(tiny_config)
    still = dc.TrainSettings(max_rotation=0.0, max_shift=0.0, max_scale=0.0)
    out = dc.random_affine(images, background, still, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)
    # an all-black image stays all black however far it moves: the fill is black, not 0
    black = background.expand(8, 3, 32, 32).clone()
    wild = dc.TrainSettings(max_rotation=45.0, max_shift=0.5, max_scale=0.5)
    moved = dc.random_affine(black, background, wild, torch.Generator().manual_seed(0))
    torch.testing.assert_close(moved, black)
    # and a moved digit differs from the original
    assert not torch.allclose(dc.random_affine(images, background, wild, torch.Generator()), images)


def test_contrastive_loss_is_clip_loss_when_every_label_is_unique() -> None:
    torch.manual_seed(1)
    image = F.normalize(torch.randn(6, 8), dim=-1)
    text = F.normalize(torch.randn(6, 8), dim=-1)
    labels = torch.arange(6)
    scale = torch.tensor(7.0)
    ours = dc.contrastive_loss(image, text, labels, labels, scale)
    theirs = open_clip.ClipLoss()(image, text, scale)
    torch.testing.assert_close(ours, theirs)


def test_contrastive_loss_spreads_targets_over_same_class_pairs() -> None:
    image = F.normalize(torch.randn(4, 8), dim=-1)
    text = F.normalize(torch.randn(6, 8), dim=-1)
    image_labels = torch.tensor([0, 0, 1, 1])
    text_labels = torch.tensor([0, 0, 1, 1, 2, 2])  # class 2 has no image in the batch
    scale = torch.tensor(3.0)
    logits = scale * image @ text.T
    pos = (image_labels[:, None] == text_labels[None]).float()
    i2t = np.mean([-(pos[i] / pos[i].sum() * logits[i].log_softmax(0)).sum() for i in range(4)])
    t2i = np.mean(
        [-(pos[:, j] / pos[:, j].sum() * logits[:, j].log_softmax(0)).sum() for j in range(4)]
    )
    expected = torch.tensor((i2t + t2i) / 2, dtype=torch.float32)
    torch.testing.assert_close(
        dc.contrastive_loss(image, text, image_labels, text_labels, scale), expected
    )


def test_zero_shot_logits_match_a_manual_template_ensemble(tiny_config: dict) -> None:
    model = dc.build_model(tiny_config).eval()
    tokenizer = dc.build_tokenizer(tiny_config)
    images = torch.randn(5, 3, 32, 32)
    names, templates = ["zero", "one", "two"], ["a {}.", "the digit {}."]
    with torch.no_grad():
        columns = []
        for name in names:
            emb = F.normalize(
                model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1
            )
            columns.append(F.normalize(emb.mean(0), dim=0))
        expected = (
            model.logit_scale.exp()
            * F.normalize(model.encode_image(images), dim=-1)
            @ torch.stack(columns, 1)
        )
    logits = dc.template_ensemble_logits(model, tokenizer, images, names, templates)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    labels = torch.tensor([0, 1, 2, 0, 1])
    accuracy = dc.zero_shot_accuracy(model, tokenizer, images, labels, names, templates)
    assert accuracy == pytest.approx((expected.argmax(1) == labels).float().mean().item())


def test_saved_teacher_round_trips_through_teacher_config(
    trained_dir: Path, tiny_config: dict, tmp_path: Path
) -> None:
    folder = _copy(trained_dir, tmp_path)
    teacher = _ensure(folder, tiny_config)
    assert not teacher.trained
    record = json.loads((folder / ot.RECORD_FILE).read_text())
    assert record["recipe"]["seed"] == 0 and record["recipe"]["settings"]["epochs"] == 1
    assert record["val_zero_shot_accuracy"] == teacher.accuracy
    assert json.loads(teacher.model_config.read_text()) == tiny_config
    model = ot.load_digits_clip(teacher)
    saved = load_file(teacher.weights)
    loaded = Teacher(teacher.teacher_config())  # the pipeline's own loader
    for name, tensor in loaded.clip.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    images, labels = dc.load_digits("val", loaded.preprocess)
    tokenizer = dc.build_tokenizer(tiny_config)
    args = (images, DIGIT_CLASS_NAMES, DIGIT_TEMPLATES)
    logits = dc.template_ensemble_logits(model, tokenizer, *args)
    assert torch.equal(logits, dc.template_ensemble_logits(loaded.clip, loaded.tokenizer, *args))
    accuracy = (logits.argmax(1) == labels).double().mean().item()
    assert accuracy == teacher.accuracy  # the recorded accuracy is the pipeline's accuracy


def test_reuse_does_not_retrain(trained_dir: Path, tiny_config: dict, tmp_path: Path) -> None:
    folder = _copy(trained_dir, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    teacher = _ensure(folder, tiny_config)
    assert not teacher.trained
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_corrupt_weights_are_retrained_to_the_same_bytes(
    trained_dir: Path, tiny_config: dict, tmp_path: Path
) -> None:
    """Retraining after corruption also proves training is deterministic for the seed."""
    folder = _copy(trained_dir, tmp_path)
    weights = folder / ot.WEIGHTS_FILE
    original = weights.read_bytes()
    corrupted = bytearray(original)
    corrupted[-1] ^= 0xFF
    weights.write_bytes(bytes(corrupted))
    teacher = _ensure(folder, tiny_config)
    assert teacher.trained
    assert weights.read_bytes() == original
    assert not list(folder.glob("*.tmp"))  # no temp files left behind


def test_other_settings_retrain_and_a_low_accuracy_is_an_error(
    trained_dir: Path, tiny_config: dict, tmp_path: Path
) -> None:
    folder = _copy(trained_dir, tmp_path)
    accuracy = _ensure(folder, tiny_config).accuracy
    with pytest.raises(ot.TeacherAccuracyError, match=f"{accuracy:.4f}"):
        _ensure(folder, tiny_config, min_accuracy=accuracy + 0.01)  # reused, then refused
    fresh = tmp_path / "fresh"
    with pytest.raises(ot.TeacherAccuracyError, match="below min_accuracy"):
        _ensure(fresh, tiny_config, seed=1, min_accuracy=1.01)
    assert not (fresh / ot.RECORD_FILE).exists()  # a failed teacher is never marked valid


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="epochs"):
        dc.TrainSettings(epochs=0)
    with pytest.raises(ValueError, match="embed_dim"):
        dc.build_model({"vision_cfg": {}, "text_cfg": {}})


def test_module_entry_reuses_a_built_teacher(
    trained_dir: Path, tiny_config: dict, tmp_path: Path
) -> None:
    folder = _copy(trained_dir, tmp_path)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config))
    before = (folder / ot.WEIGHTS_FILE).stat().st_mtime_ns
    args = [
        "--out",
        str(folder),
        "--model-config",
        str(config),
        "--epochs",
        "1",
        "--batch-size",
        "512",
    ]
    ot.main([*args, "--min-accuracy", "0"])
    assert (folder / ot.WEIGHTS_FILE).stat().st_mtime_ns == before


@pytest.mark.slow
def test_full_teacher_reaches_90_percent_zero_shot(tmp_path: Path) -> None:
    teacher = ot.ensure_digits_teacher(tmp_path / "digits-clip", progress=False)
    assert teacher.trained
    assert teacher.accuracy >= 0.90
    loaded = Teacher(teacher.teacher_config())
    images, labels = dc.load_digits("val", loaded.preprocess)
    accuracy = dc.zero_shot_accuracy(
        loaded.clip, loaded.tokenizer, images, labels, DIGIT_CLASS_NAMES, DIGIT_TEMPLATES
    )
    assert accuracy == teacher.accuracy
