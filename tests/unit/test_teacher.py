"""Teacher: captured activations and replays checked against open_clip's own modules."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clt_lightning.errors import CheckpointMismatchError, ConfigError, DataNotFoundError
from clt_lightning.teacher import Capture, Teacher, TeacherConfig
from clt_lightning.teacher_loading import state_dict_mismatch


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32)


def hooked_forward(clip: torch.nn.Module, images: torch.Tensor, site: str) -> Capture:
    """An independent forward of open_clip's visual tower, reading x, y through hooks."""
    xs, ys, handles = [], [], []
    for block in clip.visual.transformer.resblocks:
        if site == "ln2_in":
            handles.append(block.ln_2.register_forward_hook(lambda m, i, o: xs.append(i[0])))
        else:
            handles.append(block.ln_2.register_forward_hook(lambda m, i, o: xs.append(o)))
        handles.append(block.mlp.register_forward_hook(lambda m, i, o: ys.append(o)))
    try:
        with torch.no_grad():
            clip.visual(images)
    finally:
        for handle in handles:
            handle.remove()
    return Capture(torch.stack(xs, dim=2), torch.stack(ys, dim=2))


def test_capture_matches_open_clip_hooks(tiny_teacher: Teacher, images: torch.Tensor) -> None:
    got = tiny_teacher.capture(images)
    want = hooked_forward(tiny_teacher.clip, images, "ln2_out")
    assert got.x.shape == (3, 17, 3, 32) and got.y.shape == (3, 17, 3, 32)
    torch.testing.assert_close(got.x, want.x, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.y, want.y, rtol=0, atol=1e-6)
    assert not got.x.requires_grad


def test_ln2_in_site(tiny_model_config: Path, images: torch.Tensor) -> None:
    teacher = Teacher(TeacherConfig(model_config=str(tiny_model_config), input_site="ln2_in"))
    got = teacher.capture(images)
    want = hooked_forward(teacher.clip, images, "ln2_in")
    torch.testing.assert_close(got.x, want.x, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.y, want.y, rtol=0, atol=1e-6)
    # x at ln2_in is the residual, not its layer norm: the two sites must differ.
    ln2_out = hooked_forward(teacher.clip, images, "ln2_out").x
    assert not torch.allclose(got.x, ln2_out)


