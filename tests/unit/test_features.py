"""Latent dashboards: every number of the store against an independent computation.

The pass (`features.collect`) is run on the tiny teacher and a small random CLT; the
reference is brute force in numpy over every token of every image (one `Teacher.capture`
and `encode_layer` per layer, nothing streamed), or the exported raw weights, or an
explicit numpy computation through the head.
"""

from __future__ import annotations

import base64
import copy
import json
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch.utils.data import Dataset

from clt_lightning.data.datasets import DatasetConfig, build_dataset
from clt_lightning.errors import CheckpointMismatchError, ConfigError, DataNotFoundError
from clt_lightning.evaluation.contributions import token_projection_scores
from clt_lightning.features import effects
from clt_lightning.features.collect import FeaturesConfig, build_features, collect
from clt_lightning.features.store import FeatureStore
from clt_lightning.features.topk import TopNStore, store_bytes
from clt_lightning.models.clt import CrossLayerTranscoder
from clt_lightning.models.sparsifiers import SparsifierConfig

N_IMAGES, N_TOP, F = 40, 5, 48


def make_clt(name: str = "relu_topk", seed: int = 1) -> CrossLayerTranscoder:
    """A random tiny CLT with non-trivial scales and decoder bias (3 layers, d=32)."""
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(3, 32, F, SparsifierConfig(name=name, k=6, threshold_init=0.05))
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.3)
        clt.b_dec.normal_(0, 0.1)
    clt.set_normalisation(torch.tensor([0.7, 1.3, 2.0]), torch.tensor([1.5, 0.8, 0.6]))
    return clt.eval()


@pytest.fixture(scope="module")
def digits(request):
    from clt_lightning.teacher import Teacher, TeacherConfig
    from tests.conftest import FIXTURES

    teacher = Teacher(TeacherConfig(model_config=str(FIXTURES / "tiny-vit.json")))
    dataset = build_dataset(
        DatasetConfig(name="digits", max_images=N_IMAGES), "val", teacher.preprocess
    )
    return teacher, dataset


