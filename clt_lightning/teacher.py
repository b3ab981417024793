"""The frozen vision teacher: load a ViT, capture (x, y) per MLP, run with overrides.

A `Teacher` wraps a vision transformer (an open_clip CLIP, an open_clip model with a timm
trunk such as SigLIP, or a timm ViT such as DINOv2 or DeiT) through a backbone adapter
(`clt_lightning/backbones/`) and runs its forward pass block by block, so that the input
and output of every MLP can be read (`capture`) and the output replaced
(`run_blocks(override=...)`), while the unmodified run stays identical to the library's own
forward (the tests check this against each library's modules through forward hooks).

Design decisions:

- Three ways to get a model (built by `teacher_loading`), all offline except the first: an open_clip name with a
  pretrained tag (downloads once), a local weights file (safetensors, or a torch file read
  with `weights_only=True`) for a named or custom architecture, or a custom open_clip
  model-config JSON (random weights unless `weights` is given). Weights are never
  unpickled.
- `family: open_clip` (default) builds with open_clip; its `VisionTransformer` towers and
  its timm-trunk towers (SigLIP) are supported. `family: timm` builds
  `timm.create_model(model_name, pretrained=False, **model_config)` offline, weights from
  `teacher.weights`. ModifiedResNet, attentional pooling on open_clip's own ViT and custom
  blocks raise `ConfigError` at construction, not mid-run.
- The block maths is written out (`h = h + ls_1(attn(ln_1(h)))`, `x = ln_2(h)`,
  `y = mlp(x)`, `h = h + ls_2(y)`) calling the library's own submodules, so a run without
  an override reproduces the library bit for bit. Patch dropout is never applied and the
  module stays in eval mode even if a parent calls `.train()`.
- Pretrained tags that were trained with QuickGELU (e.g. `ViT-B-32` + `openai`) are built
  with QuickGELU; open_clip itself only warns about the mismatch and builds nn.GELU. The
  same tag with a local `weights` file means "these weights, stored locally": QuickGELU,
  nothing downloaded.
- The model is built under a forked RNG seeded with 0, so a randomly initialised teacher
  (a custom config without weights, as in tests) is the same in every process and rank.
- `precision="bf16"` casts the whole model to bfloat16; `embed` casts images to the model
  dtype, and `capture`, `run_blocks`, `head` and `encode_image` return tensors in the
  compute dtype (bfloat16 then, float32 otherwise). Callers convert if they need float32.
- The layout is batch-first everywhere: residuals and activations are [N, T, d].
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, NamedTuple

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import Tensor, nn

from clt_lightning.backbones.registry import check_family, wrap
from clt_lightning.backbones.timm_vit import build_timm, timm_preprocess
from clt_lightning.errors import ConfigError
from clt_lightning.hashing import file_sha256, json_sha256, tensors_sha256
from clt_lightning.teacher_checks import validate_device
from clt_lightning.teacher_loading import (
    build_custom_clip,
    build_named_clip,
    custom_tokenizer,
    existing_file,
    load_weights,
    read_model_config,
)
from clt_lightning.tokens import TokenLayout

logger = logging.getLogger(__name__)

MLPOverride = Callable[[int, Tensor, Tensor], Tensor]
"""(layer, x_l [N, T, d], y_l [N, T, d]) -> the y_l to add to the residual."""

_PRECISIONS = ("fp32", "bf16")
_INPUT_SITES = ("ln2_out", "ln2_in")


@dataclass(frozen=True)
class TeacherConfig:
    """Which vision model to load and how to run it.

    Args:
        model_name: open_clip model name (see `open_clip.list_models()`), e.g. "ViT-B-32";
            with `family: timm`, a timm model name (see `timm.list_models()`), e.g.
            "vit_base_patch14_reg4_dinov2". Ignored for open_clip when `model_config` is set.
        pretrained: open_clip pretrained tag, e.g. "openai". Alone it downloads once (needs
            network); with `weights` it says which weights the local file holds (e.g.
            QuickGELU for "openai") and nothing is downloaded.
        weights: Local weights file (.safetensors, or .pt/.bin read with weights_only=True)
            holding a state dict of the whole model (open_clip CLIP, or timm model). For a
            local copy of OpenAI weights write `pretrained: openai` next to it (or name
            the QuickGELU variant, e.g. "ViT-B-32-quickgelu").
        model_config: open_clip: a custom model-config JSON ({"embed_dim", "vision_cfg",
            "text_cfg", optional "quick_gelu", "preprocess_cfg"}, or the hub layout
            {"model_cfg", "preprocess_cfg"}). timm: a JSON object of extra
            `timm.create_model` keyword arguments (e.g. {"depth": 2, "img_size": 32}).
            Random weights unless `weights` is given.
        precision: "fp32", or "bf16" to cast the whole model to bfloat16.
        input_site: Where x_l is read: "ln2_out" (the MLP input, after LN2) or "ln2_in"
            (the residual stream before LN2).
        device: Torch device for the model, e.g. "cpu" or "cuda".
        family: Library that builds the model: "open_clip" (CLIP, SigLIP) or "timm"
            (ViT, DeiT, DINOv2; see `clt_lightning.backbones.registry.list_backbones()`).
    """

    model_name: str = "ViT-B-32"
    pretrained: str | None = None
    weights: str | None = None
    model_config: str | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    input_site: Literal["ln2_out", "ln2_in"] = "ln2_out"
    device: str = "cpu"
    family: str = "open_clip"

    def __post_init__(self) -> None:
        if self.precision not in _PRECISIONS:
            raise ConfigError(
                f"teacher.precision must be one of {list(_PRECISIONS)}, got {self.precision!r}"
            )
        if self.input_site not in _INPUT_SITES:
            raise ConfigError(
                f"teacher.input_site must be one of {list(_INPUT_SITES)}, got {self.input_site!r}"
            )
        check_family(self.family)
        if self.pretrained is not None and self.family != "open_clip":
            raise ConfigError(
                f"teacher.pretrained={self.pretrained!r} is an open_clip tag; a {self.family} "
                "teacher loads a local teacher.weights file (offline)"
            )
        if self.pretrained is not None and self.model_config is not None:
            raise ConfigError(
                "teacher.pretrained tags belong to named open_clip models; with "
                f"teacher.model_config={self.model_config!r} give a local teacher.weights file"
            )
        validate_device(self.device, "teacher.device")


class BlocksOutput(NamedTuple):
    """What `Teacher.run_blocks` returns."""

    h: Tensor
    """Residual stream after the last block run, [N, T, d]."""
    x: list[Tensor] | None
    """Per block run (start..stop-1): x_l at the input site, [N, T, d]; None unless record."""
    y: list[Tensor] | None
    """Per block run: the MLP output added to the residual (after any override), [N, T, d]."""


class Capture(NamedTuple):
    """What `Teacher.capture` returns: every layer's MLP input and output, every token."""

    x: Tensor
    """MLP inputs at the input site, [N, T, L, d]."""
    y: Tensor
    """MLP outputs, [N, T, L, d]."""