def test_encode_image_equals_open_clip(tiny_teacher: Teacher, images: torch.Tensor) -> None:
    got = tiny_teacher.encode_image(images)
    with torch.no_grad():
        want = tiny_teacher.clip.encode_image(images)
    assert got.shape == (3, 16)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_oracle_override_reproduces_logits_exactly(
    tiny_teacher: Teacher, images: torch.Tensor
) -> None:
    text = tiny_teacher.tokenizer(["a photo of a cat", "a photo of a dog"])
    with torch.no_grad():
        text_emb = torch.nn.functional.normalize(tiny_teacher.clip.encode_text(text), dim=-1)

        def logits(image_emb: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(image_emb, dim=-1) @ text_emb.T

        clean = logits(tiny_teacher.encode_image(images))
        calls: list[int] = []

        def oracle(layer: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            calls.append(layer)
            return y.clone()

        h = tiny_teacher.run_blocks(tiny_teacher.embed(images), override=oracle).h
        replaced = logits(tiny_teacher.head(h))
    assert calls == [0, 1, 2]
    assert torch.equal(replaced, clean)


def test_zeroing_a_layer_matches_open_clip_with_zeroed_mlp(
    tiny_teacher: Teacher, images: torch.Tensor
) -> None:
    def zero_layer_1(layer: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(y) if layer == 1 else y

    with torch.no_grad():
        out = tiny_teacher.run_blocks(
            tiny_teacher.embed(images), override=zero_layer_1, record=True
        )
        got = tiny_teacher.head(out.h)
        mlp = tiny_teacher.clip.visual.transformer.resblocks[1].mlp
        handle = mlp.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        try:
            want = tiny_teacher.clip.encode_image(images)
        finally:
            handle.remove()
    assert not torch.allclose(got, tiny_teacher.encode_image(images), atol=1e-4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.count_nonzero(out.y[1]) == 0  # record keeps the y that was used


def test_run_blocks_in_two_parts_equals_one_run(
    tiny_teacher: Teacher, images: torch.Tensor
) -> None:
    with torch.no_grad():
        h0 = tiny_teacher.embed(images)
        first = tiny_teacher.run_blocks(h0, 0, 1, record=True)
        rest = tiny_teacher.run_blocks(first.h, start=1, record=True)
        whole = tiny_teacher.run_blocks(h0, record=True)
    assert torch.equal(rest.h, whole.h)
    assert len(first.x) == 1 and len(rest.x) == 2
    assert torch.equal(torch.stack(first.y + rest.y), torch.stack(whole.y))
    assert tiny_teacher.run_blocks(h0, 1, 2).x is None
    with pytest.raises(ConfigError, match="start <= stop"):
        tiny_teacher.run_blocks(h0, 2, 1)


def test_frozen_and_eval(tiny_teacher: Teacher) -> None:
    assert all(not p.requires_grad for p in tiny_teacher.parameters())
    parent = torch.nn.Sequential(tiny_teacher)
    parent.train()
    assert not tiny_teacher.training
    assert not any(m.training for m in tiny_teacher.modules())


def test_attributes_tokenizer_preprocess(tiny_teacher: Teacher) -> None:
    assert (tiny_teacher.n_layers, tiny_teacher.d_model) == (3, 32)
    assert (tiny_teacher.tokens_per_image, tiny_teacher.image_size) == (17, 32)
    assert tiny_teacher.tokenizer(["a photo of a cat"]).shape == (1, 16)
    image = Image.new("RGB", (50, 40), color=(255, 0, 0))
    pixels = tiny_teacher.preprocess(image)
    assert pixels.shape == (3, 32, 32)
    red = (1 - open_clip.OPENAI_DATASET_MEAN[0]) / open_clip.OPENAI_DATASET_STD[0]
    assert pixels[0].mean().item() == pytest.approx(red, abs=1e-4)
    with pytest.raises(ConfigError, match=r"\[N, 3, 32, 32\]"):
        tiny_teacher.encode_image(torch.zeros(1, 3, 64, 64))


def test_identity_is_json_and_tells_teachers_apart(
    tiny_teacher: Teacher, tiny_model_config: Path
) -> None:
    ident = tiny_teacher.identity()
    assert json.loads(json.dumps(ident)) == ident
    assert ident["random_init"] and len(ident["model_config_sha256"]) == 64
    assert ident["weights_sha256"] is None and ident["tokens_per_image"] == 17
    again = Teacher(TeacherConfig(model_config=str(tiny_model_config))).identity()
    assert again == ident  # random init is seeded: same in every process
    other = Teacher(TeacherConfig(model_config=str(tiny_model_config), input_site="ln2_in"))
    assert other.identity() != ident


def write_state(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_file_round_trip(
    tiny_teacher: Teacher,
    tiny_model_config: Path,
    tmp_path: Path,
    suffix: str,
    images: torch.Tensor,
) -> None:
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in tiny_teacher.clip.state_dict().items()}
    path = write_state(state, tmp_path / f"weights{suffix}")
    loaded = Teacher(TeacherConfig(weights=str(path), model_config=str(tiny_model_config)))
    for key, value in loaded.clip.state_dict().items():
        assert torch.equal(value, state[key]), key
    reference = open_clip.CLIP(**json.loads(tiny_model_config.read_text())).eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_image(images), reference.encode_image(images), rtol=0, atol=1e-6
        )
    ident = loaded.identity()
    assert not ident["random_init"] and ident["params_sha256"] is None
    assert len(ident["weights_sha256"]) == 64


def test_weights_that_do_not_fit(tiny_model_config: Path, tmp_path: Path) -> None:
    cfg = json.loads(tiny_model_config.read_text())
    cfg["embed_dim"] = 8
    state = open_clip.CLIP(**cfg).state_dict()
    path = write_state(state, tmp_path / "other.safetensors")
    with pytest.raises(
        CheckpointMismatchError,
        match=r"first bad key 'text_projection': shape \[32, 8\] in file, \[32, 16\] in model",
    ):
        Teacher(TeacherConfig(weights=str(path), model_config=str(tiny_model_config)))
    partial = write_state({"visual.proj": state["visual.proj"]}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointMismatchError, match="missing from file"):
        Teacher(TeacherConfig(weights=str(partial), model_config=str(tiny_model_config)))
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"a": object()}}, pickled)
    with pytest.raises(CheckpointMismatchError, match="pickled.pt"):
        Teacher(TeacherConfig(weights=str(pickled), model_config=str(tiny_model_config)))


def test_state_dict_mismatch_names_unexpected_key() -> None:
    expected = {"a": torch.zeros(2)}
    assert state_dict_mismatch(expected, {"a": torch.ones(2)}) is None
    assert "'b': not in model" in state_dict_mismatch(
        expected, {"a": torch.ones(2), "b": torch.ones(1)}
    )


