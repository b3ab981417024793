"""ActivationDataModule: token batches of a frozen ViT, from an activation cache or online.

Every batch is the token batch (docs/architecture.md) `{"x": [B, L, d] float32, "y": [B, L, d] float32,
"token": [B] int64, "image": [B] int64}`, whichever the source. The streaming, shuffling and
rank/worker split live in `clt_lightning.data.streams` (pure, tested on their own) and the
two streams in `cached_stream` and `online_stream`; the train loader in `loaders`; the
normalisation from a cache in `normalisation`; the cache-vs-config check in
`cache_resume.config_mismatches`. This module only turns the config into those streams
and hands them to Lightning.

Design decisions:

- The constructor signature is the config (LightningCLI's `data:` section); nothing is
  read or built in `__init__`. `prepare_cache()` (the `clt cache` command) writes the train
  and val caches under `cache_dir/train` and `cache_dir/val`; `setup()` opens them and
  fails with a `CacheError` that says to run `clt cache --config ...` when one is missing.
- Normalisation (`normalisation()`): `scale_l = sqrt(d_model / E||a_l||^2)` per layer, for
  x (input_scale) and y (output_scale), over the tokens trained (`token_filter`), so that
  every layer has mean squared norm d in the scaled space on exactly those tokens. Cached:
  the train cache's statistics when the filter keeps every stored token, else one pass
  over the train shards (`trained_mean_sq_norms`). Online: estimated in `setup()` from the
  first `online_stats_images` images of a permutation seeded by `seed` alone (filtered
  tokens), so every rank computes the same values without communication.
- The epoch that seeds shard order and shuffling is the one Lightning gives samplers at
  each epoch start (its count of epochs processed; `trainer.current_epoch` lags by one
  after some resumes): the train loader's `sampler.set_epoch` sets it, so a resumed run
  replays the same epoch's order. The train loader is stateful
  (`EpochDataLoader.state_dict`): a mid-epoch resume skips the batches already trained
  and continues with exactly the remaining ones.
  Without a trainer, `set_epoch()` sets it. Loaders must not use persistent workers: the
  workers copy the stream, epoch included, when an iteration starts.
- Every rank yields the same number of batches per epoch: each worker yields only full
  batches and every rank stops at the smallest rank's count, computed from the manifest
  (`streams.batch_quotas`). The dropped remainder per epoch is below one batch per worker
  when shards are equal, plus the difference in tokens between the largest and smallest
  rank's shards. Validation keeps partial batches (and, on one process, every token).
- Memory: each cached train stream (the main process with num_workers=0, else each
  worker) holds about (shuffle_buffer_shards + 1) shards in the stored dtype plus one
  float32 batch: 256-image ViT-B/32 fp16 shards are 0.47 GB and a 4096-token float32
  batch 0.3 GB, so ~2.7 GB per stream at the defaults (~11 GB with 4 workers). Online,
  the token buffer on the training device holds `online_buffer_tokens` x L x d x 8 bytes
  (x and y in float32): 2.4 GB for ViT-B at 32768 tokens, plus the teacher.
- The test stage uses the validation split (the dataset config names two splits).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from clt_lightning.data.cache_reader import ActivationCache, open_cache
from clt_lightning.data.cache_resume import config_mismatches
from clt_lightning.data.cache_writer import write_cache
from clt_lightning.data.cached_stream import CachedTokenStream
from clt_lightning.data.datasets import DatasetConfig, build_dataset
from clt_lightning.data.loaders import EpochDataLoader, report_coverage
from clt_lightning.data.normalisation import scales_from_mean_sq_norm, trained_mean_sq_norms
from clt_lightning.data.online_stream import OnlineTokenStream
from clt_lightning.data.streams import permutation
from clt_lightning.errors import CacheError, ConfigError
from clt_lightning.files import require_folder
from clt_lightning.teacher import Teacher, TeacherConfig
from clt_lightning.teacher_checks import validate_device
from clt_lightning.tokens import TOKEN_GROUPS, TokenLayout

log = logging.getLogger(__name__)

_STATS_STREAM = 0x57A75  # entropy tag for the online normalisation image sample


class ActivationDataModule(L.LightningDataModule):
    """Token batches (x, y per layer) of a frozen CLIP ViT, from a cache or made online.

    Args:
        teacher: Which frozen open_clip model makes the activations.
        dataset: Which images, which splits, how many.
        cache_dir: Folder holding the `train/` and `val/` activation caches.
        source: "cache" reads `cache_dir` (write it with `clt cache`); "online" runs the
            teacher on the training device while training (no disk).
        batch_size: Tokens per training batch.
        shuffle_buffer_shards: Shards the cached shuffle buffer spans (memory: about
            shuffle_buffer_shards + 1 shards per loader worker).
        token_filter: Tokens to train and validate on: a token group the teacher has, "all",
            "cls", "registers" or "patches" (`clt_lightning.tokens`; SigLIP has no "cls").
        num_workers: DataLoader workers per rank (cached: shard readers; online: image
            decoders).
        seed: Seed for shard/image order and token shuffling (with the epoch).
        val_batch_size: Tokens per validation batch (default: batch_size).
        max_val_tokens: Validate on at most this many tokens per rank (whole batches; the
            same subset every time); None validates on everything.
        verify_cache: Check every shard's sha256 each time it is read (about 1 s of CPU
            per GB read, spread over the workers); false skips it after a verified run.
        cache_dtype: Stored dtype of x and y in the cache: "fp16", "bf16" or "fp32".
        images_per_shard: Images per cache shard.
        cache_batch_size: Images per teacher forward while writing the cache.
        cache_tokens: Tokens stored per image: "all", "cls" or "cls+random" ([CLS] plus
            `n_random_patches` random patches per image).
        n_random_patches: Patches per image stored with cache_tokens="cls+random".
        on_bad_image: "error" stops at an unreadable image; "skip" leaves it out (logged).
        online_image_batch: Images per teacher forward in online mode.
        online_buffer_tokens: Online shuffle buffer capacity in tokens (on the device).
        online_device: Device for the online teacher; "auto" = the trainer's root device
            (CUDA if available without a trainer).
        online_stats_images: Images used to estimate the online normalisation.

    Memory: a cached train loader worker holds about (shuffle_buffer_shards + 1) shards in
    the stored dtype plus one float32 batch (256-image ViT-B/32 fp16 shards are 0.47 GB:
    ~2.7 GB per worker at the defaults). Online, the token buffer on the device holds
    online_buffer_tokens x L x d x 8 bytes in fp32 (2.4 GB for ViT-B at 32768) plus the
    teacher.
    """

    def __init__(
        self,
        teacher: TeacherConfig,
        dataset: DatasetConfig,
        cache_dir: str | None = ".cache/activations/default",
        source: Literal["cache", "online"] = "cache",
        batch_size: int = 4096,
        shuffle_buffer_shards: int = 4,
        token_filter: Literal["all", "cls", "registers", "patches"] = "all",
        num_workers: int = 0,
        seed: int = 0,
        val_batch_size: int | None = None,
        max_val_tokens: int | None = None,
        verify_cache: bool = True,
        cache_dtype: Literal["fp16", "bf16", "fp32"] = "fp16",
        images_per_shard: int = 256,
        cache_batch_size: int = 64,
        cache_tokens: Literal["all", "cls", "cls+random"] = "all",
        n_random_patches: int = 16,
        on_bad_image: Literal["error", "skip"] = "error",
        online_image_batch: int = 64,
        online_buffer_tokens: int = 32768,
        online_device: str = "auto",
        online_stats_images: int = 256,
    ) -> None:
        super().__init__()
        self.teacher_config = teacher
        self.dataset_config = dataset
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.source = source
        self.batch_size = batch_size
        self.shuffle_buffer_shards = shuffle_buffer_shards
        self.token_filter = token_filter
        self.num_workers = num_workers
        self.seed = seed
        self.val_batch_size = batch_size if val_batch_size is None else val_batch_size
        self.max_val_tokens = max_val_tokens
        self.verify_cache = verify_cache
        self.cache_options = {  # keyword arguments of write_cache
            "dtype": cache_dtype,
            "images_per_shard": images_per_shard,
            "batch_size": cache_batch_size,
            "tokens": cache_tokens,
            "n_random_patches": n_random_patches,
            "on_bad_image": on_bad_image,
        }
        self.on_bad_image = on_bad_image
        self.online_image_batch = online_image_batch
        self.online_buffer_tokens = online_buffer_tokens
        self.online_device = online_device
        self.online_stats_images = online_stats_images
        self._validate()
        self._caches: dict[str, ActivationCache] = {}
        self._teacher: Teacher | None = None
        self._online_images: dict[str, Any] = {}
        self._scales: tuple[Tensor, Tensor] | None = None
        self._meta: dict[str, Any] = {}
        self._class_names: list[str] | None = None
        self._epoch = 0

    # ------------------------------------------------------------------ config checks
    def _validate(self) -> None:
        positive = {
            "batch_size": self.batch_size,
            "val_batch_size": self.val_batch_size,
            "shuffle_buffer_shards": self.shuffle_buffer_shards,
            "images_per_shard": self.cache_options["images_per_shard"],
            "cache_batch_size": self.cache_options["batch_size"],
            "online_image_batch": self.online_image_batch,
            "online_buffer_tokens": self.online_buffer_tokens,
            "online_stats_images": self.online_stats_images,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {value}")
        for key, value in {"num_workers": self.num_workers, "seed": self.seed}.items():
            if value < 0:
                raise ConfigError(f"data.{key} must be >= 0, got {value}")
        if self.source not in ("cache", "online"):
            raise ConfigError(f"data.source must be 'cache' or 'online', got {self.source!r}")
        if self.token_filter not in TOKEN_GROUPS:
            raise ConfigError(
                f"data.token_filter must be one of {TOKEN_GROUPS}, got {self.token_filter!r}"
            )
        if self.source == "cache" and self.cache_dir is None:
            raise ConfigError("data.cache_dir is required with data.source='cache'")
        if self.online_device != "auto":
            validate_device(self.online_device, "data.online_device")
        if self.cache_dir is not None:
            require_folder(self.cache_dir, "data.cache_dir")
        if self.max_val_tokens is not None and self.max_val_tokens < 1:
            raise ConfigError(
                f"data.max_val_tokens must be >= 1 or null, got {self.max_val_tokens}"
            )

    # ------------------------------------------------------------------ cache writing
    def cache_path(self, split: Literal["train", "val"]) -> Path:
        """Folder of one split's activation cache."""
        if self.cache_dir is None:
            raise ConfigError("data.cache_dir is not set")
        return self.cache_dir / split

    def prepare_cache(self, progress: bool = True) -> dict[str, Path]:
        """Write (or resume) the train and val caches; the `clt cache` command calls this.

        Returns:
            {"train": path, "val": path}.
        """
        teacher = Teacher(self.teacher_config)
        written = {}
        for split in ("train", "val"):
            images = build_dataset(self.dataset_config, split, teacher.preprocess)
            log.info(
                "writing the %s activation cache (%d images) to %s",
                split,
                len(images),
                self.cache_path(split),
            )
            written[split] = write_cache(
                teacher,
                images,
                self.cache_path(split),
                num_workers=self.num_workers,
                seed=self.seed,
                progress=progress,
                **self.cache_options,
            )
        return written

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Open the caches (or build the online teacher) and read shape and normalisation."""
        if self._meta:  # already set up (Lightning calls setup once per stage)
            return
        if self.source == "cache":
            self._setup_cached()
        else:
            self._setup_online()
        log.info("data: %s source, %d layers, d_model %d", self.source, self.n_layers, self.d_model)

    def train_dataloader(self) -> DataLoader:
        stream = self._stream("train", self.batch_size, shuffle=True, max_batches=None)
        stream.set_epoch(self._current_epoch())
        report_coverage(stream, self.batch_size)
        workers = self.num_workers if self.source == "cache" else 0
        return EpochDataLoader(
            stream, batch_size=None, num_workers=workers, trainer_fn=lambda: self.trainer
        )

    def val_dataloader(self) -> DataLoader:
        max_batches = None
        if self.max_val_tokens is not None:
            max_batches = math.ceil(self.max_val_tokens / self.val_batch_size)
        stream = self._stream("val", self.val_batch_size, shuffle=False, max_batches=max_batches)
        workers = self.num_workers if self.source == "cache" else 0
        return DataLoader(stream, batch_size=None, num_workers=workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    # ------------------------------------------------------------------ public state
    @property
    def n_layers(self) -> int:
        """Layers L of the teacher (after setup)."""
        return self._require("n_layers")

    @property
    def d_model(self) -> int:
        """Residual width d of the teacher (after setup)."""
        return self._require("d_model")

    @property
    def tokens_per_image(self) -> int:
        """Tokens stored per image (cache) or made per image (online), after setup."""
        return self._require("tokens_per_image")

    @property
    def teacher_identity(self) -> dict[str, Any]:
        """The teacher's identity dict (from the cache manifest, or the live teacher)."""
        return self._require("teacher_identity")

    @property
    def class_names(self) -> list[str]:
        """Class names of the validation split (built on first use)."""
        if self._class_names is None:
            images = build_dataset(self.dataset_config, "val", None)
            self._class_names = list(images.class_names)
        return self._class_names

    def normalisation(self) -> tuple[Tensor, Tensor]:
        """Per-layer (input_scale [L], output_scale [L]) = sqrt(d_model / E||a_l||^2)."""
        if self._scales is None:
            raise RuntimeError("call setup() before normalisation()")
        return self._scales[0].clone(), self._scales[1].clone()

    def set_epoch(self, epoch: int) -> None:
        """Epoch for the train stream when no trainer is attached."""
        self._epoch = epoch

    # ------------------------------------------------------------------ internals
    def _require(self, key: str) -> Any:
        if key not in self._meta:
            raise RuntimeError(f"call setup() before reading {key}")
        return self._meta[key]

    def _current_epoch(self) -> int:
        """The epoch a new train loader starts with (`set_epoch` without a trainer). Under
        a trainer, Lightning sets each epoch's number through the loader's sampler before
        iterating (`EpochDataLoader`), so this only sizes the first epoch."""
        return self._epoch if self.trainer is None else self.trainer.current_epoch

    def _layout(self) -> tuple[int, int]:
        """(world_size, rank) from the trainer, else torch.distributed, else (1, 0)."""
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _open(self, split: Literal["train", "val"]) -> ActivationCache:
        path = self.cache_path(split)
        if not (path / "manifest.json").is_file():
            raise CacheError(
                f"no {split} activation cache at {path} (no manifest.json): write it with "
                "`clt cache --config <your config>`, or set data.source=online"
            )
        return open_cache(path, verify=self.verify_cache)

    def _setup_cached(self) -> None:
        train, val = self._open("train"), self._open("val")
        for split, cache in (("train", train), ("val", val)):
            problems = config_mismatches(
                cache.manifest,
                self.teacher_config,
                self.dataset_config,
                split,
                self.cache_options,
                self.seed,
            )
            if problems:
                raise CacheError(
                    f"the {split} cache {cache.path} was written with other settings: "
                    + "; ".join(problems)
                    + ". Use another data.cache_dir, or rerun `clt cache` after deleting it"
                )
        for key in ("n_layers", "d_model", "tokens_per_image"):
            if getattr(train, key) != getattr(val, key):
                raise CacheError(
                    f"{key} differs between {train.path} ({getattr(train, key)}) and "
                    f"{val.path} ({getattr(val, key)}): write both with the same teacher"
                )
        layout = TokenLayout.from_identity(train.manifest.get("teacher", {}))
        layout.check(self.token_filter, "data.token_filter")
        if self.token_filter == "patches" and train.tokens_per_image == 1:
            raise ConfigError(
                "data.token_filter='patches' but the cache stores only [CLS] tokens "
                "(cache_tokens='cls'); use token_filter 'cls' or 'all'"
            )
        self._caches = {"train": train, "val": val}
        x_msn, y_msn = trained_mean_sq_norms(train, self.token_filter)
        self._scales = (
            scales_from_mean_sq_norm(x_msn, train.d_model),
            scales_from_mean_sq_norm(y_msn, train.d_model),
        )
        self._meta.update(
            n_layers=train.n_layers,
            d_model=train.d_model,
            tokens_per_image=train.tokens_per_image,
            teacher_identity=dict(train.manifest.get("teacher", {})),
        )

    def _online_device(self) -> torch.device:
        if self.online_device != "auto":
            return torch.device(self.online_device)
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _setup_online(self) -> None:
        config = dataclasses.replace(self.teacher_config, device=str(self._online_device()))
        self._teacher = Teacher(config)
        self._teacher.token_layout.check(self.token_filter, "data.token_filter")
        for split in ("train", "val"):
            self._online_images[split] = build_dataset(
                self.dataset_config, split, self._teacher.preprocess
            )
        self._meta.update(
            n_layers=self._teacher.n_layers,
            d_model=self._teacher.d_model,
            tokens_per_image=self._teacher.tokens_per_image,
            teacher_identity=self._teacher.identity(),
        )
        self._scales = self._estimate_online_scales()

    def _estimate_online_scales(self) -> tuple[Tensor, Tensor]:
        """Normalisation from the first online_stats_images images of a seed-only
        permutation, over the tokens that `token_filter` keeps (those trained)."""
        stream = self._stream(
            "train", self.batch_size, shuffle=False, max_batches=None, layout=(1, 0)
        )
        n_images = len(self._online_images["train"])
        ids = permutation(n_images, [self.seed, _STATS_STREAM])[: self.online_stats_images]
        log.info("estimating the online normalisation from %d images", len(ids))
        sums = torch.zeros(2, self.n_layers, dtype=torch.float64)
        count = 0
        for rows in stream.image_rows(ids):  # the tokens trained (data.token_filter)
            sums[0] += rows["x"].double().square().sum(dim=(0, 2)).cpu()
            sums[1] += rows["y"].double().square().sum(dim=(0, 2)).cpu()
            count += len(rows["token"])
        if count == 0:
            raise CacheError("no readable images to estimate the online normalisation from")
        log.info("online normalisation estimated from %d images (%d tokens)", len(ids), count)
        x_scale, y_scale = (scales_from_mean_sq_norm(m, self.d_model) for m in sums / count)
        return x_scale, y_scale

    def _stream(
        self,
        split: str,
        batch_size: int,
        shuffle: bool,
        max_batches: int | None,
        layout: tuple[int, int] | None = None,
    ) -> CachedTokenStream | OnlineTokenStream:
        if not self._meta:
            raise RuntimeError("call setup() before asking for a dataloader")
        world_size, rank = layout or self._layout()
        common = dict(
            batch_size=batch_size,
            token_filter=self.token_filter,
            token_layout=TokenLayout.from_identity(self.teacher_identity),
            seed=self.seed,
            shuffle=shuffle,
            world_size=world_size,
            rank=rank,
            num_workers=self.num_workers,
            drop_last=shuffle,
            max_batches=max_batches,
        )
        if self.source == "cache":
            return CachedTokenStream(
                self._caches[split],
                buffer_shards=self.shuffle_buffer_shards,
                verify=self.verify_cache,
                **common,
            )
        return OnlineTokenStream(
            self._teacher.capture,
            self._online_images[split],
            self.tokens_per_image,
            self._teacher.device,
            image_batch=self.online_image_batch,
            buffer_tokens=self.online_buffer_tokens,
            skip_bad_images=self.on_bad_image == "skip",
            **common,
        )
