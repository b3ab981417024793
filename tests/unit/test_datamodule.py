"""ActivationDataModule on real tiny caches (tiny teacher, scikit-learn digits)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser

from clt_lightning.data.datamodule import ActivationDataModule
from clt_lightning.data.datasets import DatasetConfig
from clt_lightning.data.loaders import bench_datamodule
from clt_lightning.errors import CacheError, ConfigError

N_IMAGES, TOKENS, N_LAYERS, D_MODEL = 12, 17, 3, 32  # 12 digits x 17 tokens = 204 = 12 x 17


def _module(cache_dir: Path, teacher_config, **overrides) -> ActivationDataModule:
    options = dict(
        teacher=teacher_config,
        dataset=DatasetConfig(name="digits", max_images=N_IMAGES),
        cache_dir=str(cache_dir),
        batch_size=TOKENS,
        val_batch_size=40,
        shuffle_buffer_shards=2,
        cache_dtype="fp32",
        images_per_shard=4,
        cache_batch_size=4,
        online_image_batch=5,
        online_buffer_tokens=64,
        online_device="cpu",
        online_stats_images=N_IMAGES,
    )
    options.update(overrides)
    return ActivationDataModule(**options)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """train/ and val/ caches (fp32, 3 shards of 4 images each) written by prepare_cache."""
    from clt_lightning.teacher import TeacherConfig

    config = TeacherConfig(
        model_config=str(Path(__file__).parents[1] / "fixtures" / "tiny-vit.json")
    )
    path = tmp_path_factory.mktemp("activations")
    written = _module(path, config).prepare_cache(progress=False)
    assert written == {"train": path / "train", "val": path / "val"}
    return path


@pytest.fixture
def cached(cache_dir: Path, tiny_teacher_config) -> ActivationDataModule:
    module = _module(cache_dir, tiny_teacher_config)
    module.setup("fit")
    return module


def _rows(batches) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    rows = {}
    for b in batches:
        for r, key in enumerate(zip(b["image"].tolist(), b["token"].tolist(), strict=True)):
            assert key not in rows, f"token {key} yielded twice"
            rows[key] = (b["x"][r], b["y"][r])
    return rows


def _shard_arrays(module: ActivationDataModule, split: str) -> tuple[np.ndarray, np.ndarray]:
    cache = module._caches[split]
    shards = [cache.load_shard(i) for i in range(cache.n_shards)]
    return (
        np.concatenate([s["x"].numpy() for s in shards]).astype(np.float64),
        np.concatenate([s["y"].numpy() for s in shards]).astype(np.float64),
    )


def test_shape_and_identity_after_setup(cached):
    assert (cached.n_layers, cached.d_model, cached.tokens_per_image) == (N_LAYERS, D_MODEL, TOKENS)
    assert cached.teacher_identity["n_layers"] == N_LAYERS
    assert cached.class_names[:2] == ["zero", "one"]


def test_train_batches_follow_the_contract_and_cover_every_token_once(cached):
    batches = list(cached.train_dataloader())
    assert len(batches) == N_IMAGES  # 204 tokens / 17 per batch: nothing truncated
    for b in batches:
        assert set(b) == {"x", "y", "token", "image"}
        assert b["x"].shape == b["y"].shape == (TOKENS, N_LAYERS, D_MODEL)
        assert b["x"].dtype == b["y"].dtype == torch.float32
        assert b["token"].dtype == b["image"].dtype == torch.int64
    rows = _rows(batches)
    assert set(rows) == {(i, t) for i in range(N_IMAGES) for t in range(TOKENS)}
    x, y = _shard_arrays(cached, "train")
    for (image, token), (row_x, row_y) in rows.items():
        np.testing.assert_array_equal(row_x.numpy(), x[image, token])
        np.testing.assert_array_equal(row_y.numpy(), y[image, token])


def test_normalisation_matches_numpy_over_the_shards(cached):
    x, y = _shard_arrays(cached, "train")  # [N, T, L, d]
    expected_in = np.sqrt(D_MODEL / (x**2).sum(-1).mean(axis=(0, 1)))
    expected_out = np.sqrt(D_MODEL / (y**2).sum(-1).mean(axis=(0, 1)))
    input_scale, output_scale = cached.normalisation()
    assert input_scale.shape == output_scale.shape == (N_LAYERS,)
    assert input_scale.dtype == torch.float32
    np.testing.assert_allclose(input_scale.numpy(), expected_in, rtol=1e-5)
    np.testing.assert_allclose(output_scale.numpy(), expected_out, rtol=1e-5)


@pytest.mark.parametrize(
    ("token_filter", "n_rows"), [("cls", N_IMAGES), ("patches", N_IMAGES * 16)]
)
def test_token_filter(cache_dir, tiny_teacher_config, token_filter, n_rows):
    module = _module(cache_dir, tiny_teacher_config, token_filter=token_filter, batch_size=4)
    module.setup("fit")
    tokens = torch.cat([b["token"] for b in module.train_dataloader()])
    assert len(tokens) == n_rows
    assert (tokens == 0).all() if token_filter == "cls" else (tokens != 0).all()


@pytest.mark.parametrize("token_filter", ["cls", "patches"])
@pytest.mark.parametrize("source", ["cache", "online"])
def test_normalisation_is_of_the_trained_tokens(
    cache_dir, tiny_teacher_config, token_filter, source
):
    """E||a_l * scale_l||^2 / d = 1 per layer on the tokens trained (issue 11.4: with
    token_filter=cls the scales came from all tokens), cached and online alike; checked
    with numpy over the shards' filtered tokens."""
    module = _module(cache_dir, tiny_teacher_config, token_filter=token_filter, source=source)
    module.setup("fit")
    x, y = _shard_arrays(_cached(cache_dir, tiny_teacher_config), "train")  # [N, T, L, d]
    keep = slice(0, 1) if token_filter == "cls" else slice(1, None)
    for scale, values in zip(module.normalisation(), (x, y), strict=True):
        kept = values[:, keep] * scale.numpy().astype(np.float64)[:, None]
        per_layer = (kept**2).sum(-1).mean(axis=(0, 1)) / D_MODEL
        np.testing.assert_allclose(per_layer, np.ones(N_LAYERS), rtol=1e-5)


