"""The latent store on disk (`features.json` + `features.safetensors`) and its Python API.

A folder written by `clt features` holds:

    features.json          manifest: format, version, fingerprints, shapes, settings,
                           class names, what every tensor means (written last)
    features.safetensors   the tensors (docs/features.md lists them)
    index.html, ...        the static site (`features/site.py`)

Both files are plain formats: `json` and `safetensors.numpy.load_file` read them without
this package. `FeatureStore.open(path).latent(layer, index)` reads one latent's record
lazily (`safe_open` slices), so a paper-scale store (hundreds of MB of heatmaps) is never
loaded whole.

Design decisions:

- `features.json` is written after everything else and removed first when a folder is
  rewritten, so a folder with a manifest is complete; a crash mid-way leaves
  `.features-writing.json` (the new run's fingerprints) instead.
- The fingerprints (sha256) are of the CLT's tensors, the teacher's identity and the
  dataset's identity. A folder made for another CLT is refused naming both CLT
  fingerprints unless `overwrite` is set; a rerun for the same CLT replaces it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from clt_lightning.errors import CheckpointMismatchError, ConfigError, DataNotFoundError
from clt_lightning.features.topk import GROUPS, merge_all
from clt_lightning.files import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "clt-lightning-features"
FORMAT_VERSION = 1
MANIFEST = "features.json"
TENSORS = "features.safetensors"
WRITING = ".features-writing.json"


def folder_fingerprints(folder: Path) -> dict[str, str] | None:
    """The fingerprints recorded in a features folder (complete or interrupted), or None."""
    for name in (MANIFEST, WRITING):
        path = folder / name
        if path.is_file():
            try:
                return dict(json.loads(path.read_text()).get("fingerprints") or {})
            except (OSError, ValueError, AttributeError):
                return {}
    return None


def prepare_folder(folder: Path, fingerprints: dict[str, str], overwrite: bool) -> None:
    """Check that `folder` may receive this run's store, then mark it as being written.

    Args:
        folder: Output folder (created when missing).
        fingerprints: This run's {"clt", "teacher", "dataset"} sha256 digests.
        overwrite: Replace a store made for another CLT.

    Raises:
        ConfigError: The folder holds another CLT's store and `overwrite` is not set, or
            it holds files that are not a store (never touched, whatever `overwrite`).
    """
    old = folder_fingerprints(folder)
    if old is None and folder.is_dir() and any(folder.iterdir()):
        raise ConfigError(
            f"features output folder {folder} is not empty and holds no {MANIFEST}: it is "
            "not a latent store, so nothing there is replaced; choose an empty or new "
            "folder (latents.output_dir)"
        )
    if old is not None and old.get("clt") != fingerprints["clt"]:
        if not overwrite:
            raise ConfigError(
                f"features output folder {folder} was made for another CLT (fingerprint "
                f"{str(old.get('clt'))[:16]}, this checkpoint {fingerprints['clt'][:16]}); "
                "choose another latents.output_dir or pass --latents.overwrite true"
            )
        log.warning("overwriting %s (made for CLT %s)", folder, str(old.get("clt"))[:16])
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / WRITING, json.dumps({"fingerprints": fingerprints}))
    (folder / MANIFEST).unlink(missing_ok=True)


def write_store(folder: Path, tensors: dict[str, Tensor], manifest: dict[str, Any]) -> None:
    """Write the tensors, then the manifest (which marks the folder complete).

    Args:
        folder: A folder passed through `prepare_folder`.
        tensors: Name -> tensor (CPU, contiguous).
        manifest: JSON-able manifest; `format`, `format_version` and the tensor list are
            added here.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(folder / TENSORS, save(tensors, metadata={"format": FORMAT}))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **manifest,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()},
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    (folder / WRITING).unlink(missing_ok=True)


LAYER_TENSORS = ["fired_cls", "fired_patches", "fired_images", "activation_sum", "write_share"]
LAYER_TENSORS += [f"top_{k}_{g}" for g in GROUPS for k in ("value", "image")]
"""The tensors `layer_columns` reads (sliced at one layer)."""


