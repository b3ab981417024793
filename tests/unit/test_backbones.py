"""Every backbone family against its library: bit-equal forward, capture = norm2/mlp hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clt_lightning.backbones.registry import list_backbones
from clt_lightning.errors import CheckpointMismatchError, ConfigError
from clt_lightning.teacher import Teacher, TeacherConfig
from clt_lightning.tokens import TokenLayout
from tests.tiny_backbones import TIMM_MODELS, write_siglip_config, write_timm_kwargs

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FAMILIES = ["open_clip_vit", "open_clip_siglip", *TIMM_MODELS]


def tiny_config(name: str, folder: Path, **overrides) -> TeacherConfig:
    """TeacherConfig of the tiny random model called `name`."""
    if name == "open_clip_vit":
        return TeacherConfig(model_config=str(FIXTURES / "tiny-vit.json"), **overrides)
    if name == "open_clip_siglip":
        return TeacherConfig(model_config=str(write_siglip_config(folder)), **overrides)
    return TeacherConfig(
        family="timm",
        model_name=TIMM_MODELS[name][0],
        model_config=str(write_timm_kwargs(folder, name)),
        **overrides,
    )


def library_blocks(teacher: Teacher) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(LN2, MLP) modules of every block, found in the library's own model."""
    model = teacher.model
    if hasattr(model, "visual") and hasattr(model.visual, "transformer"):
        return [(b.ln_2, b.mlp) for b in model.visual.transformer.resblocks]
    trunk = model.visual.trunk if hasattr(model, "visual") else model
    return [(b.norm2, b.mlp) for b in trunk.blocks]


def library_features(teacher: Teacher, images: torch.Tensor) -> torch.Tensor:
    """The library's own forward to image features."""
    model = teacher.model
    if hasattr(model, "encode_image"):
        return model.encode_image(images)
    return model.forward_head(model.forward_features(images), pre_logits=True)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", FAMILIES)
def test_unmodified_run_equals_library_forward(
    name: str, tmp_path: Path, images: torch.Tensor
) -> None:
    teacher = Teacher(tiny_config(name, tmp_path))
    with torch.no_grad():
        want = library_features(teacher, images)
    got = teacher.encode_image(images)
    assert got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", FAMILIES)
def test_capture_equals_library_norm2_and_mlp(
    name: str, tmp_path: Path, images: torch.Tensor
) -> None:
    teacher = Teacher(tiny_config(name, tmp_path))
    seen: dict[str, list[torch.Tensor]] = {"x": [], "y": []}
    handles = []
    for norm2, mlp in library_blocks(teacher):
        handles.append(norm2.register_forward_hook(lambda m, i, o: seen["x"].append(o)))
        handles.append(mlp.register_forward_hook(lambda m, i, o: seen["y"].append(o)))
    with torch.no_grad():
        library_features(teacher, images)
    for handle in handles:
        handle.remove()
    cap = teacher.capture(images)
    assert cap.x.shape == (3, teacher.tokens_per_image, teacher.n_layers, teacher.d_model)
    assert torch.equal(cap.x, torch.stack(seen["x"], dim=2))
    assert torch.equal(cap.y, torch.stack(seen["y"], dim=2))


@pytest.mark.parametrize(
    ("name", "layout", "has_text"),
    [
        ("open_clip_vit", TokenLayout(1, 0, 16), True),
        ("open_clip_siglip", TokenLayout(0, 0, 16), True),
        ("dinov2", TokenLayout(1, 0, 16), False),
        ("dinov2_reg", TokenLayout(1, 4, 16), False),
        ("deit", TokenLayout(1, 0, 16), False),
    ],
)
def test_token_layout_and_text_tower(
    name: str, layout: TokenLayout, has_text: bool, tmp_path: Path
) -> None:
    teacher = Teacher(tiny_config(name, tmp_path))
    assert teacher.token_layout == layout
    assert teacher.tokens_per_image == layout.n_tokens
    assert teacher.has_text_tower is has_text
    assert TokenLayout.from_identity(teacher.identity()) == layout
    if not has_text:
        with pytest.raises(ConfigError, match="no text tower"):
            teacher.clip  # noqa: B018


def test_siglip_has_no_cls_group(tmp_path: Path) -> None:
    teacher = Teacher(tiny_config("open_clip_siglip", tmp_path))
    with pytest.raises(ConfigError, match=r"no cls tokens.*valid: \['all', 'patches'\]"):
        teacher.token_layout.check("cls")


def test_ln2_in_site_for_timm(tmp_path: Path, images: torch.Tensor) -> None:
    out = Teacher(tiny_config("dinov2_reg", tmp_path))
    into = Teacher(tiny_config("dinov2_reg", tmp_path, input_site="ln2_in"))
    x_in = into.capture(images).x
    norm2 = into.model.blocks[1].norm2
    assert torch.equal(norm2(x_in[:, :, 1]), out.capture(images).x[:, :, 1])
    assert torch.equal(into.mlp_output(1, x_in[:, :, 1]), out.capture(images).y[:, :, 1])


def test_timm_weights_file_round_trip_and_mismatch(tmp_path: Path, images: torch.Tensor) -> None:
    teacher = Teacher(tiny_config("dinov2", tmp_path))
    state = {k: v + 0.01 for k, v in teacher.model.state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = Teacher(tiny_config("dinov2", tmp_path, weights=str(path)))
    assert torch.equal(loaded.model.blocks[0].mlp.fc1.weight, state["blocks.0.mlp.fc1.weight"])
    assert not torch.equal(loaded.encode_image(images), teacher.encode_image(images))
    assert loaded.identity()["family"] == "timm"
    bad = tmp_path / "bad.safetensors"
    save_file({k: v for k, v in state.items() if k != "cls_token"}, str(bad))
    with pytest.raises(CheckpointMismatchError, match="'cls_token'.*missing"):
        Teacher(tiny_config("dinov2", tmp_path, weights=str(bad)))


def test_unknown_timm_name_lists_close_matches() -> None:
    with pytest.raises(ConfigError, match="vit_small_patch14_dinov2"):
        Teacher(TeacherConfig(family="timm", model_name="vit_small_patch14_dinov"))


def test_list_backbones_names_each_adapter() -> None:
    assert set(list_backbones()) == {"open_clip_vit", "open_clip_timm", "timm_vit"}