def brute_force(teacher, clt, dataset) -> dict[str, np.ndarray]:
    """Every token's activations z [N, T, L, F], x, the final residual h, image ids."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        out = teacher.run_blocks(teacher.embed(images), record=True)
        z = torch.stack([clt.encode_layer(s, out.x[s]) for s in range(clt.n_layers)], 2)
    return {"z": z.numpy(), "x": torch.stack(out.x, 2).numpy(), "h": out.h.numpy()}


def config(**kw) -> FeaturesConfig:
    return FeaturesConfig(
        **{"n_top": N_TOP, "batch_size": 7, "classifier_cache": None, "site": False, **kw}
    )


@pytest.mark.parametrize("name", ["relu_topk", "abs_topk", "jumprelu"])
def test_top_images_equal_brute_force(digits, name: str) -> None:
    teacher, dataset = digits
    clt = make_clt(name)
    result = collect(teacher, clt, dataset, config(), progress=False)
    z = brute_force(teacher, clt, dataset)["z"]  # [N, T, L, F]
    signed = name == "abs_topk"
    key = np.abs(z) if signed else z
    checked = 0
    for s in range(clt.n_layers):
        for group, tokens in (("cls", slice(0, 1)), ("patches", slice(1, None))):
            part = key[:, tokens, s]  # [N, t, F]
            best_token = part.argmax(1)  # [N, F]
            best = np.take_along_axis(part, best_token[:, None], 1)[:, 0]  # [N, F]
            for i in range(F):
                order = np.argsort(-best[:, i], kind="stable")[:N_TOP]
                order = order[best[order, i] > 0]
                got = result.tensors[f"top_image_{group}"][s, i].numpy()
                got = got[got >= 0]
                np.testing.assert_array_equal(got, order)
                token = best_token[order, i] + tokens.start
                np.testing.assert_array_equal(
                    result.tensors[f"top_token_{group}"][s, i, : len(order)].numpy(), token
                )
                np.testing.assert_allclose(
                    result.tensors[f"top_value_{group}"][s, i, : len(order)].numpy(),
                    z[order, token, s, i],
                    rtol=1e-5,
                    atol=1e-6,
                )
                np.testing.assert_allclose(
                    result.tensors[f"top_heatmap_{group}"][s, i, : len(order)].float().numpy(),
                    z[order, :, s, i],
                    rtol=2e-3,
                    atol=2e-3,
                )
                checked += len(order)
    assert checked > 100  # the comparison covered real entries, not only empty lists


def test_all_tokens_list_equals_brute_force(digits, tmp_path) -> None:
    teacher, dataset = digits
    clt = make_clt()
    build_features(teacher, clt, dataset, "digits", config(), tmp_path / "f", progress=False)
    store = FeatureStore.open(tmp_path / "f")
    z = brute_force(teacher, clt, dataset)["z"]
    for s in range(clt.n_layers):
        best = z[:, :, s].max(1)  # [N, F] maximum over all tokens
        for i in range(0, F, 5):
            record = store.latent(s, i)
            order = np.argsort(-best[:, i], kind="stable")[:N_TOP]
            order = order[best[order, i] > 0]
            assert [t.image for t in record.top["all"]] == order.tolist()
            np.testing.assert_allclose(
                [t.value for t in record.top["all"]], best[order, i], rtol=1e-5
            )
            for entry in record.top["all"]:
                assert z[entry.image, entry.token, s, i] == pytest.approx(entry.value, rel=1e-5)


def test_frequencies_and_histograms_equal_numpy(digits) -> None:
    teacher, dataset = digits
    clt = make_clt("jumprelu")
    cfg = config(histogram_bins=12, histogram_range=(-2.0, 1.0))
    t = collect(teacher, clt, dataset, cfg, progress=False).tensors
    z = brute_force(teacher, clt, dataset)["z"]
    active = z != 0
    np.testing.assert_array_equal(t["fired_cls"].numpy(), active[:, 0].sum(0))
    np.testing.assert_array_equal(t["fired_patches"].numpy(), active[:, 1:].sum((0, 1)))
    np.testing.assert_array_equal(t["fired_images"].numpy(), active.any(1).sum(0))
    np.testing.assert_allclose(
        t["activation_sum"].numpy(), z.astype(np.float64).sum((0, 1)), rtol=1e-5
    )
    edges = np.linspace(-2.0, 1.0, 13)
    np.testing.assert_allclose(t["histogram_edges"].numpy(), edges)
    for s in range(3):
        for i in range(F):
            values = z[:, :, s, i][active[:, :, s, i]]
            logs = np.clip(np.log10(np.abs(values.astype(np.float64))), -2.0, 1.0 - 1e-9)
            expected, _ = np.histogram(logs, bins=edges)
            np.testing.assert_array_equal(t["histogram"][s, i].numpy(), expected)
    assert int(t["histogram"].sum()) == int(active.sum())  # every firing counted once
    assert int(active.sum()) > 1000


def test_write_profile_equals_exported_decoder_norms() -> None:
    clt = make_clt()
    norm, share = effects.write_profile(clt)
    exported = clt.export_tensors()  # raw space: scales folded into W_dec_{s}
    for s in range(3):
        w = exported[f"W_dec_{s}"].numpy()  # [F, L - s, d]
        np.testing.assert_allclose(norm[s, :, s:].numpy(), np.linalg.norm(w, axis=-1), rtol=1e-5)
        assert (norm[s, :, :s] == 0).all()
        np.testing.assert_allclose(share[s].sum(-1).numpy(), 1.0, rtol=1e-5)
    distance = effects.write_distance(share)
    expected = (share[0] * torch.arange(3.0)).sum(-1)
    torch.testing.assert_close(distance[0], expected)
    assert (distance[2] == 0).all()


def test_latent_contributions_equal_explicit_loop(digits) -> None:
    teacher, dataset = digits
    clt = make_clt()
    n_contrib = 9
    t = collect(
        teacher, clt, dataset, config(contribution_images=n_contrib), progress=False
    ).tensors
    ref = brute_force(teacher, clt, dataset)
    z = torch.from_numpy(ref["z"][:n_contrib]).flatten(0, 1)  # [B, L, F]
    x = torch.from_numpy(ref["x"][:n_contrib]).flatten(0, 1)
    with torch.no_grad():
        y_hat = clt.decode(z).double()  # [B, L, d] raw
    w = {s: v.double() for s, v in enumerate(clt.export_tensors()[f"W_dec_{s}"] for s in range(3))}
    norm2 = y_hat.pow(2).sum(-1)
    expected = np.zeros((3, F, 3))
    for s in range(3):
        for target in range(s, 3):
            write = w[s][:, target - s]  # [F, d] raw decoder rows
            dots = (y_hat[:, target] @ write.T) / norm2[:, target, None]  # [B, F]
            expected[s, :, target] = (z[:, s].double() * dots).mean(0).numpy()
    np.testing.assert_allclose(t["contribution"].numpy(), expected, rtol=1e-4, atol=1e-8)
    # summed over latents: the contribution score of evaluation/contributions.py
    proj = token_projection_scores(clt, x)  # [B, L + 1, L]
    summed = t["contribution"].sum(1).numpy()  # [L_src, L_tgt]
    for s in range(3):
        for target in range(s, 3):
            assert summed[s, target] == pytest.approx(
                float(proj[:, s, target].mean()), rel=1e-4, abs=1e-8
            )


def test_direct_effect_equals_explicit_head_computation(digits) -> None:
    from clt_lightning.evaluation import zeroshot

    teacher, dataset = digits
    clt = make_clt()
    h = brute_force(teacher, clt, dataset)["h"].astype(np.float64)
    visual = teacher.backbone.visual
    eps = visual.ln_post.eps
    cls = h[:, 0]  # the tiny model pools the [CLS] token
    assert visual.pool_type == "tok"
    sigma_bar = np.sqrt(cls.var(-1) + eps).mean()
    measured = float(effects.ln_post_scale(teacher, torch.from_numpy(h)).mean())
    assert measured == pytest.approx(sigma_bar, rel=1e-9)
    classifier = zeroshot.build_classifier(teacher, ["zero", "one", "two"], ["a photo of {}."])
    got = effects.direct_effect(teacher, clt, classifier, measured).numpy()
    gamma = visual.ln_post.weight.detach().numpy().astype(np.float64)
    proj = visual.proj.detach().numpy().astype(np.float64)
    text = classifier.numpy().astype(np.float64)
    exported = clt.export_tensors()
    for s in range(3):
        v = exported[f"W_dec_{s}"][:, 2 - s].numpy().astype(np.float64)  # raw write into L-1
        centred = v - v.mean(-1, keepdims=True)
        expected = (centred * gamma / sigma_bar) @ proj @ text
        np.testing.assert_allclose(got[s], expected, rtol=1e-4, atol=1e-7)
    # first order: along a direction that leaves the scale unchanged, the head agrees
    # first order, through open_clip's own ln_post: along a direction that leaves the
    # image's scale unchanged, the head's change is the linearised one at that scale
    u = exported["W_dec_2"][3, 0].double()
    base = torch.from_numpy(cls[0]).double()
    centred = base - base.mean()
    u = u - u.mean()
    u = u - (u @ centred) / (centred @ centred) * centred
    scale = float(torch.sqrt(centred.var(unbiased=False) + eps))
    ln = copy.deepcopy(visual.ln_post).double()
    with torch.no_grad():
        delta = (ln(base + 1e-5 * u) - ln(base)) / 1e-5
    np.testing.assert_allclose(
        delta.numpy() @ proj, (u.numpy() * gamma / scale) @ proj, rtol=1e-4, atol=1e-7
    )


def test_store_is_readable_without_the_package(digits, tmp_path) -> None:
    teacher, dataset = digits
    clt = make_clt()
    folder = build_features(
        teacher, clt, dataset, "digits", config(), tmp_path / "f", progress=False
    )
    manifest = json.loads((folder / "features.json").read_text())
    tensors = load_file(str(folder / "features.safetensors"))
    assert set(manifest["tensors"]) == set(tensors)
    assert tensors["top_heatmap_patches"].shape == (3, F, N_TOP, teacher.tokens_per_image)
    assert manifest["n_images"] == N_IMAGES and manifest["n_tokens"] == N_IMAGES * 17
    assert manifest["class_names"][:2] == ["zero", "one"]
    assert tensors["direct_effect"].shape == (3, F, 10)
    assert not (folder / ".features-writing.json").exists()


def test_store_api_rejects_out_of_range(digits, tmp_path) -> None:
    teacher, dataset = digits
    build_features(teacher, make_clt(), dataset, "digits", config(), tmp_path / "f", progress=False)
    store = FeatureStore.open(tmp_path / "f")
    with pytest.raises(ConfigError, match=r"latent 48 out of range for layer 1: valid 0\.\.47"):
        store.latent(1, F)
    with pytest.raises(ConfigError, match=r"layer 3 out of range: valid 0\.\.2"):
        store.latent(3, 0)
    with pytest.raises(ConfigError, match="layer -1"):
        store.layer_table(-1)
    with pytest.raises(DataNotFoundError, match="features.json"):
        FeatureStore.open(tmp_path)


def test_checkpoint_that_does_not_fit_the_teacher(digits, tmp_path) -> None:
    teacher, dataset = digits
    wrong = CrossLayerTranscoder(2, 32, F, SparsifierConfig(name="relu_topk", k=4))
    with pytest.raises(CheckpointMismatchError, match="n_layers=2.*n_layers=3"):
        build_features(teacher, wrong, dataset, "digits", config(), tmp_path / "f", progress=False)
    assert not (tmp_path / "f").exists()


class Empty(Dataset):
    def __len__(self) -> int:
        return 0

    def identity(self) -> dict:
        return {"name": "empty"}


def test_split_without_images(digits, tmp_path) -> None:
    teacher, _ = digits
    with pytest.raises(ConfigError, match="split 'val' has no images"):
        build_features(
            teacher, make_clt(), Empty(), "digits", config(), tmp_path / "f", progress=False
        )
    assert not (tmp_path / "f").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("family", "message"),
    [
        ("siglip", r"open_clip:.*tiny-siglip\.json has 0 cls, 0 registers, 16 patches"),
        ("dinov2_reg", r"timm:vit_small_patch14_reg4_dinov2 has 1 cls, 4 registers"),
    ],
)
def test_teacher_without_cls_or_with_registers_is_refused(tmp_path, family, message) -> None:
    from clt_lightning.teacher import Teacher, TeacherConfig
    from tests.tiny_backbones import TIMM_MODELS, write_siglip_config, write_timm_kwargs

    if family == "siglip":
        teacher_config = TeacherConfig(model_config=str(write_siglip_config(tmp_path)))
    else:
        kwargs = write_timm_kwargs(tmp_path, family)
        name = TIMM_MODELS[family][0]
        teacher_config = TeacherConfig(family="timm", model_name=name, model_config=str(kwargs))
    teacher = Teacher(teacher_config)
    clt = CrossLayerTranscoder(teacher.n_layers, teacher.d_model, 8, SparsifierConfig(k=2))
    images = [(torch.zeros(3, teacher.image_size, teacher.image_size), 0)] * 2
    with pytest.raises(ConfigError, match=message) as error:
        build_features(teacher, clt, images, "x", config(), tmp_path / "f", progress=False)
    assert "one [CLS] token then patches" in str(error.value)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "f").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match=message):
        collect(teacher, clt, images, config(), progress=False)


def test_timm_teacher_with_cls_and_patches_is_accepted(tmp_path) -> None:
    from clt_lightning.teacher import Teacher, TeacherConfig
    from tests.tiny_backbones import TIMM_MODELS, write_timm_kwargs

    kwargs = str(write_timm_kwargs(tmp_path, "dinov2"))
    teacher = Teacher(
        TeacherConfig(family="timm", model_name=TIMM_MODELS["dinov2"][0], model_config=kwargs)
    )
    clt = CrossLayerTranscoder(teacher.n_layers, teacher.d_model, 8, SparsifierConfig(k=2)).eval()
    images = [(torch.randn(3, teacher.image_size, teacher.image_size), 0)] * 3
    result = collect(teacher, clt, images, config(), progress=False)
    assert result.tensors["top_heatmap_patches"].shape[-1] == teacher.tokens_per_image == 17


def test_folder_of_another_clt_is_refused_then_overwritten(digits, tmp_path) -> None:
    teacher, dataset = digits
    out = tmp_path / "f"
    build_features(teacher, make_clt(seed=1), dataset, "digits", config(), out, progress=False)
    first = json.loads((out / "features.json").read_text())["fingerprints"]["clt"]
    other = make_clt(seed=2)
    with pytest.raises(
        ConfigError,
        match=rf"another CLT \(fingerprint {first[:16]}, this checkpoint [0-9a-f]{{16}}\)",
    ):
        build_features(teacher, other, dataset, "digits", config(), out, progress=False)
    assert json.loads((out / "features.json").read_text())["fingerprints"]["clt"] == first
    build_features(teacher, other, dataset, "digits", config(overwrite=True), out, progress=False)
    assert json.loads((out / "features.json").read_text())["fingerprints"]["clt"] != first
    # the same CLT again: a rerun, allowed without the flag
    build_features(teacher, other, dataset, "digits", config(), out, progress=False)


def test_folder_with_other_files_is_never_touched(digits, tmp_path) -> None:
    teacher, dataset = digits
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a latent store"):
        build_features(
            teacher, make_clt(), dataset, "digits", config(overwrite=True), tmp_path, progress=False
        )
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_top": 0}, "latents.n_top"),
        ({"max_images": 0}, "latents.max_images"),
        ({"histogram_range": (1.0, -1.0)}, "latents.histogram_range"),
        ({"dense_threshold": 0.0}, "latents.dense_threshold"),
    ],
)
def test_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FeaturesConfig(**kwargs)


def test_store_memory_is_stated() -> None:
    store = TopNStore(2, 10, 4, 5)
    tensors = [t for e in store.entries.values() for t in vars(e).values()]
    tensors += list(store.key.values())  # the ranking keys
    assert sum(t.numel() * t.element_size() for t in tensors) == store_bytes(2, 10, 4, 5)
    assert store_bytes(12, 12_288, 16, 50) // (4 * 4 + 2 * 50) == 12 * 12_288 * 16 * 2


def read_js(path) -> tuple[str, object]:
    """(name, payload) of a data file `window.__clt.add(name, payload);`."""
    text = path.read_text()
    match = re.fullmatch(r'window\.__clt\.add\("([^"]+)", (.*)\);\n', text, re.S)
    assert match, text[:200]
    return match.group(1), json.loads(match.group(2))


def test_site_data_equals_the_store_and_thumbnails_are_reused(digits, tmp_path) -> None:
    teacher, dataset = digits
    out = tmp_path / "f"
    build_features(teacher, make_clt(), dataset, "digits", config(site=True), out, progress=False)
    store = FeatureStore.open(out)
    name, summary = read_js(out / "data" / "summary.js")
    assert name == "summary" and summary["n_latents"] == F and summary["has_direct_effect"]
    _, table = read_js(out / "data" / "layer_01.js")
    expected = store.layer_table(1)
    np.testing.assert_allclose(table["freq"], expected["token_frequency"].numpy(), rtol=1e-3)
    np.testing.assert_allclose(table["dist"], expected["write_distance"].numpy(), rtol=1e-3)
    _, chunk = read_js(out / "data" / "L01" / "chunk_0000.js")
    for i in (0, 7, F - 1):
        record, latent = chunk[str(i)], store.latent(1, i)
        for group in ("cls", "patches"):
            slots = [e[0] for e in record["top"][group]]
            assert [record["images"][k] for k in slots] == [t.image for t in latent.top[group]]
            np.testing.assert_allclose(
                [e[1] for e in record["top"][group]],
                [t.value for t in latent.top[group]],
                rtol=1e-3,
            )
        heat = np.frombuffer(base64.b64decode(record["heat"]), dtype=np.int8).reshape(-1, 17)
        heat = heat / 127 * np.array(record["heat_scale"])[:, None]
        for entry in latent.top["patches"]:
            row = heat[record["images"].index(entry.image)]
            np.testing.assert_allclose(row, entry.heatmap, atol=np.abs(entry.heatmap).max() / 120)
        np.testing.assert_array_equal(record["hist"], latent.histogram)
        up = [c for c, _ in record["up"]]
        assert up == [int(c) for c in np.argsort(-latent.direct_effect)[: len(up)]]
    thumbs = sorted((out / "thumbs").glob("*.jpg"))
    shown = {img for r in chunk.values() for img in r["images"]}
    assert shown <= {int(p.stem) for p in thumbs}
    stamps = {p.name: p.stat().st_mtime_ns for p in thumbs}
    build_features(teacher, make_clt(), dataset, "digits", config(site=True), out, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in sorted((out / "thumbs").glob("*.jpg"))} == stamps
    assert (out / "index.html").is_file() and (out / "assets" / "site.js").is_file()


def test_bookkeeping_runs_on_one_cpu_thread_and_restores_the_count() -> None:
    from clt_lightning.features.stats import one_cpu_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_cpu_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_cpu_thread(torch.device("cpu")):
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2  # restored on error too
    finally:
        torch.set_num_threads(before)