def _cached(cache_dir: Path, teacher_config) -> ActivationDataModule:
    module = _module(cache_dir, teacher_config)
    module.setup("fit")
    return module


def test_epoch_from_trainer_changes_order_and_is_deterministic(cached):
    def order(epoch: int) -> list[tuple[int, int]]:
        cached.trainer = SimpleNamespace(current_epoch=epoch, world_size=1, global_rank=0)
        return [
            k
            for b in cached.train_dataloader()
            for k in zip(b["image"].tolist(), b["token"].tolist(), strict=True)
        ]

    first = order(0)
    assert first == order(0)
    assert first != order(1)
    assert sorted(first) == sorted(order(1))


def test_ranks_get_disjoint_tokens_and_equal_batch_counts(cached):
    per_rank = []
    for rank in range(2):  # 3 shards over 2 ranks: 2 and 1 shards -> truncated to the smaller
        cached.trainer = SimpleNamespace(current_epoch=0, world_size=2, global_rank=rank)
        loader = cached.train_dataloader()
        per_rank.append(list(loader))
        assert len(per_rank[-1]) == len(loader) == 4  # floor(4 images x 17 / 17)
    keys = [set(_rows(batches)) for batches in per_rank]
    assert not keys[0] & keys[1]


def test_validation_is_in_stored_order_with_every_token(cached):
    batches = list(cached.val_dataloader())
    pairs = [k for b in batches for k in zip(b["image"].tolist(), b["token"].tolist(), strict=True)]
    n_val = cached._caches["val"].n_images
    assert pairs == [(i, t) for i in range(n_val) for t in range(TOKENS)]
    assert [len(b["token"]) for b in batches[:-1]] == [40] * (len(batches) - 1)
    x, _ = _shard_arrays(cached, "val")
    np.testing.assert_array_equal(
        torch.cat([b["x"] for b in batches]).numpy(), x.reshape(-1, N_LAYERS, D_MODEL)
    )


def test_max_val_tokens_caps_validation(cache_dir, tiny_teacher_config):
    module = _module(cache_dir, tiny_teacher_config, max_val_tokens=50)
    module.setup("validate")
    assert [len(b["token"]) for b in module.val_dataloader()] == [40, 40]


