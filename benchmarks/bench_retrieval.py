"""Retrieval indexes: build and query throughput, and recall of compressed vs exact search.

What is timed, per index type (exact ``Flat``, ``SQfp16``, and the ``IVF{nlist},PQ{m}``
that `choose_index_type` picks under a tight memory budget): building = training on a
bounded sample (IVF/PQ only) plus ``index.add`` chunk by chunk, each chunk L2-normalised
first as cosine retrieval does (``descriptors_per_s`` = descriptors / build seconds);
querying = one ``index.search`` of a batch of held-out queries for their top 10
(``queries_per_s``). Generating the synthetic descriptors is not timed.
``recall_at_10`` = mean over queries of |approximate top 10 ∩ exact top 10| / 10.

Data: synthetic CLT-like codes, built in chunks of 1,000 so the corpus is never held twice
in memory: a 32-dimensional latent (one of 100 cluster centres plus noise) is projected to
F dimensions by a fixed random matrix, ReLU'd and cut to its top 128 values (32 in quick
mode), so descriptors are sparse, non-negative and have real neighbourhoods. Each chunk
is seeded by its position, so every index sees the same corpus.

Shapes: full = 50,000 descriptors of 12,288 dimensions (the paper's F = 16 x 768), 200
queries, compressed index under a 256 MiB budget; quick = 2,000 x 1,024, 50 queries,
budget n x dim bytes. Threads: FAISS's OpenMP default (``OMP_NUM_THREADS``), recorded as
``threads``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import faiss
import numpy as np

from clt_lightning.evaluation.retrieval_index import (
    TRAIN_SAMPLE_BYTES,
    IndexPlan,
    choose_index_type,
    new_index,
    plan_index,
    prepare_vectors,
)

log = logging.getLogger(__name__)

FULL = {"n": 50_000, "dim": 12_288, "n_queries": 200, "active": 128, "budget": 256 * 2**20}
QUICK = {"n": 2_000, "dim": 1_024, "n_queries": 50, "active": 32, "budget": 2_000 * 1_024}
CHUNK_ROWS, LATENT_DIM, N_CLUSTERS, K = 1_000, 32, 100, 10


class SyntheticCodes:
    """Sparse non-negative descriptors with cluster structure, generated chunk by chunk."""

    def __init__(self, dim: int, active: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.projection = rng.standard_normal((LATENT_DIM, dim)).astype(np.float32)
        self.centres = rng.standard_normal((N_CLUSTERS, LATENT_DIM)).astype(np.float32)
        self.dim, self.active, self.seed = dim, active, seed

    def rows(self, start: int, n_rows: int) -> np.ndarray:
        """[n_rows, dim] float32 descriptors number start..start+n_rows (deterministic)."""
        rng = np.random.default_rng([self.seed, start])
        latent = self.centres[rng.integers(0, N_CLUSTERS, n_rows)]
        latent += 0.6 * rng.standard_normal(latent.shape, dtype=np.float32)
        pre = np.maximum(latent @ self.projection, 0.0)
        cut = np.partition(pre, self.dim - self.active, axis=1)[:, self.dim - self.active]
        pre[pre < cut[:, None]] = 0.0
        return pre

    def chunks(self, n: int) -> Iterator[np.ndarray]:
        for start in range(0, n, CHUNK_ROWS):
            yield self.rows(start, min(CHUNK_ROWS, n - start))


def _build(plan: IndexPlan, data: SyntheticCodes, n: int) -> tuple[faiss.Index, float, float]:
    """(index, train seconds, total build seconds), generation excluded."""
    index = new_index(plan.factory, data.dim, "cosine")
    train_s = 0.0
    if not index.is_trained:
        # synthetic rows are i.i.d., so the first rows are a random sample of the corpus
        n_train = min(n, TRAIN_SAMPLE_BYTES // (4 * data.dim))
        sample = np.concatenate(list(data.chunks(n_train)))
        start = time.perf_counter()
        index.train(prepare_vectors(sample, "cosine"))
        train_s = time.perf_counter() - start
        del sample
    if plan.nprobe is not None:
        faiss.extract_index_ivf(index).nprobe = plan.nprobe
    add_s = 0.0
    for chunk in data.chunks(n):
        start = time.perf_counter()
        index.add(prepare_vectors(chunk, "cosine"))
        add_s += time.perf_counter() - start
    return index, train_s, train_s + add_s


def _row(plan: IndexPlan, shape: dict, times: tuple[float, float, float], recall: float) -> dict:
    train_s, build_s, search_s = times
    return {
        "name": f"retrieval/{plan.factory}",
        "index_type": plan.factory,
        "n": shape["n"],
        "dim": shape["dim"],
        "estimated_bytes": plan.estimated_bytes,
        "train_s": round(train_s, 3),
        "build_s": round(build_s, 3),
        "descriptors_per_s": round(shape["n"] / build_s, 1),
        "queries_per_s": round(shape["n_queries"] / search_s, 1),
        "recall_at_10": round(recall, 4),
        "nprobe": plan.nprobe,
        "threads": faiss.omp_get_max_threads(),
    }


def run(quick: bool = False) -> list[dict]:
    """Build and query a Flat, an SQfp16 and a budget-chosen IVF-PQ index; measure recall.

    Args:
        quick: 2,000 x 1,024 descriptors (a smoke run) instead of 50,000 x 12,288.

    Returns:
        One row per index type: ``name``, ``index_type``, ``n``, ``dim``,
        ``estimated_bytes``, ``train_s``, ``build_s``, ``descriptors_per_s``,
        ``queries_per_s``, ``recall_at_10`` (1.0 for Flat, by definition), ``nprobe``,
        ``threads``.
    """
    shape = QUICK if quick else FULL
    n, dim = shape["n"], shape["dim"]
    data = SyntheticCodes(dim, shape["active"])
    queries = prepare_vectors(data.rows(10**9, shape["n_queries"]), "cosine")
    compressed = choose_index_type(n, dim, shape["budget"])
    rows, exact_ids = [], None
    for factory in ("Flat", "SQfp16", compressed):
        plan = plan_index(
            n, dim, shape["budget"] if factory == compressed else n * dim * 4, factory
        )
        index, train_s, build_s = _build(plan, data, n)
        start = time.perf_counter()
        _, ids = index.search(queries, K)
        search_s = time.perf_counter() - start
        del index
        exact_ids = ids if exact_ids is None else exact_ids
        recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, exact_ids, strict=True)])
        rows.append(_row(plan, shape, (train_s, build_s, search_s), float(recall)))
        log.info("retrieval bench %s", rows[-1])
    return rows


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for result in run(quick="--quick" in sys.argv):
        print(json.dumps(result))
