"""Token groups (cls / registers / patches / all) in every evaluation, on models that have
registers (DINOv2) or no [CLS] (SigLIP), checked through the libraries' own forwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clt_lightning.data.cache_writer import write_cache
from clt_lightning.errors import ConfigError
from clt_lightning.evaluation.contributions import contribution_scores, token_projection_scores
from clt_lightning.evaluation.replacement import run_replaced
from clt_lightning.evaluation.retrieval_descriptors import encode_descriptors
from clt_lightning.evaluation.suite import reconstruction_metrics
from clt_lightning.evaluation.token_modes import mode_positions
from clt_lightning.models.clt import CrossLayerTranscoder
from clt_lightning.models.sparsifiers import SparsifierConfig
from clt_lightning.teacher import Teacher, TeacherConfig
from clt_lightning.tokens import TokenLayout
from tests.tiny_backbones import write_siglip_config, write_timm_kwargs


@pytest.fixture
def registers_teacher(tmp_path: Path) -> Teacher:
    """Tiny DINOv2 with 4 registers: 1 cls, 4 registers, 16 patches (21 tokens), 2 blocks."""
    kwargs = write_timm_kwargs(tmp_path, "dinov2_reg")
    config = TeacherConfig(
        family="timm", model_name="vit_small_patch14_reg4_dinov2", model_config=str(kwargs)
    )
    teacher = Teacher(config)
    with torch.no_grad():  # DINOv2's LayerScale starts at 1e-5: let the MLPs matter
        for block in teacher.model.blocks:
            block.ls1.gamma.fill_(0.5)
            block.ls2.gamma.fill_(0.5)
    return teacher


@pytest.fixture
def clt() -> CrossLayerTranscoder:
    torch.manual_seed(0)
    model = CrossLayerTranscoder(2, 32, 64, SparsifierConfig("relu_topk", k=4))
    with torch.no_grad():
        model.b_dec.normal_(0, 0.1)
        model.set_normalisation(torch.tensor([0.8, 1.2]), torch.tensor([1.5, 0.6]))
    return model.eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_layout_positions_masks_and_errors() -> None:
    layout = TokenLayout(n_cls=1, n_registers=4, n_patches=16)
    assert layout.groups == ("all", "cls", "registers", "patches")
    assert layout.positions("registers") == slice(1, 5)
    assert layout.positions("patches") == slice(5, 21)
    token = torch.arange(21)
    assert token[layout.mask("registers", token)].tolist() == [1, 2, 3, 4]
    siglip = TokenLayout(n_cls=0, n_registers=0, n_patches=16)
    assert siglip.positions("patches") == slice(0, 16)
    with pytest.raises(ConfigError, match=r"data.token_filter='cls'.*no cls tokens"):
        siglip.check("cls", "data.token_filter")
    with pytest.raises(ConfigError, match="not a token group"):
        layout.check("tokens")
    legacy = TokenLayout.from_identity({"tokens_per_image": 17})
    assert legacy == TokenLayout(1, 0, 16)


def test_replacing_registers_equals_library_forward_with_hooks(
    registers_teacher: Teacher, clt: CrossLayerTranscoder, images: torch.Tensor
) -> None:
    """Replace the register tokens' MLP outputs from layer 0 on, via hooks on timm's modules."""
    model, positions, start = registers_teacher.model, slice(1, 5), 0
    codes: dict[int, torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(model.blocks):

        def read(m, i, out, layer=layer):
            codes[layer] = clt.encode_layer(layer, out[:, positions])

        def write(m, i, out, layer=layer):
            if layer < start:
                return None
            y_hat = clt.b_dec[layer] + sum(
                codes[s] @ clt.W_dec[s][:, layer - s] for s in range(layer + 1)
            )
            out = out.clone()
            out[:, positions] = y_hat / clt.output_scale[layer]
            return out

        handles += [block.norm2.register_forward_hook(read), block.mlp.register_forward_hook(write)]
    with torch.no_grad():
        want = model.forward_head(model.forward_features(images), pre_logits=True)
        got = run_replaced(registers_teacher, clt, images, start, None, "registers")
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, registers_teacher.encode_image(images), atol=1e-4)
    assert mode_positions("registers", registers_teacher.token_layout).tolist() == [1, 2, 3, 4]


def test_contributions_and_reconstruction_have_a_registers_group(
    registers_teacher: Teacher, clt: CrossLayerTranscoder, images: torch.Tensor
) -> None:
    scores = contribution_scores(registers_teacher, clt, [images])
    assert set(scores.scores) == {"cls", "registers", "patches", "all"}
    x = registers_teacher.capture(images).x  # [N, T, L, d]
    per_token = token_projection_scores(clt, x[:, 1:5].reshape(-1, 2, 32))  # registers only
    want = per_token.reshape(4, 4, 3, 2).mean(dim=1).mean(dim=0)
    torch.testing.assert_close(scores.scores["registers"], want)
    loader = [(images, torch.zeros(4, dtype=torch.long))]
    metrics = reconstruction_metrics(registers_teacher, clt, loader)
    assert set(metrics) == {"cls", "registers", "patches", "all"}


def test_retrieval_aggregates_the_group_of_the_layout(
    registers_teacher: Teacher, clt: CrossLayerTranscoder, images: torch.Tensor
) -> None:
    x = registers_teacher.capture(images).x
    layout = registers_teacher.token_layout
    got = encode_descriptors(clt, x, "patches", layout=layout)
    with torch.no_grad():
        z = clt.encode(x[:, 5:].reshape(-1, 2, 32)).z.reshape(4, 16, 2, 64)
    torch.testing.assert_close(got, z.mean(dim=1))
    siglip = TokenLayout(n_cls=0, n_registers=0, n_patches=16)
    with pytest.raises(ConfigError, match="retrieval.aggregation='cls'"):
        encode_descriptors(clt, x[:, 5:], "cls", layout=siglip)


@pytest.mark.parametrize(
    ("model", "tokens", "message"),
    [("siglip", "cls", "lacks"), ("registers", "cls+random", "register tokens")],
)
def test_cache_token_modes_that_assume_cls_then_patches_are_refused(
    model: str, tokens: str, message: str, tmp_path: Path, registers_teacher: Teacher
) -> None:
    from clt_lightning.data.datasets import DatasetConfig, build_dataset

    teacher = registers_teacher
    if model == "siglip":
        teacher = Teacher(TeacherConfig(model_config=str(write_siglip_config(tmp_path))))
    dataset = build_dataset(DatasetConfig(name="digits", max_images=4), "train", teacher.preprocess)
    with pytest.raises(ConfigError, match=message):
        write_cache(teacher, dataset, tmp_path / "cache", tokens=tokens, progress=False)
    assert not (tmp_path / "cache" / "manifest.json").exists()
