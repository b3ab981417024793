"""Token streams: shard/image split, quotas, shuffle buffer, cached stream (fake cache)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from clt_lightning.data.cached_stream import CachedTokenStream
from clt_lightning.data.streams import (
    TokenBuffer,
    assign_images,
    assign_shards,
    batch_quotas,
    ordered_batches,
    shard_token_rows,
    shuffled_batches,
)
from clt_lightning.errors import CacheError

N_LAYERS, D_MODEL, TOKENS = 2, 4, 5


class FakeCache:
    """ActivationCache look-alike: shard s holds images with ids offset by 100 * s."""

    def __init__(self, shard_image_counts: list[int], dtype: torch.dtype = torch.float16) -> None:
        self.path = Path("/nonexistent/fake-cache")
        self.shard_image_counts = shard_image_counts
        self.n_shards = len(shard_image_counts)
        self.tokens_per_image, self.n_layers, self.d_model = TOKENS, N_LAYERS, D_MODEL
        self.dtype = dtype
        self.loads: list[int] = []

    def load_shard(self, i: int) -> dict[str, torch.Tensor]:
        self.loads.append(i)
        n = self.shard_image_counts[i]
        g = torch.Generator().manual_seed(i)
        x = torch.randn(n, TOKENS, N_LAYERS, D_MODEL, generator=g).to(self.dtype)
        return {
            "x": x,
            "y": (2 * x.float() + 1).to(self.dtype),
            "label": torch.zeros(n, dtype=torch.int64),
            "image_id": torch.arange(n, dtype=torch.int64) + 100 * i,
            "token_index": torch.arange(TOKENS).expand(n, TOKENS).clone(),
        }

    def all_rows(self) -> dict[tuple[int, int], torch.Tensor]:
        """(image, token) -> x [L, d] float32, by a naive loop over every shard."""
        rows = {}
        for i in range(self.n_shards):
            shard = self.load_shard(i)
            for n, image in enumerate(shard["image_id"].tolist()):
                for t in range(TOKENS):
                    rows[(image, t)] = shard["x"][n, t].float()
        return rows


def _pairs(batches: list[dict[str, torch.Tensor]]) -> list[tuple[int, int]]:
    return [
        (i, t)
        for b in batches
        for i, t in zip(b["image"].tolist(), b["token"].tolist(), strict=True)
    ]


# ---------------------------------------------------------------------------- assignment
@settings(max_examples=60, deadline=None)
@given(
    n_shards=st.integers(0, 40),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 50),
    world_size=st.integers(1, 4),
    num_workers=st.integers(0, 4),
    shuffle=st.booleans(),
)
def test_assign_shards_disjoint_and_complete(
    n_shards, seed, epoch, world_size, num_workers, shuffle
):
    seen = [
        s
        for rank in range(world_size)
        for worker in range(max(1, num_workers))
        for s in assign_shards(
            n_shards, seed, epoch, world_size, rank, num_workers, worker, shuffle
        )
    ]
    assert sorted(seen) == list(range(n_shards))


def test_assign_shards_round_robin_over_global_workers():
    order = assign_shards(12, 3, 1, 1, 0, 0, 0)  # one worker: the epoch's whole order
    assert sorted(order) == list(range(12))
    for rank in range(2):
        for worker in range(3):
            got = assign_shards(12, 3, 1, 2, rank, 3, worker)
            assert got == order[rank * 3 + worker :: 6]


def test_assign_shards_deterministic_and_epoch_dependent():
    a = assign_shards(50, 7, 0, 1, 0, 0, 0)
    assert a == assign_shards(50, 7, 0, 1, 0, 0, 0)
    assert a != assign_shards(50, 7, 1, 1, 0, 0, 0)
    assert a != assign_shards(50, 8, 0, 1, 0, 0, 0)
    assert assign_shards(5, 7, 3, 1, 0, 0, 0, shuffle=False) == [0, 1, 2, 3, 4]


def test_assign_shards_rejects_bad_rank_and_worker():
    with pytest.raises(ValueError, match="rank"):
        assign_shards(4, 0, 0, 2, 2, 0, 0)
    with pytest.raises(ValueError, match="worker_id"):
        assign_shards(4, 0, 0, 1, 0, 2, 2)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_assign_images_disjoint_and_complete(world_size):
    parts = [assign_images(11, 5, 2, world_size, r) for r in range(world_size)]
    assert sorted(i for p in parts for i in p) == list(range(11))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert assign_images(11, 5, 2, 1, 0) != assign_images(11, 5, 3, 1, 0)


# ---------------------------------------------------------------------------- quotas
@settings(max_examples=80, deadline=None)
@given(
    tokens=st.lists(st.lists(st.integers(0, 500), min_size=1, max_size=4), min_size=1, max_size=4),
    batch_size=st.integers(1, 64),
    drop_last=st.booleans(),
    max_batches=st.one_of(st.none(), st.integers(0, 20)),
)
def test_batch_quotas_equal_per_rank_and_within_capacity(
    tokens, batch_size, drop_last, max_batches
):
    n_workers = len(tokens[0])
    tokens = [(row * n_workers)[:n_workers] for row in tokens]  # same workers on every rank
    quotas = batch_quotas(tokens, batch_size, drop_last, max_batches)
    totals = {sum(q) for q in quotas}
    assert len(totals) == 1
    for rank_tokens, rank_quotas in zip(tokens, quotas, strict=True):
        for t, q in zip(rank_tokens, rank_quotas, strict=True):
            full, partial = t // batch_size, -(-t // batch_size)
            assert 0 <= q <= (full if drop_last else partial)
    expected = min(
        sum(t // batch_size if drop_last else -(-t // batch_size) for t in r) for r in tokens
    )
    if max_batches is not None:
        expected = min(expected, max_batches)
    assert totals == {expected}


# ---------------------------------------------------------------------------- rows, buffer
@pytest.mark.parametrize("token_filter", ["all", "cls", "patches"])
def test_shard_token_rows_matches_naive_loop(token_filter):
    shard = FakeCache([3]).load_shard(0)
    shard["token_index"] = torch.tensor([[0, 4, 9, 1, 2]] * 3)  # cls+random style positions
    rows = shard_token_rows(shard, token_filter)
    keep = {"all": lambda t: True, "cls": lambda t: t == 0, "patches": lambda t: t != 0}[
        token_filter
    ]
    naive = [
        (n, j) for n in range(3) for j in range(TOKENS) if keep(int(shard["token_index"][n, j]))
    ]
    assert len(rows["token"]) == len(naive)
    for r, (n, j) in enumerate(naive):
        assert rows["image"][r] == shard["image_id"][n]
        assert rows["token"][r] == shard["token_index"][n, j]
        assert torch.equal(rows["x"][r], shard["x"][n, j])
        assert torch.equal(rows["y"][r], shard["y"][n, j])


def test_token_buffer_hands_out_every_row_once_with_its_data():
    g = torch.Generator().manual_seed(0)
    buffer = TokenBuffer(capacity=50, generator=g)
    ids = torch.arange(120)
    out, fed = [], 0
    while fed < 120 or len(buffer):
        if fed < 120 and len(buffer) + 20 <= 50:
            chunk = ids[fed : fed + 20]
            buffer.add({"x": chunk.double().view(-1, 1, 1) * 3, "token": chunk})
            fed += 20
        else:
            got = buffer.take(min(7, len(buffer)))
            assert torch.equal(got["x"].view(-1), got["token"].double() * 3)
            out.extend(got["token"].tolist())
    assert sorted(out) == list(range(120))
    assert out != sorted(out)


def test_token_buffer_overflow_and_empty_take_raise():
    buffer = TokenBuffer(capacity=3, generator=torch.Generator())
    with pytest.raises(ValueError, match="overflow"):
        buffer.add({"token": torch.arange(4)})
    with pytest.raises(ValueError, match="cannot take"):
        buffer.take(1)


def _chunk(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    n = len(tokens)
    return {"x": torch.zeros(n, 1, 1), "y": torch.zeros(n, 1, 1), "token": tokens, "image": tokens}


def test_shuffled_batches_only_mix_within_buffer_window():
    chunks = [_chunk(torch.arange(10) + 10 * c) for c in range(6)]
    batches = list(
        shuffled_batches(
            iter(chunks),
            5,
            capacity=2 * 10 + 5,
            max_chunk_rows=10,
            generator=torch.Generator().manual_seed(1),
        )
    )
    tokens = [b["token"] for b in batches]
    assert sorted(torch.cat(tokens).tolist()) == list(range(60))
    assert set(tokens[0].tolist()) <= set(range(20))  # first draws: only the first 2 chunks
    assert all(b["x"].dtype == torch.float32 for b in batches)


def test_ordered_batches_keep_order_and_partial_batch():
    chunks = [_chunk(torch.arange(n) + off) for n, off in [(3, 0), (4, 3), (6, 7)]]
    batches = list(ordered_batches(iter(chunks), 5))
    assert [len(b["token"]) for b in batches] == [5, 5, 3]
    assert torch.cat([b["token"] for b in batches]).tolist() == list(range(13))
    assert [len(b["token"]) for b in ordered_batches(iter(chunks), 5, drop_last=True)] == [5, 5]


# ---------------------------------------------------------------------------- cached stream
def test_cached_stream_contract_and_full_coverage():
    cache = FakeCache([4, 4, 4, 3])  # 15 images, 75 tokens
    stream = CachedTokenStream(cache, batch_size=15, buffer_shards=2, seed=3)
    batches = list(stream)
    assert len(batches) == len(stream) == 5
    for b in batches:
        assert set(b) == {"x", "y", "token", "image"}
        assert b["x"].shape == b["y"].shape == (15, N_LAYERS, D_MODEL)
        assert b["x"].dtype == b["y"].dtype == torch.float32
        assert b["token"].dtype == b["image"].dtype == torch.int64
        assert b["token"].shape == b["image"].shape == (15,)
    pairs = _pairs(batches)
    reference = cache.all_rows()
    assert Counter(pairs) == Counter(reference.keys())  # every token exactly once
    x = torch.cat([b["x"] for b in batches])
    y = torch.cat([b["y"] for b in batches])
    for r, key in enumerate(pairs):
        assert torch.equal(x[r], reference[key])
    assert torch.allclose(y, (2 * x.half().float() + 1).half().float())


@pytest.mark.parametrize(("token_filter", "allowed"), [("cls", {0}), ("patches", {1, 2, 3, 4})])
def test_cached_stream_token_filter(token_filter, allowed):
    cache = FakeCache([3, 3])
    batches = list(CachedTokenStream(cache, batch_size=2, token_filter=token_filter))
    tokens = set(torch.cat([b["token"] for b in batches]).tolist())
    assert tokens == allowed
    n_rows = sum(len(b["token"]) for b in batches)
    assert n_rows == 6 * len(allowed)


def test_cached_stream_deterministic_and_epochs_differ():
    def run(epoch: int, seed: int = 0) -> list[tuple[int, int]]:
        stream = CachedTokenStream(FakeCache([4] * 5), batch_size=10, seed=seed, buffer_shards=2)
        stream.set_epoch(epoch)
        return _pairs(list(stream))

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert run(0) != run(0, seed=1)
    assert sorted(run(0)) == sorted(run(1))


def test_cached_stream_ranks_yield_equal_batches_and_disjoint_tokens():
    counts = [5, 5, 5, 5, 2]  # uneven shards: 3 ranks get 2, 2, 1 shards in some order
    streams = [
        CachedTokenStream(FakeCache(counts), batch_size=7, world_size=3, rank=r, seed=1)
        for r in range(3)
    ]
    per_rank = [list(s) for s in streams]
    assert len({len(b) for b in per_rank}) == 1
    assert all(len(b) == len(s) for b, s in zip(per_rank, streams, strict=True))
    pairs = [p for batches in per_rank for p in _pairs(batches)]
    assert len(pairs) == len(set(pairs))
    assert all(len(b["token"]) == 7 for batches in per_rank for b in batches)


def test_cached_stream_in_dataloader_workers_covers_every_token():
    cache = FakeCache([2, 2, 2, 2])  # 4 shards, 2 workers: 20 tokens each
    stream = CachedTokenStream(cache, batch_size=5, num_workers=2, seed=4)
    batches = list(DataLoader(stream, batch_size=None, num_workers=2))
    assert len(batches) == len(stream) == 8
    assert Counter(_pairs(batches)) == Counter(cache.all_rows().keys())


def test_cached_stream_validation_order():
    cache = FakeCache([2, 3])
    stream = CachedTokenStream(cache, batch_size=4, shuffle=False, drop_last=False)
    pairs = _pairs(list(stream))
    assert pairs == sorted(cache.all_rows())  # stored order: shard 0 (ids 0, 1), shard 1 (100..)
    assert len(list(stream)) == len(stream) == 7


def test_cached_stream_shard_size_mismatch_names_shard():
    stream = CachedTokenStream(FakeCache([2, 2]), batch_size=2, shuffle=False)
    stream.shard_image_counts = [2, 3]  # the manifest says 3 images, the shard holds 2
    with pytest.raises(CacheError, match="shard 1"):
        list(stream)


def test_cached_stream_buffer_reads_shards_lazily():
    cache = FakeCache([4] * 6)
    stream = CachedTokenStream(cache, batch_size=4, buffer_shards=2)
    first = next(iter(stream))
    assert len(cache.loads) == 2  # only the buffer's two shards were read for the first batch
    assert np.isin(first["image"].numpy() // 100, cache.loads).all()


# ------------------------------------------------------- equal batches per rank (issue 11.2)
class _Images(torch.utils.data.Dataset):
    """8 tiny 'images' (image i is filled with i); the ids in `bad` do not decode."""

    def __init__(self, n: int = 8, bad: tuple[int, ...] = (5,)) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        from clt_lightning.errors import UnreadableImageError

        if i in self.bad:
            raise UnreadableImageError(f"image {i} does not decode")
        return torch.full((3, 2, 2), float(i)), 0


def _capture(images: torch.Tensor):
    """A stand-in teacher: x = the image's value everywhere, y = 2x; T = TOKENS."""
    from types import SimpleNamespace

    x = images[:, :1, :1, :1].reshape(-1, 1, 1, 1).expand(-1, TOKENS, N_LAYERS, D_MODEL)
    return SimpleNamespace(x=x.clone(), y=2 * x)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("bad", [(5,), (0, 3, 5), ()])