def layer_columns(
    t: dict[str, Tensor], layer: int, n_layers: int, n_images: int, n_tokens: int
) -> dict[str, Tensor]:
    """Per-latent summary of one layer from that layer's slices of `LAYER_TENSORS`.

    Returns:
        [F] token_frequency, cls_frequency, patch_frequency, image_frequency,
        mean_activation (0 when never active), max_activation (|value| of the best entry),
        write_distance, local_share, and top_images [F, 3] (best distinct image ids over
        both groups, -1 = none).
    """
    from clt_lightning.features.effects import write_distance

    fired = t["fired_cls"] + t["fired_patches"]
    best = torch.stack([t[f"top_value_{g}"][:, 0].abs() for g in GROUPS], 1)
    share = torch.zeros(n_layers, *t["write_share"].shape)
    share[layer] = t["write_share"]
    return {
        "token_frequency": fired / n_tokens,
        "cls_frequency": t["fired_cls"] / n_images,
        "patch_frequency": t["fired_patches"] / max(1, n_tokens - n_images),
        "image_frequency": t["fired_images"] / n_images,
        "mean_activation": t["activation_sum"] / fired.clamp_min(1),
        "max_activation": best.max(1).values,
        "write_distance": write_distance(share)[layer],
        "local_share": t["write_share"][:, layer],
        "top_images": best_images(t, 3),
    }


def best_images(t: dict[str, Tensor], k: int) -> Tensor:
    """[F, k] the best distinct image ids of each latent over both groups (by |value|)."""
    value = torch.cat([t[f"top_value_{g}"].abs() for g in GROUPS], 1)
    image = torch.cat([t[f"top_image_{g}"] for g in GROUPS], 1)
    value = torch.where(image >= 0, value, -1.0)
    image = image.gather(1, value.argsort(1, descending=True))
    out = torch.full((image.shape[0], k), -1, dtype=torch.int32)
    for i, row in enumerate(image.tolist()):
        distinct = list(dict.fromkeys(x for x in row if x >= 0))[:k]
        out[i, : len(distinct)] = torch.tensor(distinct, dtype=torch.int32)
    return out


@dataclass
class TopImage:
    """One of a latent's top images."""

    image: int
    """Image id (index in the dataset split)."""
    value: float
    """The latent's activation at `token` (signed)."""
    token: int
    """Token position of `value` (0 = [CLS])."""
    heatmap: np.ndarray
    """[T] float32 activation of the latent at every token of the image."""


@dataclass
class LatentRecord:
    """Everything the store knows about one latent (see docs/features.md)."""

    layer: int
    index: int
    top: dict[str, list[TopImage]]
    """Group ("all", "cls", "patches") -> top images, best first."""
    token_frequency: float
    cls_frequency: float
    patch_frequency: float
    image_frequency: float
    mean_activation: float
    """Mean activation over the tokens where it is non-zero (NaN if it never fired)."""
    histogram: np.ndarray
    """[B] counts of log10 |activation| (edges in `histogram_edges`)."""
    histogram_edges: np.ndarray
    write_norm: np.ndarray
    """[L - layer] raw decoder norm into targets layer..L-1."""
    write_share: np.ndarray
    contribution: np.ndarray
    """[L - layer] mean contribution score to y_hat of targets layer..L-1."""
    direct_effect: np.ndarray | None = None
    """[C] push on each zero-shot class per unit activation, when the teacher has text."""
    class_names: list[str] = field(default_factory=list)