def test_online_equals_cached(cached, cache_dir, tiny_teacher_config):
    online = _module(cache_dir, tiny_teacher_config, source="online")
    online.setup("fit")
    online_rows, cached_rows = _rows(online.train_dataloader()), _rows(cached.train_dataloader())
    assert sorted(online_rows) == sorted(cached_rows)
    for key, (x, y) in cached_rows.items():
        torch.testing.assert_close(online_rows[key][0], x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(online_rows[key][1], y, rtol=1e-5, atol=1e-5)
    # all train images used for the estimate: equals the train cache's statistics
    for online_scale, cached_scale in zip(
        online.normalisation(), cached.normalisation(), strict=True
    ):
        torch.testing.assert_close(online_scale, cached_scale, rtol=1e-5, atol=0)
    assert online.teacher_identity == cached.teacher_identity


def test_online_ranks_split_images(cache_dir, tiny_teacher_config):
    online = _module(cache_dir, tiny_teacher_config, source="online", online_stats_images=2)
    online.setup("fit")
    images = []
    for rank in range(2):
        online.trainer = SimpleNamespace(
            current_epoch=0,
            world_size=2,
            global_rank=rank,
            strategy=SimpleNamespace(root_device=torch.device("cpu")),
        )
        batches = list(online.train_dataloader())
        assert len(batches) == 6  # 6 images x 17 tokens per rank
        images.append({i for b in batches for i in b["image"].tolist()})
    assert not images[0] & images[1]
    assert images[0] | images[1] == set(range(N_IMAGES))


def test_cls_random_cache_keeps_token_positions(tmp_path, tiny_teacher_config):
    options = dict(dataset=DatasetConfig(name="digits", max_images=6), cache_tokens="cls+random")
    options.update(n_random_patches=3, batch_size=6)
    _module(tmp_path, tiny_teacher_config, **options).prepare_cache(progress=False)
    module = _module(tmp_path, tiny_teacher_config, token_filter="patches", **options)
    module.setup("fit")
    pairs = set(_rows(module.train_dataloader()))
    cache = module._caches["train"]
    stored = {
        (int(image), int(token))
        for i in range(cache.n_shards)
        for image, positions in zip(
            cache.load_shard(i)["image_id"], cache.load_shard(i)["token_index"], strict=True
        )
        for token in positions[1:]
    }
    assert len(stored) == 6 * 3 == len(pairs)
    assert pairs == stored
    with pytest.raises(CacheError, match="cache_tokens"):
        _module(tmp_path, tiny_teacher_config, **{**options, "n_random_patches": 4}).setup("fit")


def test_cache_written_with_other_settings_is_refused(cache_dir, tiny_teacher_config):
    module = _module(cache_dir, tiny_teacher_config, cache_dtype="fp16")
    with pytest.raises(CacheError, match="cache_dtype: cache has 'fp32', config has 'fp16'"):
        module.setup("fit")


def test_missing_cache_says_how_to_write_it(tmp_path, tiny_teacher_config):
    module = _module(tmp_path / "nothing", tiny_teacher_config)
    with pytest.raises(CacheError, match="clt cache --config"):
        module.setup("fit")


@pytest.mark.parametrize(
    ("key", "value"),
    [("batch_size", 0), ("token_filter", "patch"), ("source", "disk"), ("num_workers", -1)],
)
def test_bad_config_names_the_key(tmp_path, tiny_teacher_config, key, value):
    with pytest.raises(ConfigError, match=key):
        _module(tmp_path, tiny_teacher_config, **{key: value})


def test_signature_is_the_config(tmp_path, tiny_model_config):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ActivationDataModule, "data")
    config = parser.parse_args(
        [
            f"--data.teacher.model_config={tiny_model_config}",
            "--data.dataset.name=digits",
            f"--data.cache_dir={tmp_path}",
            "--data.token_filter=cls",
        ]
    )
    module = parser.instantiate(config).data
    assert isinstance(module, ActivationDataModule)
    assert module.token_filter == "cls" and module.batch_size == 4096
    assert "Tokens per training batch" in parser.format_help()


class _Recorder(L.LightningModule):
    """Records (epoch, image, token) of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, int, int]] = []

    def training_step(self, batch, batch_idx):
        epoch = self.current_epoch
        self.seen += [
            (epoch, i, t)
            for i, t in zip(batch["image"].tolist(), batch["token"].tolist(), strict=True)
        ]
        return (self.weight * batch["x"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_fit_reshuffles_each_epoch(cached, tmp_path):
    recorder = _Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(recorder, datamodule=cached)
    epochs = [[(i, t) for e, i, t in recorder.seen if e == epoch] for epoch in range(2)]
    assert (
        Counter(epochs[0])
        == Counter(epochs[1])
        == Counter((i, t) for i in range(N_IMAGES) for t in range(TOKENS))
    )
    assert epochs[0] != epochs[1]


def test_bench_datamodule_reports_throughput(cache_dir):
    result = bench_datamodule(cache_dir / "train", batch_size=TOKENS, n_batches=3)
    assert result["batches"] == 3
    assert result["tokens_per_s"] > 0 and result["mb_per_s"] > 0