def test_online_ranks_yield_their_length_whatever_images_are_skipped(num_workers, shuffle, bad):
    """2 ranks, 8 images, some unreadable, batches of about one image: each rank yields
    exactly len(stream) batches, full ones in training (rank 1 used to yield 3 of 4)."""
    from clt_lightning.data.online_stream import OnlineTokenStream

    counts = []
    for rank in range(2):
        stream = OnlineTokenStream(
            _capture, _Images(bad=bad), TOKENS, "cpu", batch_size=TOKENS + 1, image_batch=2,
            buffer_tokens=64, shuffle=shuffle, world_size=2, rank=rank,
            num_workers=num_workers, skip_bad_images=True, drop_last=shuffle,
        )  # fmt: skip
        for epoch in range(3):
            stream.set_epoch(epoch)
            batches = list(stream)
            assert len(batches) == len(stream) == 4 * TOKENS // (TOKENS + 1) + (not shuffle)
            images = {int(i) for b in batches for i in b["image"].tolist()}
            assert not images & set(bad)  # replaced by readable images, never made up
            for b in batches:  # each row is its image's own activation
                assert torch.equal(b["x"][:, 0, 0], b["image"].float())
            counts.append(len(batches))
    assert len(set(counts)) == 1


def test_online_rank_without_readable_images_says_so():
    from clt_lightning.data.online_stream import OnlineTokenStream
    from clt_lightning.errors import UnreadableImageError

    stream = OnlineTokenStream(_capture, _Images(n=4, bad=(1, 3)), TOKENS, "cpu",
                               batch_size=TOKENS, world_size=2, rank=1, shuffle=False,
                               skip_bad_images=True)  # fmt: skip
    with pytest.raises(UnreadableImageError, match="none of the 2 images of rank 1"):
        list(stream)


@pytest.mark.parametrize(("num_workers", "batch_size"), [(0, 10), (2, 5)])
def test_cached_stream_length_holds_in_every_epoch(num_workers, batch_size):
    """Unequal shards (1-4 images): the batch count per rank used to change with the
    epoch's shard order ([4, 3, 3, 4, 4, 3] here) while Lightning reads len() once; now
    every epoch yields exactly len(stream) on every rank."""
    cache = FakeCache([1, 3, 4, 3, 2, 4])
    streams = [CachedTokenStream(cache, batch_size, world_size=2, rank=rank, num_workers=num_workers)
               for rank in range(2)]  # fmt: skip
    promised = [len(stream) for stream in streams]
    assert promised[0] == promised[1] > 0
    for epoch in range(6):
        for stream in streams:
            stream.set_epoch(epoch)
            loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
            assert sum(1 for _ in loader) == promised[0] == len(stream)
