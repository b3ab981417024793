"""DDP on 2 CPU processes (gloo) trains exactly what 1 process trains with the global batch.

`clt fit --trainer.devices 2 --trainer.strategy ddp` runs in a child process (Lightning
starts the second rank itself). Each rank reads its own disjoint half of the cache's
shards (`streams.assign_shards`). The reference is one process whose batch i is the
concatenation of rank 0's and rank 1's batch i, built from the same `CachedTokenStream`s
with world_size=2: with the loss a mean over tokens, DDP's gradient average equals the
gradient of the concatenated batch, so the weights must agree to float64 rounding
(`--trainer.precision 64-true`). Validation R^2 is reduced from summed statistics, so the
value logged by the 2-process run (each rank validating half of the images) must equal the
single process's value over all images.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset

from clt_lightning.data.cache_reader import open_cache
from clt_lightning.data.cached_stream import CachedTokenStream
from clt_lightning.data.loaders import EpochDataLoader
from tests.integration.tiny_run import (
    BATCH,
    N_IMAGES,
    finish,
    last_values,
    load_state,
    read_metrics,
    spawn_clt,
    write_config,
)

DDP = {"trainer.devices": 2, "trainer.strategy": "ddp", "trainer.precision": "64-true"}
TOLERANCE = {"rtol": 1e-9, "atol": 1e-12}
MEASURED: dict[str, float] = {}


class GlobalBatches(IterableDataset):
    """Batch i = concatenation of every rank's batch i (what DDP averages over)."""

    def __init__(self, streams: list[CachedTokenStream]) -> None:
        super().__init__()
        self.streams = streams

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for stream in self.streams:
            stream.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.streams[0])

    def __iter__(self):
        for parts in zip(*self.streams, strict=True):
            yield {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def rank_streams(cache_dir: Path, world_size: int = 2) -> list[CachedTokenStream]:
    """The train streams the datamodule builds for each rank of a `world_size` run."""
    cache = open_cache(cache_dir / "train")
    return [
        CachedTokenStream(cache, BATCH, buffer_shards=2, world_size=world_size, rank=rank)
        for rank in range(world_size)
    ]


def test_ranks_read_disjoint_halves(tiny_cache):
    streams = rank_streams(tiny_cache)
    for epoch in range(2):
        images = []
        for stream in streams:
            stream.set_epoch(epoch)
            images.append({i for batch in stream for i in batch["image"].tolist()})
        assert not images[0] & images[1]
        assert images[0] | images[1] == set(range(N_IMAGES))
        assert len(streams[0]) == len(streams[1]) == 4  # equal batch counts: no DDP hang


def _reference_run(tiny_cache: Path, tmp_path: Path) -> tuple[Path, dict]:
    """One process, global batch = both ranks' batches; the same config otherwise."""
    from clt_lightning.cli import build_cli

    run = tmp_path / "single"
    config = write_config(
        tmp_path / "single.yaml",
        tiny_cache,
        run,
        **{**DDP, "trainer.devices": 1, "trainer.strategy": "auto"},
    )
    cli = build_cli(["--config", str(config)], run=False)
    streams = rank_streams(tiny_cache)
    cli.datamodule.train_dataloader = lambda: EpochDataLoader(  # instance attribute: used by fit
        GlobalBatches(streams), batch_size=None, trainer_fn=lambda: cli.trainer
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return run, {k: v.detach().clone() for k, v in cli.model.state_dict().items()}


@pytest.fixture(scope="module")
def ddp_run(tiny_cache, tmp_path_factory) -> Path:
    """`clt fit` on 2 CPU processes (float64); its run folder."""
    root = tmp_path_factory.mktemp("ddp")
    config = write_config(root / "ddp.yaml", tiny_cache, root / "run", **DDP)
    log = root / "ddp.log"
    child = spawn_clt(["fit", "--config", str(config)], log)
    assert finish(child, log, timeout=300) == 0, log.read_text()[-3000:]
    return root / "run"


@pytest.fixture(scope="module")
def single_run(tiny_cache, tmp_path_factory) -> tuple[Path, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_run(tiny_cache, tmp_path_factory.mktemp("single"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_ddp_equals_one_process_with_the_global_batch(ddp_run, single_run):
    ckpt = ddp_run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 8
    ddp_state = load_state(ckpt)
    single_dir, single_state = single_run
    worst_abs = worst_rel = 0.0
    for name, value in single_state.items():
        other = ddp_state[name]
        if not value.is_floating_point():
            continue
        assert value.dtype == other.dtype == torch.float64, name
        diff = (value - other).abs()
        worst_abs = max(worst_abs, diff.max().item())
        worst_rel = max(worst_rel, (diff / value.abs().clamp_min(1e-6)).max().item())
        torch.testing.assert_close(other, value, **TOLERANCE, msg=name)
    MEASURED["weights max abs diff"] = worst_abs
    MEASURED["weights max rel diff"] = worst_rel

    ddp_val = last_values(read_metrics(ddp_run), "val/")
    single_val = last_values(read_metrics(single_dir), "val/")
    assert ddp_val.keys() == single_val.keys() and len(ddp_val) == 49
    for key, value in single_val.items():
        assert math.isclose(ddp_val[key], value, rel_tol=1e-9, abs_tol=1e-12), key
    MEASURED["val metrics max abs diff"] = max(abs(ddp_val[k] - single_val[k]) for k in ddp_val)
    MEASURED["val/r2/mean"] = single_val["val/r2/mean"]
    print(f"\nDDP (2 CPU processes, gloo) vs 1 process with the global batch: {MEASURED}")


@pytest.mark.slow
def test_ddp_dead_latent_statistics_count_every_rank(ddp_run, single_run):
    ddp_state = load_state(ddp_run / "checkpoints" / "last.ckpt")
    _, single_state = single_run
    for name in ("clt.sparsifier.n_tokens_seen", "clt.sparsifier.tokens_since_fired"):
        assert torch.equal(ddp_state[name], single_state[name]), name


@pytest.mark.slow
def test_evaluation_callback_runs_once_on_rank_zero(tiny_cache, tmp_path):
    """Under DDP the evaluation suite runs in one process, global rank 0, and writes its
    results once; the other rank waits at the barrier and the run ends cleanly."""
    run, count = tmp_path / "ddp", tmp_path / "suite_runs.txt"
    callback = {
        "class_path": "tests.integration.ddp_probes.CountingEvaluationCallback",
        "init_args": {
            "count_file": str(count),
            "config": {"n_images": 4, "figures": False,
                       "classifier_cache": str(tmp_path / "classifiers")},
            "every_n_epochs": 1,
        },
    }  # fmt: skip
    overrides = {**DDP, "trainer.precision": "32-true", "trainer.max_epochs": 1}
    config = write_config(tmp_path / "ddp.yaml", tiny_cache, run,
                          **overrides, **{"trainer.callbacks": [callback]})  # fmt: skip
    log = tmp_path / "ddp.log"
    assert finish(spawn_clt(["fit", "--config", str(config)], log), log) == 0, log.read_text()[
        -3000:
    ]
    lines = count.read_text().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["rank", "0"],
        ["rank", "0"],
    ]  # epoch 0 + fit end
    assert len({line.split()[3] for line in lines}) == 1  # one process
    assert (run / "evaluation" / "run.json").is_file()
    assert (run / "evaluation" / "epoch_00" / "run.json").is_file()
    rows = read_metrics(run)
    # logged once per evaluation (epoch 0: eval/, fit end: eval_full/), not once per rank
    assert len([r for r in rows if r.get("eval/baseline_top1")]) == 1
    assert len([r for r in rows if r.get("eval_full/baseline_top1")]) == 1
