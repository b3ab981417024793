"""The frozen CLIP teacher: load an open_clip ViT, capture (x, y) per MLP, run with overrides.

A `Teacher` wraps an open_clip `CLIP` model and re-implements the forward pass of its
vision tower block by block, so that the input and output of every MLP can be read
(`capture`) and the output replaced (`run_blocks(override=...)`), while the unmodified run
stays identical to open_clip's own `clip.encode_image` (the tests check this against
open_clip's modules through forward hooks).

Design decisions:

- Three ways to get a model, all offline except the first: an open_clip name with a
  pretrained tag (downloads once), a local weights file (safetensors, or a torch file read
  with `weights_only=True`) for a named or custom architecture, or a custom open_clip
  model-config JSON (random weights unless `weights` is given). Weights are never
  unpickled.
- Only open_clip's standard `VisionTransformer` made of `ResidualAttentionBlock`s is
  supported (ln_1, attn, ls_1, ln_2, mlp, ls_2); timm towers, ModifiedResNet, attentional
  pooling and custom blocks raise `ConfigError` at construction, not mid-run.
- The block maths is written out here (`h = h + ls_1(attn(ln_1(h)))`, `x = ln_2(h)`,
  `y = mlp(x)`, `h = h + ls_2(y)`) calling open_clip's own submodules, so a run without an
  override reproduces open_clip bit for bit. Patch dropout is never applied and the module
  stays in eval mode even if a parent calls `.train()`.
- Pretrained tags that were trained with QuickGELU (e.g. `ViT-B-32` + `openai`) are built
  with QuickGELU; open_clip itself only warns about the mismatch and builds nn.GELU.
- The model is built under a forked RNG seeded with 0, so a randomly initialised teacher
  (a custom config without weights, as in tests) is the same in every process and rank.
- `precision="bf16"` casts the whole model to bfloat16; `embed` casts images to the model
  dtype, and `capture`, `run_blocks`, `head` and `encode_image` return tensors in the
  compute dtype (bfloat16 then, float32 otherwise). Callers convert if they need float32.
- The layout is batch-first everywhere: residuals and activations are [N, T, d].
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, NamedTuple

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from clt_lightning.errors import CheckpointMismatchError, ConfigError, DataNotFoundError
from clt_lightning.teacher_checks import (
    validate_device,
    validate_vision_config,
    weights_read_error,
)

logger = logging.getLogger(__name__)

MLPOverride = Callable[[int, Tensor, Tensor], Tensor]
"""(layer, x_l [N, T, d], y_l [N, T, d]) -> the y_l to add to the residual."""

_PRECISIONS = ("fp32", "bf16")
_INPUT_SITES = ("ln2_out", "ln2_in")
_SCHEMAS = ("hf-hub:", "local-dir:")


@dataclass(frozen=True)
class TeacherConfig:
    """Which CLIP model to load and how to run it.

    Args:
        model_name: open_clip model name (see `open_clip.list_models()`), e.g. "ViT-B-32".
            Ignored when `model_config` is set.
        pretrained: open_clip pretrained tag, e.g. "openai" (downloads once; needs network).
            Use `weights` for a local file.
        weights: Local weights file (.safetensors, or .pt/.bin read with weights_only=True)
            holding a state dict of the whole open_clip CLIP model. The architecture comes
            from `model_config` or `model_name`; for OpenAI weights name the QuickGELU
            variant (e.g. "ViT-B-32-quickgelu").
        model_config: Custom open_clip model-config JSON ({"embed_dim", "vision_cfg",
            "text_cfg", optional "quick_gelu", "preprocess_cfg"}, or the hub layout
            {"model_cfg", "preprocess_cfg"}). Random weights unless `weights` is given.
        precision: "fp32", or "bf16" to cast the whole model to bfloat16.
        input_site: Where x_l is read: "ln2_out" (the MLP input, after LN2) or "ln2_in"
            (the residual stream before LN2).
        device: Torch device for the model, e.g. "cpu" or "cuda".
    """

    model_name: str = "ViT-B-32"
    pretrained: str | None = None
    weights: str | None = None
    model_config: str | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    input_site: Literal["ln2_out", "ln2_in"] = "ln2_out"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.precision not in _PRECISIONS:
            raise ConfigError(
                f"teacher.precision must be one of {list(_PRECISIONS)}, got {self.precision!r}"
            )
        if self.input_site not in _INPUT_SITES:
            raise ConfigError(
                f"teacher.input_site must be one of {list(_INPUT_SITES)}, got {self.input_site!r}"
            )
        if self.pretrained is not None and self.weights is not None:
            raise ConfigError(
                "set only one of teacher.pretrained (an open_clip tag) and teacher.weights "
                f"(a local file); got pretrained={self.pretrained!r}, weights={self.weights!r}"
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
    """A frozen open_clip CLIP whose vision MLPs can be read and replaced.

    Attributes:
        config: The `TeacherConfig` it was built from.
        clip: The whole open_clip CLIP model (the text tower serves zero-shot heads).
        tokenizer: open_clip tokenizer for this model (str | list[str] -> [n, context] int64).
        preprocess: open_clip's eval transform, PIL image -> [3, H, W] float32.
        n_layers: Number of vision blocks L.
        d_model: Residual width d.
        tokens_per_image: T = 1 + number of patches ([CLS] is token 0).
        image_size: Input side length in pixels.

    Args:
        config: Which model to load and how to run it.
    """

    def __init__(self, config: TeacherConfig) -> None:
        super().__init__()
        self.config = config
        self._model_config_path = _existing_file(config.model_config, "teacher.model_config")
        self._weights_path = _existing_file(config.weights, "teacher.weights")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if self._model_config_path is not None:
                clip, model_cfg = _build_custom(self._model_config_path)
                tokenizer = open_clip.SimpleTokenizer(
                    context_length=model_cfg["text_cfg"].get("context_length", 77)
                )
            else:
                clip, model_cfg = _build_named(config.model_name, config.pretrained)
                tokenizer = open_clip.get_tokenizer(config.model_name)
        visual = _check_visual(clip)
        if self._weights_path is not None:
            _load_weights(clip, self._weights_path)
        self.clip = clip
        self.tokenizer = tokenizer
        self.quick_gelu = bool(model_cfg.get("quick_gelu", False))
        self.n_layers = len(visual.transformer.resblocks)
        self.d_model = int(visual.transformer.width)
        self.tokens_per_image = 1 + visual.grid_size[0] * visual.grid_size[1]
        self.image_size = int(visual.image_size[0])
        pp_cfg = PreprocessCfg(**open_clip.get_model_preprocess_cfg(clip))
        self.preprocess = image_transform_v2(pp_cfg, is_train=False)
        self.clip.requires_grad_(False)
        dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        self.clip.to(device=config.device, dtype=dtype)
        self.train(False)
        logger.info(
            "teacher %s: %d layers, d=%d, %d tokens/image, %dpx, %s",
            self._display_name(),
            self.n_layers,
            self.d_model,
            self.tokens_per_image,
            self.image_size,
            config.precision,
        )

    # ------------------------------------------------------------------ properties

    @property
    def visual(self) -> VisionTransformer:
        """The open_clip vision tower."""
        return self.clip.visual

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the vision tower (float32 or bfloat16)."""
        return self.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the vision tower."""
        return self.visual.conv1.weight.device

    def train(self, mode: bool = True) -> Teacher:
        """Keep the teacher in eval mode whatever a parent module asks (it is frozen)."""
        return super().train(False)

    def _display_name(self) -> str:
        if self._model_config_path is not None:
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

        Returns:
            model_name (None for a custom model config), pretrained, weights_sha256,
            model_config_sha256, random_init, params_sha256, quick_gelu, image_size,
            n_layers, d_model, tokens_per_image, input_site, precision.
        """
        random_init = self.config.pretrained is None and self._weights_path is None
        return {
            "model_name": None if self._model_config_path else self.config.model_name,
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

    @cached_property
    def _weights_sha256(self) -> str | None:
        return None if self._weights_path is None else file_sha256(self._weights_path)

    @cached_property
    def _model_config_sha256(self) -> str | None:
        if self._model_config_path is None:
            return None
        canonical = json.dumps(_read_json(self._model_config_path), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    @cached_property
    def _params_sha256(self) -> str:
        digest = hashlib.sha256()
        for name, tensor in sorted(self.clip.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    # ------------------------------------------------------------------ forward pieces

    def embed(self, images: Tensor) -> Tensor:
        """Patch embedding, [CLS], positions and ln_pre: the residual entering block 0.

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
        visual = self.visual
        x = visual.conv1(images.to(device=self.device, dtype=self.dtype))  # [N, d, g, g]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [N, g*g, d]
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + visual.positional_embedding.to(x.dtype)
        return visual.ln_pre(x)

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
        xs: list[Tensor] = []
        ys: list[Tensor] = []
        for layer in range(start, stop):
            block = self.visual.transformer.resblocks[layer]
            h = h + block.ls_1(_attention(block, block.ln_1(h)))
            x_mlp = block.ln_2(h)
            x_site = h if read_input else x_mlp
            y = block.mlp(x_mlp)
            if override is not None:
                y = override(layer, x_site, y)
            if record:
                xs.append(x_site)
                ys.append(y)
            h = h + block.ls_2(y)
        return BlocksOutput(h, xs if record else None, ys if record else None)

    def head(self, h: Tensor) -> Tensor:
        """Final residual -> image embedding (ln_post, pool, proj), not normalised.

        Args:
            h: Residual [N, T, d] after the last block.

        Returns:
            [N, E] image embedding (E = d when the model has no projection).
        """
        visual = self.visual
        if visual.final_ln_after_pool:
            pooled = visual.ln_post(_pool(h, visual.pool_type))
        else:
            pooled = _pool(visual.ln_post(h), visual.pool_type)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled

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
        """Image embeddings, equal to `clip.encode_image(images)` (not normalised).

        Args:
            images: [N, 3, H, W] preprocessed images.

        Returns:
            [N, E] in the compute dtype.
        """
        return self.head(self.run_blocks(self.embed(images)).h)

    def forward(self, images: Tensor) -> Tensor:
        """Same as `encode_image`."""
        return self.encode_image(images)


# ---------------------------------------------------------------------- block helpers


def _attention(block: ResidualAttentionBlock, q: Tensor) -> Tensor:
    """Self-attention of one block on batch-first input [N, T, d]."""
    if block.attn.batch_first:
        return block.attention(q_x=q)
    return block.attention(q_x=q.transpose(0, 1)).transpose(0, 1)


def _pool(h: Tensor, pool_type: str) -> Tensor:
    """open_clip's global pool: [CLS] token ("tok") or mean of patch tokens ("avg")."""
    if pool_type == "tok":
        return h[:, 0]
    return h[:, 1:].mean(dim=1)


def _check_visual(clip: nn.Module) -> VisionTransformer:
    """Raise ConfigError unless the vision tower is a standard open_clip ViT."""
    visual = getattr(clip, "visual", None)
    if type(visual) is not VisionTransformer:
        raise ConfigError(
            f"teacher vision tower is {type(visual).__name__}; only open_clip's "
            "VisionTransformer is supported (not timm towers or ModifiedResNet)"
        )
    if visual.attn_pool is not None:
        raise ConfigError("teacher vision tower uses attentional pooling; only tok/avg pooling")
    if visual.pool_type not in ("tok", "avg"):
        raise ConfigError(f"teacher pool_type {visual.pool_type!r} unsupported; use tok or avg")
    if visual.image_size[0] != visual.image_size[1]:
        raise ConfigError(f"teacher image_size must be square, got {visual.image_size}")
    for i, block in enumerate(visual.transformer.resblocks):
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            raise ConfigError(
                f"teacher block {i} is {type(block).__name__}; only open_clip's "
                "ResidualAttentionBlock (ln_1, attn, ls_1, ln_2, mlp, ls_2) is supported"
            )
    return visual


# ---------------------------------------------------------------------- loading


def _existing_file(path: str | None, key: str) -> Path | None:
    """Resolve a config path, raising DataNotFoundError naming the key if it is missing."""
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise DataNotFoundError(f"{key}: file not found: {resolved}")
    return resolved


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"teacher.model_config {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"teacher.model_config {path} must hold a JSON object")
    return data


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def validate_model_name(name: str) -> None:
    """Raise ConfigError with close matches unless open_clip knows the model name."""
    if name.startswith(_SCHEMAS):
        return
    known = open_clip.list_models()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"did you mean {close}? " if close else ""
    raise ConfigError(
        f"unknown open_clip model teacher.model_name={name!r}; {hint}"
        "see open_clip.list_models() for all names"
    )


def _build_named(name: str, pretrained: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """Build a named open_clip model (weights from a pretrained tag, or random)."""
    validate_model_name(name)
    model_cfg = open_clip.get_model_config(name) or {}
    quick_gelu = False
    if pretrained is not None:
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ConfigError(
                f"unknown pretrained tag teacher.pretrained={pretrained!r} for {name}; "
                f"valid: {tags} (for a local file use teacher.weights)"
            )
        quick_gelu = bool(tag_cfg.get("quick_gelu")) and not model_cfg.get("quick_gelu")
        if quick_gelu:
            logger.info("%s/%s was trained with QuickGELU; building it so", name, pretrained)
    else:
        logger.info("teacher %s without pretrained tag: random weights unless weights=", name)
    try:
        clip = open_clip.create_model(
            name, pretrained=pretrained, force_quick_gelu=quick_gelu, precision="fp32"
        )
    except RuntimeError as e:
        if pretrained is None:
            raise
        raise DataNotFoundError(
            f"could not get pretrained weights {name}/{pretrained} ({e}); run once with "
            "network access, or download the file and set teacher.weights"
        ) from e
    model_cfg = {**model_cfg, "quick_gelu": quick_gelu or model_cfg.get("quick_gelu", False)}
    return clip, model_cfg


def _build_custom(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Build a CLIP from a model-config JSON, with its preprocess config attached."""
    data = _read_json(path)
    model_cfg = dict(data.get("model_cfg", data))
    preprocess_cfg = model_cfg.pop("preprocess_cfg", None) or data.get("preprocess_cfg") or {}
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise ConfigError(
            f"teacher.model_config {path} lacks {missing}; an open_clip model config needs "
            "embed_dim, vision_cfg and text_cfg (see tests/fixtures/tiny-vit.json)"
        )
    validate_vision_config(model_cfg, path)
    text_cfg = model_cfg["text_cfg"]
    custom_text = model_cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        clip = model_class(**model_cfg)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"teacher.model_config {path} does not build: {e}") from e
    pp = merge_preprocess_dict(PreprocessCfg(), preprocess_cfg)
    pp["size"] = getattr(clip.visual, "image_size", pp["size"])
    open_clip.set_model_preprocess_cfg(clip, pp)
    return clip, {**model_cfg, "text_cfg": text_cfg}


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a state dict from safetensors or a torch file (weights_only), unwrapped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or a pickle that weights_only refuses
        raise weights_read_error("teacher.weights", path, e) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"teacher.weights {path} does not hold a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def state_dict_mismatch(expected: dict[str, Tensor], found: dict[str, Tensor]) -> str | None:
    """Describe the first key where `found` does not fit `expected`, or None if it fits.

    Args:
        expected: The model's state dict.
        found: The loaded state dict.

    Returns:
        e.g. "first bad key 'visual.proj': shape [8, 16] in file, [32, 16] in model
        (0 missing, 0 unexpected, 1 shape mismatches)", or None.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    bad_shape = [k for k in expected if k in found and found[k].shape != expected[k].shape]
    counts = (
        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(bad_shape)} shape mismatches)"
    )
    first_expected = next((k for k in expected if k in missing or k in bad_shape), None)
    if first_expected is not None and first_expected in found:
        got, want = list(found[first_expected].shape), list(expected[first_expected].shape)
        return f"first bad key {first_expected!r}: shape {got} in file, {want} in model {counts}"
    if first_expected is not None:
        return f"first bad key {first_expected!r}: missing from file {counts}"
    if unexpected:
        return f"first bad key {unexpected[0]!r}: not in model {counts}"
    return None


def _load_weights(clip: nn.Module, path: Path) -> None:
    """Load a whole-model state dict, raising CheckpointMismatchError on the first bad key."""
    state = _read_state_dict(path)
    problem = state_dict_mismatch(clip.state_dict(), state)
    if problem is not None:
        raise CheckpointMismatchError(f"teacher.weights {path} does not fit the model: {problem}")
    clip.load_state_dict(state, strict=True)
    logger.info("loaded teacher weights from %s", path)