class FeatureStore:
    """Read access to a folder written by `clt features`.

    Use `FeatureStore.open(path)`; then `latent(layer, index)` or `layer_table(layer)`.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder, self.manifest = folder, manifest
        self.n_layers = int(manifest["n_layers"])
        self.n_latents = int(manifest["n_latents"])
        self.n_top = int(manifest["n_top"])
        self.class_names: list[str] = list(manifest.get("class_names") or [])

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        """Open a features folder.

        Raises:
            DataNotFoundError: No `features.json` (not a store, or an interrupted run).
            CheckpointMismatchError: Another format or a newer version.
        """
        folder = Path(path)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise DataNotFoundError(
                f"{manifest_path} not found: {folder} holds no complete latent store (run "
                "`clt features --config ... --ckpt_path ...`, or rerun an interrupted one)"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointMismatchError(f"{manifest_path}: not valid JSON: {err}") from err
        if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointMismatchError(
                f"{manifest_path}: format {manifest.get('format')!r} version "
                f"{manifest.get('format_version')!r}; this package reads {FORMAT} <= "
                f"{FORMAT_VERSION}"
            )
        return cls(folder, manifest)

    def _check(self, layer: int, index: int | None = None) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ConfigError(f"layer {layer!r} out of range: valid 0..{self.n_layers - 1}")
        if index is not None and (not isinstance(index, int) or not 0 <= index < self.n_latents):
            raise ConfigError(
                f"latent {index!r} out of range for layer {layer}: valid 0..{self.n_latents - 1}"
            )

    def tensors(self, names: list[str], layer: int, index: int | None = None) -> dict[str, Tensor]:
        """Slices [layer] (or [layer, index]) of the named tensors, read lazily."""
        out = {}
        with safe_open(self.folder / TENSORS, framework="pt") as f:
            for name in names:
                part = f.get_slice(name)
                out[name] = part[layer] if index is None else part[layer, index]
        return out

    def has(self, name: str) -> bool:
        """Whether the store holds tensor `name` (e.g. "direct_effect")."""
        return name in self.manifest["tensors"]

    def layer_table(self, layer: int) -> dict[str, Tensor]:
        """Per-latent summary of one layer (`layer_columns`)."""
        self._check(layer)
        t = self.tensors(LAYER_TENSORS, layer)
        return layer_columns(
            t, layer, self.n_layers, self.manifest["n_images"], self.manifest["n_tokens"]
        )

    def latent(self, layer: int, index: int) -> LatentRecord:
        """The record of latent `index` of source layer `layer`.

        Raises:
            ConfigError: `layer` or `index` out of range (the message gives the valid range).
        """
        self._check(layer, index)
        names = [f"top_{k}_{g}" for g in GROUPS for k in ("value", "image", "token", "heatmap")]
        names += ["fired_cls", "fired_patches", "fired_images", "activation_sum", "histogram"]
        names += ["write_norm", "write_share", "contribution"]
        if self.has("direct_effect"):
            names.append("direct_effect")
        t = self.tensors(names, layer, index)
        with safe_open(self.folder / TENSORS, framework="pt") as f:
            edges = f.get_tensor("histogram_edges").numpy()
        top = {g: _top_list(t, g) for g in GROUPS}
        top = {"all": self._all_list(t), **top}
        n_images, n_tokens = self.manifest["n_images"], self.manifest["n_tokens"]
        fired = int(t["fired_cls"] + t["fired_patches"])
        direct = t.get("direct_effect")
        return LatentRecord(
            layer=layer,
            index=index,
            top=top,
            token_frequency=fired / n_tokens,
            cls_frequency=int(t["fired_cls"]) / n_images,
            patch_frequency=int(t["fired_patches"]) / max(1, n_tokens - n_images),
            image_frequency=int(t["fired_images"]) / n_images,
            mean_activation=float(t["activation_sum"]) / fired if fired else float("nan"),
            histogram=t["histogram"].numpy(),
            histogram_edges=edges,
            write_norm=t["write_norm"][layer:].numpy(),
            write_share=t["write_share"][layer:].numpy(),
            contribution=t["contribution"][layer:].numpy(),
            direct_effect=None if direct is None else direct.numpy(),
            class_names=self.class_names,
        )

    def _all_list(self, t: dict[str, Tensor]) -> list[TopImage]:
        parts = [tuple(t[f"top_{k}_{g}"] for k in ("value", "image", "token")) for g in GROUPS]
        value, image, token, source = merge_all(parts[0], parts[1], self.n_top)
        heat = {
            g: dict(zip(t[f"top_image_{g}"].tolist(), t[f"top_heatmap_{g}"], strict=True))
            for g in GROUPS
        }
        return [
            TopImage(int(i), float(v), int(k), heat[GROUPS[int(s)]][int(i)].float().numpy())
            for v, i, k, s in zip(value, image, token, source, strict=True)
        ]


def _top_list(t: dict[str, Tensor], group: str) -> list[TopImage]:
    out = []
    for v, i, k, h in zip(
        t[f"top_value_{group}"],
        t[f"top_image_{group}"],
        t[f"top_token_{group}"],
        t[f"top_heatmap_{group}"],
        strict=True,
    ):
        if int(i) >= 0:
            out.append(TopImage(int(i), float(v), int(k), h.float().numpy()))
    return out