class Teacher(nn.Module):
    """A frozen vision transformer whose MLPs can be read and replaced.

    Attributes:
        config: The `TeacherConfig` it was built from.
        backbone: The adapter running the model (`clt_lightning.backbones`).
        model: The library's whole model (open_clip CLIP, or timm model).
        preprocess: The library's eval transform, PIL image -> [3, H, W] float32.
        n_layers: Number of vision blocks L.
        d_model: Residual width d.
        token_layout: [CLS], register and patch token counts (`clt_lightning.tokens`).
        tokens_per_image: T = all tokens of one image.
        image_size: Input side length in pixels.
        has_text_tower: Whether zero-shot heads are available (`clip`, `tokenizer`).

    Args:
        config: Which model to load and how to run it.
    """

    def __init__(self, config: TeacherConfig) -> None:
        super().__init__()
        self.config = config
        self._model_config_path = existing_file(config.model_config, "teacher.model_config")
        self._weights_path = existing_file(config.weights, "teacher.weights")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, model_cfg = self._build_model()
        self.backbone = wrap(config.family, model)
        if self._weights_path is not None:
            load_weights(model, self._weights_path)
        self.quick_gelu = bool(model_cfg.get("quick_gelu", False))
        self.n_layers = self.backbone.n_layers
        self.d_model = self.backbone.d_model
        self.token_layout = self.backbone.token_layout
        self.tokens_per_image = self.token_layout.n_tokens
        self.image_size = self.backbone.image_size
        self.has_text_tower = self.backbone.has_text_tower
        if config.family == "timm":
            self.preprocess = timm_preprocess(model)
        else:
            pp_cfg = PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
            self.preprocess = image_transform_v2(pp_cfg, is_train=False)
        model.requires_grad_(False)
        dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        model.to(device=config.device, dtype=dtype)
        self.train(False)
        logger.info(
            "teacher %s: %d layers, d=%d, tokens/image %s, %dpx, %s",
            self._display_name(),
            self.n_layers,
            self.d_model,
            self.token_layout.describe(),
            self.image_size,
            config.precision,
        )

    def _build_model(self) -> tuple[nn.Module, dict[str, Any]]:
        """Build the model with random weights or a pretrained tag (weights load later)."""
        config = self.config
        if config.family == "timm":
            kwargs = (
                {}
                if self._model_config_path is None
                else read_model_config(self._model_config_path)
            )
            return build_timm(config.model_name, kwargs), {}
        if self._model_config_path is not None:
            clip, model_cfg = build_custom_clip(self._model_config_path)
            self._tokenizer_factory = lambda: custom_tokenizer(model_cfg)
            return clip, model_cfg
        tag = config.pretrained
        clip, model_cfg = build_named_clip(config.model_name, tag, local=self._weights_path)
        self._tokenizer_factory = lambda: open_clip.get_tokenizer(config.model_name)
        return clip, model_cfg

    # ------------------------------------------------------------------ properties

    @property
    def model(self) -> nn.Module:
        """The library's whole model (open_clip CLIP, or timm model)."""
        return self.backbone.model

    @property
    def clip(self) -> nn.Module:
        """The whole open_clip model, for zero-shot heads (text tower, logit_scale).

        Raises:
            ConfigError: The teacher has no text tower (timm ViTs: use a linear probe).
        """
        if not self.has_text_tower:
            raise ConfigError(
                f"teacher {self._display_name()} has no text tower (no zero-shot head); "
                "its accuracy is measured with a linear probe"
            )
        return self.backbone.model

    @cached_property
    def tokenizer(self) -> Callable[..., Tensor]:
        """The open_clip tokenizer for this model (str | list[str] -> [n, context] int64).

        Built on first use (a SigLIP tokenizer comes from the Hugging Face cache).
        """
        self.clip  # noqa: B018 - raises for a teacher without a text tower
        return self._tokenizer_factory()

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the vision tower (float32 or bfloat16)."""
        return self.backbone.reference.dtype

    @property
    def device(self) -> torch.device:
        """Device of the vision tower."""
        return self.backbone.reference.device

    def train(self, mode: bool = True) -> Teacher:
        """Keep the teacher in eval mode whatever a parent module asks (it is frozen)."""
        return super().train(False)

    def _display_name(self) -> str:
        if self._model_config_path is not None and self.config.family != "timm":
            return str(self._model_config_path)
        source = self.config.pretrained or self.config.weights or "random weights"
        return f"{self.config.model_name} ({source})"

    # ------------------------------------------------------------------ identity

    def identity(self) -> dict[str, Any]:
        """A JSON-able description that tells teachers apart (for cache manifests).

        `weights_sha256` is the sha256 of the weights file's bytes; `model_config_sha256`
        that of the model-config JSON re-serialised with sorted keys (so formatting does not
        matter). A randomly initialised teacher (no pretrained tag, no weights file) also
        carries `params_sha256`, a hash of its parameters; otherwise that field is None.
        File paths are left out on purpose: a moved or renamed file is the same teacher.
        `family` and `token_layout` are present only when they differ from an open_clip
        CLIP ([CLS] + patches), so caches written before they existed still match.

        Returns:
            model_name (None for a custom open_clip config), pretrained, weights_sha256,
            model_config_sha256, random_init, params_sha256, quick_gelu, image_size,
            n_layers, d_model, tokens_per_image, input_site, precision; family,
            token_layout when not the CLIP default.
        """
        random_init = self.config.pretrained is None and self._weights_path is None
        custom_clip = self._model_config_path is not None and self.config.family != "timm"
        identity = {
            "model_name": None if custom_clip else self.config.model_name,
            "pretrained": self.config.pretrained,
            "weights_sha256": self._weights_sha256,
            "model_config_sha256": self._model_config_sha256,
            "random_init": random_init,
            "params_sha256": self._params_sha256 if random_init else None,
            "quick_gelu": self.quick_gelu,
            "image_size": self.image_size,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "tokens_per_image": self.tokens_per_image,
            "input_site": self.config.input_site,
            "precision": self.config.precision,
        }
        if self.config.family != "open_clip":
            identity["family"] = self.config.family
        if self.token_layout != TokenLayout.from_identity(identity):
            identity["token_layout"] = self.token_layout.to_dict()
        return identity

    @cached_property
    def _weights_sha256(self) -> str | None:
        return None if self._weights_path is None else file_sha256(self._weights_path)

    @cached_property
    def _model_config_sha256(self) -> str | None:
        if self._model_config_path is None:
            return None
        return json_sha256(read_model_config(self._model_config_path))

    @cached_property
    def _params_sha256(self) -> str:
        return tensors_sha256(self.model.state_dict())

    # ------------------------------------------------------------------ forward pieces

    def embed(self, images: Tensor) -> Tensor:
        """Patch embedding, [CLS]/registers, positions, pre-norm: the residual entering block 0.

        Args:
            images: [N, 3, H, W] preprocessed images (H = W = image_size).

        Returns:
            h0 [N, T, d] in the compute dtype.
        """
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ConfigError(
                f"teacher expects images [N, 3, {self.image_size}, {self.image_size}], got "
                f"{list(images.shape)}; use teacher.preprocess as the dataset transform"
            )
        return self.backbone.embed(images.to(device=self.device, dtype=self.dtype))

    def run_blocks(
        self,
        h: Tensor,
        start: int = 0,
        stop: int | None = None,
        override: MLPOverride | None = None,
        record: bool = False,
    ) -> BlocksOutput:
        """Run blocks start..stop-1 on the residual h, optionally replacing MLP outputs.

        Per block l: `h = h + ls_1(attn(ln_1(h)))`; `x_l = ln_2(h)` (or `h` for input site
        "ln2_in"); `y_l = mlp(ln_2(h))`; `y_l = override(l, x_l, y_l)` if given;
        `h = h + ls_2(y_l)`. Runs with whatever grad mode the caller has set (the teacher's
        parameters never require grad).

        Args:
            h: Residual [N, T, d] entering block `start`.
            start: First block to run.
            stop: One past the last block to run (default: all blocks).
            override: Called per block with (layer, x_l, y_l); its return value is added to
                the residual instead of y_l. Must return a tensor shaped like y_l.
            record: Keep x_l and the y_l actually used, per block.

        Returns:
            BlocksOutput(h [N, T, d], x, y) with x, y lists of [N, T, d] (None unless record).
        """
        stop = self.n_layers if stop is None else stop
        if not 0 <= start <= stop <= self.n_layers:
            raise ConfigError(
                f"run_blocks needs 0 <= start <= stop <= {self.n_layers}, got {start}, {stop}"
            )
        read_input = self.config.input_site == "ln2_in"
        backbone = self.backbone
        xs: list[Tensor] = []
        ys: list[Tensor] = []
        for layer in range(start, stop):
            h = backbone.attend(layer, h)
            x_mlp = backbone.norm2(layer)(h)
            x_site = h if read_input else x_mlp
            y = backbone.mlp(layer)(x_mlp)
            if override is not None:
                y = override(layer, x_site, y)
            if record:
                xs.append(x_site)
                ys.append(y)
            h = backbone.add_mlp(layer, h, y)
        return BlocksOutput(h, xs if record else None, ys if record else None)

    def mlp_output(self, layer: int, x_site: Tensor) -> Tensor:
        """Block `layer`'s MLP output y_l for an input read at the input site.

        Args:
            layer: Block index.
            x_site: [..., d] x_l at `config.input_site` (LN2 is applied for "ln2_in").

        Returns:
            y_l [..., d].
        """
        x = self.backbone.norm2(layer)(x_site) if self.config.input_site == "ln2_in" else x_site
        return self.backbone.mlp(layer)(x)

    def head(self, h: Tensor) -> Tensor:
        """Final residual -> image features (the library's final norm, pool, projection).

        Args:
            h: Residual [N, T, d] after the last block.

        Returns:
            [N, E] image embedding, not normalised (open_clip: `encode_image`; timm: the
            pre-logits features).
        """
        return self.backbone.head(h)

    @torch.no_grad()
    def capture(self, images: Tensor) -> Capture:
        """One clean forward recording every layer's MLP input and output.

        Args:
            images: [N, 3, H, W] preprocessed images.

        Returns:
            Capture(x [N, T, L, d], y [N, T, L, d]) in the compute dtype.
        """
        out = self.run_blocks(self.embed(images), record=True)
        return Capture(torch.stack(out.x, dim=2), torch.stack(out.y, dim=2))

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """Image features, equal to the library's own forward (not normalised).

        Args:
            images: [N, 3, H, W] preprocessed images.

        Returns:
            [N, E] in the compute dtype.
        """
        return self.head(self.run_blocks(self.embed(images)).h)

    def forward(self, images: Tensor) -> Tensor:
        """Same as `encode_image`."""
        return self.encode_image(images)


# ---------------------------------------------------------------------- loading
