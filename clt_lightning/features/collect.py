"""`clt features`: one streaming pass of a split through the teacher and the CLT.

Per batch of images: one teacher forward (`Teacher.run_blocks`, recording every layer's
MLP input and the final residual), then per layer `CrossLayerTranscoder.encode_layer`
and the bookkeeping: the top-N store (`topk.py`), the frequency and histogram counters
(`stats.py`), the per-latent contributions on the first `contribution_images` images and
the ln_post scale for the direct effect (`effects.py`). Then the store is written
(`store.py`) and the site built (`site.py`).

Design decisions:

- Not resumable: the pass costs about one teacher forward plus one CLT encode per image
  (docs/benchmarks.md, `features`), the same as `clt evaluate`'s reconstruction pass, so
  an interrupted run is rerun; nothing is left half-written (see `store.py`).
- Memory is bounded by the shapes, not the number of images: the top-N store
  (`topk.store_bytes`: L x F x N x 2 groups entries) plus L x F x (4 + bins) counters.
- The per-latent contribution needs y_hat at every layer, i.e. every layer's codes of the
  same tokens (a CLT forward, ~ an encode plus a decode per token): it is computed on the
  first `contribution_images` images only (default 64, 3,200 tokens with a ViT-B/32),
  which keeps a pass of thousands of images near the cost of the encode.
- Image ids are indices into the split; `max_images` takes a fixed seeded subset (the
  same subset `clt evaluate` uses for the same number and seed).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from clt_lightning.errors import ConfigError
from clt_lightning.evaluation import zeroshot
from clt_lightning.evaluation.replacement import check_compatible
from clt_lightning.features import effects, store
from clt_lightning.features.stats import (
    DEFAULT_BINS,
    DEFAULT_RANGE,
    Firings,
    LatentStats,
    one_cpu_thread,
)
from clt_lightning.features.topk import GROUPS, TopNStore, store_bytes
from clt_lightning.hashing import json_sha256, tensors_sha256
from clt_lightning.tokens import layout_of

log = logging.getLogger(__name__)


@dataclass
class FeaturesConfig:
    """What `clt features` computes and where it writes it.

    Args:
        output_dir: Folder for the store and the site (default: `<run folder>/features`).
        split: Dataset split to pass ("val", "train" or a split name of the dataset).
        max_images: Pass at most this many images (a fixed seeded subset; None = all).
        n_top: Top images kept per latent, for [CLS] and for patch tokens.
        batch_size: Images per teacher forward.
        num_workers: DataLoader workers decoding images.
        contribution_images: Images (the first of the pass) the per-latent contribution
            scores are averaged over; None = all images, 0 = none (the scores are NaN).
        histogram_bins: Bins of the log10 |activation| histogram.
        histogram_range: [lo, hi] of that histogram in log10 units.
        dense_threshold: Token frequency above which the site marks a latent dense.
        classifier_cache: Folder caching zero-shot classifiers (None = no cache).
        site: Build the static site (index.html) next to the store.
        thumbnail_size: Side of the site's thumbnails in pixels.
        overwrite: Replace a store made for another CLT in `output_dir`.
        seed: Seed of the `max_images` subset.
    """

    output_dir: str | None = None
    split: str = "val"
    max_images: int | None = None
    n_top: int = 16
    batch_size: int = 64
    num_workers: int = 0
    contribution_images: int | None = 64
    histogram_bins: int = DEFAULT_BINS
    histogram_range: tuple[float, float] = DEFAULT_RANGE
    dense_threshold: float = 0.1
    classifier_cache: str | None = ".cache/classifiers"
    site: bool = True
    thumbnail_size: int = 96
    overwrite: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("n_top", "batch_size", "histogram_bins", "thumbnail_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(
                    f"latents.{key} must be an integer >= 1, got {getattr(self, key)!r}"
                )
        for key, least in (("max_images", 1), ("contribution_images", 0)):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < least):
                raise ConfigError(
                    f"latents.{key} must be an integer >= {least} or null, got {value!r}"
                )
        lo, hi = (float(v) for v in self.histogram_range)
        if not lo < hi:
            raise ConfigError(
                f"latents.histogram_range needs lo < hi, got {list(self.histogram_range)}"
            )
        if not 0 < self.dense_threshold <= 1:
            raise ConfigError(
                f"latents.dense_threshold must be in (0, 1], got {self.dense_threshold}"
            )


@dataclass
class PassResult:
    """What `collect` returns: the tensors of the store and facts for the manifest."""

    tensors: dict[str, torch.Tensor]
    facts: dict[str, Any]


def check_token_layout(teacher: Any) -> None:
    """Refuse a teacher whose tokens are not one [CLS] then the patches.

    The store ranks [CLS] (token 0) and patch tokens (1..T-1) separately and the site lays
    tokens 1..T-1 out as the patch grid; a model without [CLS] (SigLIP) or with register
    tokens (DINOv2 with registers) would be mislabelled, so it is refused up front.

    Raises:
        ConfigError: The teacher's token layout is not 1 [CLS] + patches.
    """
    layout = layout_of(teacher)
    if layout.n_cls == 1 and layout.n_registers == 0:
        return
    config = getattr(teacher, "config", None)
    family = getattr(config, "family", "unknown")
    name = getattr(config, "model_name", None)
    if family != "timm":  # an open_clip model config file names the model when given
        name = getattr(config, "model_config", None) or name
    raise ConfigError(
        f"clt features supports teachers with one [CLS] token then patches (open_clip "
        f"ViTs, timm ViTs without registers); teacher {family}:{name} has "
        f"{layout.describe()}"
    )


def pass_images(dataset: Dataset, config: FeaturesConfig) -> tuple[Dataset, list[int]]:
    """The images of the pass and their ids (indices into `dataset`)."""
    from clt_lightning.evaluation.suite import evaluation_images

    n = len(dataset)
    if n == 0:
        raise ConfigError(
            f"split {config.split!r} has no images; pass a split with images (latents.split)"
        )
    subset = evaluation_images(dataset, config.max_images, config.seed)
    ids = list(subset.indices) if isinstance(subset, Subset) else list(range(n))
    return subset, ids


@torch.no_grad()
def collect(
    teacher: Any, clt: Any, dataset: Dataset, config: FeaturesConfig, progress: bool = True
) -> PassResult:
    """Run the pass and return the store's tensors.

    Args:
        teacher: The Teacher the CLT was trained on.
        clt: The CrossLayerTranscoder (moved to the teacher's device, eval mode).
        dataset: The split; items are (image [3, H, W], label).
        config: Settings.
        progress: Show a progress bar.

    Raises:
        CheckpointMismatchError: The CLT does not fit the teacher.
        ConfigError: The split has no images, or the teacher has no [CLS] token or has
            registers (`check_token_layout`).
    """
    check_compatible(teacher, clt)
    check_token_layout(teacher)
    images, ids = pass_images(dataset, config)
    device = teacher.device
    clt = clt.to(device).eval()
    n_layers, n_latents, n_tokens = clt.n_layers, clt.n_latents, teacher.tokens_per_image
    signed = bool(getattr(clt.sparsifier, "signed", False))
    size = store_bytes(n_layers, n_latents, config.n_top, n_tokens) / 1e6
    log.info("features: %d images; top-N store %.1f MB (L x F x N x %d groups)", len(ids), size,
             len(GROUPS))  # fmt: skip
    top = TopNStore(n_layers, n_latents, config.n_top, n_tokens, signed=signed, device=device)
    stats = LatentStats(n_layers, n_latents, config.histogram_bins, config.histogram_range, device)
    contributions = effects.LatentContributions(clt)
    budget = len(ids) if config.contribution_images is None else config.contribution_images
    sigma_sum, sigma_count, seen = 0.0, 0, 0
    has_ln_post = hasattr(teacher.backbone, "visual")  # open_clip ViT: the head linearised
    loader = DataLoader(images, batch_size=config.batch_size, num_workers=config.num_workers)
    for batch in tqdm(loader, desc="features", disable=not progress):
        pixels = batch[0] if isinstance(batch, list | tuple) else batch
        n = pixels.shape[0]
        image_ids = torch.tensor(ids[seen : seen + n], device=device)
        out = teacher.run_blocks(teacher.embed(pixels), record=True)
        if has_ln_post:
            sigma = effects.ln_post_scale(teacher, out.h)
            sigma_sum, sigma_count = sigma_sum + float(sigma.sum()), sigma_count + sigma.numel()
        _record_latents(clt, out.x, image_ids, top, stats)
        n_contrib = max(0, min(n, budget - seen))
        if n_contrib:  # [n_contrib * T, L, d] teacher-forced inputs
            contributions.update(torch.stack(out.x, 2)[:n_contrib].flatten(0, 1))
        stats.count_images(n, n_tokens)
        seen += n
    tensors = _store_tensors(top, stats, contributions, clt)
    facts = {
        "n_images": stats.n_images,
        "n_tokens": stats.n_tokens,
        "contribution_images": min(budget, len(ids)),
        "sigma_bar": sigma_sum / max(1, sigma_count),
        "signed": signed,
    }
    return PassResult(tensors, facts)


def _record_latents(
    clt: Any, inputs: list[torch.Tensor], image_ids: torch.Tensor, top: TopNStore,
    stats: LatentStats,
) -> None:  # fmt: skip
    """Encode each layer's teacher input ([n, T, d]) and feed the top-N store and counters."""
    for layer, x in enumerate(inputs):
        z = clt.encode_layer(layer, x.to(clt.W_enc.dtype)).float()  # [n, T, F]
        with one_cpu_thread(z.device):  # many small ops: see `one_cpu_thread`
            firings = Firings.of(z)  # one scan of z, shared by the store and counters
            top.update(layer, z, image_ids, firings)
            stats.update(layer, z, firings)


def _store_tensors(
    top: TopNStore, stats: LatentStats, contributions: effects.LatentContributions, clt: Any
) -> dict[str, torch.Tensor]:
    """The store's tensors (CPU) from the accumulators of a finished pass."""
    tensors: dict[str, Any] = {}
    for (_layer, group), entries in top.finish().items():  # layer-major order
        for name in ("value", "image", "token", "heatmap"):
            tensors.setdefault(f"top_{name}_{group}", []).append(getattr(entries, name))
    tensors = {k: torch.stack(v) for k, v in tensors.items()}
    tensors |= stats.tensors()
    tensors["write_norm"], tensors["write_share"] = effects.write_profile(clt)
    tensors["contribution"] = contributions.compute()
    tensors["contribution_tokens"] = contributions.n_tokens.cpu()
    return tensors


def add_direct_effect(
    result: PassResult,
    teacher: Any,
    clt: Any,
    dataset_name: str,
    dataset: Any,
    config: FeaturesConfig,
) -> list[str]:
    """Add `direct_effect` [L, F, C] when the teacher has a text tower and classes exist.

    Returns:
        The class names used ([] when skipped, with the reason logged).
    """
    if not teacher.has_text_tower or not hasattr(teacher.backbone, "visual"):
        log.info(
            "features: direct effects on classes need an open_clip ViT with a text tower "
            "(its ln_post + proj head); skipped for this teacher"
        )
        return []
    try:
        names = zeroshot.class_names_for(dataset_name, dataset)
        templates = zeroshot.templates_for(dataset_name)
    except ConfigError as error:
        log.info("features: no zero-shot classes (%s); no direct effect", error)
        return []
    classifier = zeroshot.build_classifier(teacher, names, templates, config.classifier_cache)
    sigma_bar = result.facts["sigma_bar"]
    result.tensors["direct_effect"] = effects.direct_effect(teacher, clt, classifier, sigma_bar)
    return names


def build_features(
    teacher: Any,
    clt: Any,
    dataset: Any,
    dataset_name: str,
    config: FeaturesConfig,
    output_dir: str | Path,
    checkpoint: str | None = None,
    progress: bool = True,
) -> Path:
    """The whole `clt features`: pass, direct effect, store, site.

    Args:
        teacher: The Teacher.
        clt: The CrossLayerTranscoder.
        dataset: The split (an ImageDataset with `identity()`, `raw_image`).
        dataset_name: The dataset's name (zero-shot templates and class names).
        config: Settings (`output_dir` is ignored; `output_dir` below is used).
        output_dir: Folder of the store and the site.
        checkpoint: The checkpoint path, recorded in the manifest.
        progress: Progress bars.

    Returns:
        The output folder (the site is `<folder>/index.html`).

    Raises:
        ConfigError: Bad settings, an empty split, a folder made for another CLT, or a
            teacher whose tokens are not [CLS] + patches.
        CheckpointMismatchError: The CLT does not fit the teacher.
    """
    check_compatible(teacher, clt)
    check_token_layout(teacher)
    pass_images(dataset, config)  # an empty split is refused before anything is written
    folder = Path(output_dir)
    identity = dataset.identity() if callable(getattr(dataset, "identity", None)) else {}
    fingerprints = {
        "clt": tensors_sha256(clt.state_dict()),
        "teacher": zeroshot.teacher_fingerprint(teacher),
        "dataset": json_sha256(identity),
    }
    store.prepare_folder(folder, fingerprints, config.overwrite)
    result = collect(teacher, clt, dataset, config, progress=progress)
    class_names = add_direct_effect(result, teacher, clt, dataset_name, dataset, config)
    manifest = _manifest(teacher, clt, dataset_name, identity, config, result, checkpoint)
    manifest |= {"fingerprints": fingerprints, "class_names": class_names}
    if config.site:
        from clt_lightning.features.site import write_site

        write_site(folder, result.tensors, manifest, dataset, config, progress=progress)
    store.write_store(folder, result.tensors, manifest)
    log.info("features written to %s (open %s)", folder, folder / "index.html")
    return folder


def _manifest(
    teacher: Any,
    clt: Any,
    dataset_name: str,
    identity: dict[str, Any],
    config: FeaturesConfig,
    result: PassResult,
    checkpoint: str | None,
) -> dict[str, Any]:
    """The manifest's description of the run (fingerprints and class names are added later)."""
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": checkpoint,
        "dataset": dataset_name,
        "split": config.split,
        "dataset_identity": identity,
        "teacher_identity": teacher.identity()
        if callable(getattr(teacher, "identity", None))
        else {},
        "n_layers": clt.n_layers,
        "n_latents": clt.n_latents,
        "d_model": clt.d_model,
        "tokens_per_image": teacher.tokens_per_image,
        "grid_size": int(round((teacher.tokens_per_image - 1) ** 0.5)),
        "n_top": config.n_top,
        "sparsifier": clt.sparsifier_config.name,
        "settings": {k: v for k, v in dataclasses.asdict(config).items() if k != "output_dir"},
        **result.facts,
    }


def run_command(
    teacher_config: Any, dataset_config: Any, ckpt_path: str, config: FeaturesConfig
) -> Path:
    """Body of `clt features`: load the CLT and the teacher, pass the split, write.

    Args:
        teacher_config: The run's TeacherConfig (`data.teacher`).
        dataset_config: The run's DatasetConfig (`data.dataset`).
        ckpt_path: Checkpoint written by `clt fit`.
        config: The `features:` settings.

    Returns:
        The output folder (default `<run folder>/features`).
    """
    from clt_lightning.commands import load_clt, run_folder
    from clt_lightning.data.datasets import build_dataset
    from clt_lightning.teacher import Teacher

    clt = load_clt(ckpt_path)
    teacher = Teacher(teacher_config)
    check_compatible(teacher, clt)
    check_token_layout(teacher)
    dataset = build_dataset(dataset_config, config.split, teacher.preprocess)
    output_dir = (
        Path(config.output_dir) if config.output_dir else run_folder(ckpt_path) / "features"
    )
    return build_features(
        teacher, clt, dataset, dataset_config.name, config, output_dir, checkpoint=str(ckpt_path)
    )
