"""Zero-shot head: templates, class names, classifier (vs a manual build), cache, logits."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clt_lightning.errors import ConfigError
from clt_lightning.evaluation import zeroshot
from clt_lightning.evaluation.zeroshot import (
    build_classifier,
    build_per_template_classifiers,
    class_names_for,
    logit_scale_of,
    templates_for,
    zero_shot_logits,
)

NAMES = ["cat", "dog", "ship"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread (two spin-wait badly on a shared 2-core machine)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def manual_classifier(teacher, names, templates) -> torch.Tensor:
    """CLIP's recipe by hand: normalise per prompt, mean over templates, normalise."""
    columns = []
    with torch.no_grad():
        for name in names:
            tokens = teacher.tokenizer([t.format(name) for t in templates])
            emb = F.normalize(teacher.clip.encode_text(tokens), dim=-1).mean(dim=0)
            columns.append(F.normalize(emb, dim=0))
    return torch.stack(columns, dim=1)


def test_templates_per_dataset():
    cifar = templates_for("cifar100")
    assert len(cifar) == 18 and len(set(cifar)) == 18
    assert cifar[0] == "a photo of a {}." and cifar[-1] == "a photo of the big {}."
    assert "a low contrast photo of the {}." in cifar
    imagenet = templates_for("imagenet100")
    assert len(imagenet) == 80 and imagenet == templates_for("coco")
    assert imagenet[0] == "a bad photo of a {}." and all(t.count("{}") == 1 for t in imagenet)
    assert len(zeroshot.IMAGENET_SIMPLE_TEMPLATES) == 7
    from clt_lightning.evaluation.zeroshot import DIGIT_TEMPLATES

    assert templates_for("digits") == DIGIT_TEMPLATES
    templates_for("cifar100").append("mutated")
    assert len(templates_for("cifar100")) == 18  # callers get copies
    with pytest.raises(ConfigError, match="known"):
        templates_for("mnist")


def test_class_names():
    cifar = class_names_for("cifar100")
    assert len(cifar) == 100 and len(set(cifar)) == 100 and cifar[:2] == ["apple", "aquarium fish"]
    coco = class_names_for("coco")
    assert len(coco) == 80 and coco[0] == "person" and coco[-1] == "toothbrush"
    assert len(class_names_for("digits")) == 10

    class WithNames:
        class_names = ["a", "b"]

    assert class_names_for("imagenet100", WithNames()) == ["a", "b"]
    with pytest.raises(ConfigError, match="no class names"):
        class_names_for("imagenet100")
    with pytest.raises(ConfigError, match="no class names"):
        class_names_for("imagefolder", object())


@torch.no_grad()
def test_classifier_matches_manual_build(tiny_teacher):
    classifier = build_classifier(tiny_teacher, NAMES, TEMPLATES)
    assert classifier.shape == (16, 3) and classifier.dtype == torch.float32
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(3))
    expected = manual_classifier(tiny_teacher, NAMES, TEMPLATES)
    torch.testing.assert_close(classifier, expected, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_per_template_classifiers(tiny_teacher):
    stacked = build_per_template_classifiers(tiny_teacher, NAMES, TEMPLATES)
    assert stacked.shape == (2, 16, 3)
    for j, template in enumerate(TEMPLATES):
        expected = manual_classifier(tiny_teacher, NAMES, [template])
        torch.testing.assert_close(stacked[j], expected, atol=1e-6, rtol=1e-5)


def test_cache_round_trip(tiny_teacher, tmp_path, monkeypatch):
    first = build_classifier(tiny_teacher, NAMES, TEMPLATES, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("zeroshot-*.safetensors"))
    assert len(files) == 1
    torch.testing.assert_close(load_file(files[0])["classifier"], first)

    def refuse(*args, **kwargs):
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(open_clip, "build_zero_shot_classifier", refuse)
    assert torch.equal(build_classifier(tiny_teacher, NAMES, TEMPLATES, cache_dir=tmp_path), first)
    monkeypatch.undo()
    build_classifier(tiny_teacher, NAMES, TEMPLATES[:1], cache_dir=tmp_path)  # new key
    build_per_template_classifiers(tiny_teacher, NAMES, TEMPLATES, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("zeroshot-*.safetensors"))) == 3
    files[0].write_bytes(b"broken")  # a corrupt cache file is rebuilt
    torch.testing.assert_close(build_classifier(tiny_teacher, NAMES, TEMPLATES, tmp_path), first)


@torch.no_grad()
def test_logits_match_clip_forward(tiny_teacher):
    images = torch.randn(4, 3, 32, 32)
    classifier = build_classifier(tiny_teacher, NAMES, TEMPLATES[:1])
    scale = logit_scale_of(tiny_teacher)
    logits = zero_shot_logits(tiny_teacher.encode_image(images), classifier, scale)
    texts = tiny_teacher.tokenizer([TEMPLATES[0].format(n) for n in NAMES])
    image_features, text_features, exp_scale = tiny_teacher.clip(images, texts)
    expected = exp_scale * image_features @ text_features.T
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    stacked = zero_shot_logits(torch.randn(4, 16), torch.randn(5, 16, 3), 1.0)
    assert stacked.shape == (5, 4, 3)


def test_bad_inputs(tiny_teacher):
    with pytest.raises(ConfigError, match="class_names is empty"):
        build_classifier(tiny_teacher, [], TEMPLATES)
    with pytest.raises(ConfigError, match="templates is empty"):
        build_classifier(tiny_teacher, NAMES, [])
    with pytest.raises(ConfigError, match="exactly one"):
        build_classifier(tiny_teacher, NAMES, ["a photo"])
    callable_templates = [lambda c: f"a photo of a {c}."]
    torch.testing.assert_close(
        build_classifier(tiny_teacher, NAMES, callable_templates),
        build_classifier(tiny_teacher, NAMES, TEMPLATES[:1]),
    )