def test_missing_files(tmp_path: Path, tiny_model_config: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(DataNotFoundError, match="nope.safetensors"):
        Teacher(TeacherConfig(weights=str(missing), model_config=str(tiny_model_config)))
    with pytest.raises(DataNotFoundError, match="teacher.model_config.*missing.json"):
        Teacher(TeacherConfig(model_config=str(tmp_path / "missing.json")))


def test_unknown_model_name_suggests_close_match() -> None:
    with pytest.raises(ConfigError, match="ViT-B-32") as info:
        Teacher(TeacherConfig(model_name="ViT-B-23"))
    assert "ViT-B-23" in str(info.value)


def test_unknown_pretrained_tag_lists_valid_tags() -> None:
    with pytest.raises(ConfigError, match="openai"):
        Teacher(TeacherConfig(model_name="ViT-B-32", pretrained="no-such-tag"))


def test_invalid_config_values(tiny_model_config: Path) -> None:
    with pytest.raises(ConfigError, match="precision"):
        TeacherConfig(precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="input_site"):
        TeacherConfig(input_site="mlp_out")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="family"):
        TeacherConfig(family="timmm")
    with pytest.raises(ConfigError, match="open_clip tag"):
        TeacherConfig(family="timm", model_name="vit_tiny_patch16_224", pretrained="x")
    with pytest.raises(ConfigError, match="model_config"):
        TeacherConfig(pretrained="openai", model_config=str(tiny_model_config))


def test_bf16_runs(tiny_model_config: Path, tiny_teacher: Teacher, images: torch.Tensor) -> None:
    teacher = Teacher(TeacherConfig(model_config=str(tiny_model_config), precision="bf16"))
    cap = teacher.capture(images)
    assert cap.x.dtype == torch.bfloat16 and cap.y.dtype == torch.bfloat16
    want = tiny_teacher.capture(images)
    torch.testing.assert_close(cap.y.float(), want.y, rtol=0.1, atol=0.1)
    torch.testing.assert_close(
        teacher.encode_image(images).float(), tiny_teacher.encode_image(images), rtol=0.1, atol=0.1
    )


def test_custom_config_hub_layout_with_preprocess(tmp_path: Path, tiny_model_config: Path) -> None:
    model_cfg = json.loads(tiny_model_config.read_text())
    path = tmp_path / "open_clip_config.json"
    path.write_text(
        json.dumps(
            {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
        )
    )
    teacher = Teacher(TeacherConfig(model_config=str(path)))
    pixels = teacher.preprocess(Image.new("RGB", (32, 32), color=(255, 255, 255)))
    torch.testing.assert_close(pixels, torch.ones(3, 32, 32))


@pytest.mark.parametrize(
    ("vision_update", "message"),
    [({"attentional_pool": True}, "attentional"), ({"pool_type": "none"}, "pool_type")],
)
def test_unsupported_towers(
    tmp_path: Path, tiny_model_config: Path, vision_update: dict, message: str
) -> None:
    cfg = json.loads(tiny_model_config.read_text())
    cfg["vision_cfg"].update(vision_update)
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        Teacher(TeacherConfig(model_config=str(path)))


def test_config_without_required_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"vision_cfg": {}}))
    with pytest.raises(ConfigError, match="embed_dim"):
        Teacher(TeacherConfig(model_config=str(path)))


def test_local_openai_weights_keep_quick_gelu_under_both_spellings(tmp_path: Path) -> None:
    """`pretrained: openai` + `weights: FILE` = OpenAI weights stored locally (QuickGELU)."""
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32", force_quick_gelu=True).eval()
    path = tmp_path / "openai-b32.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = reference.encode_image(images)
    tagged = Teacher(TeacherConfig(model_name="ViT-B-32", pretrained="openai", weights=str(path)))
    named = Teacher(TeacherConfig(model_name="ViT-B-32-quickgelu", weights=str(path)))
    for teacher in (tagged, named):
        acts = {type(m).__name__ for m in teacher.model.visual.modules()}
        assert "QuickGELU" in acts and "GELU" not in acts
        assert teacher.quick_gelu
        assert torch.equal(teacher.encode_image(images), want)
    assert tagged.identity()["pretrained"] == "openai"
    assert not tagged.identity()["random_init"]
    plain = Teacher(TeacherConfig(model_name="ViT-B-32", weights=str(path)))
    assert not torch.equal(plain.encode_image(images), want)  # nn.GELU: the silent fault
