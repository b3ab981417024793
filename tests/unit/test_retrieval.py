"""Layer-wise retrieval: descriptors, per-layer FAISS indexes, manifest checks, grid figure.

Everything runs on the tiny open_clip teacher (3 layers, d=32, 17 tokens) and a random
tiny CLT (F=64, ReLU-TopK k=8) over a few dozen made-up 32x32 images; results are checked
against numpy computed independently (token means, brute-force cosine/ip/l2 search).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from clt_lightning.data.image_datasets import ArrayImageDataset
from clt_lightning.errors import CacheError, CheckpointMismatchError, ConfigError
from clt_lightning.evaluation import retrieval as R
from clt_lightning.evaluation import retrieval_descriptors as RD
from clt_lightning.evaluation import retrieval_index as RI
from clt_lightning.evaluation import retrieval_search as RS
from clt_lightning.evaluation.retrieval_plot import retrieval_grid
from clt_lightning.models.clt import CrossLayerTranscoder
from clt_lightning.models.sparsifiers import SparsifierConfig
from clt_lightning.teacher import Teacher, TeacherConfig

FIXTURES = Path(__file__).parents[1] / "fixtures"
N_CORPUS, N_CLASSES, K = 36, 4, 5
COLOURS = np.array([[220, 40, 40], [40, 180, 60], [50, 80, 220], [230, 200, 40]], dtype=np.float64)


def _make_clt(seed: int) -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(3, 32, 64, SparsifierConfig(name="relu_topk", k=8))
    with torch.no_grad():
        clt.b_enc.normal_(0.0, 0.3)  # some latents fire on every token: denser descriptors
    return clt.eval()


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, 32, 32, 3] uint8: a class colour blob on noise; labels cycle through classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % N_CLASSES
    pixels = rng.uniform(0, 255, size=(n, 32, 32, 3)) * 0.5
    for i, label in enumerate(labels):
        top, left = rng.integers(0, 16, size=2)
        pixels[i, top : top + 16, left : left + 16] = COLOURS[label]
    return pixels.astype(np.uint8), labels


def _dataset(teacher: Teacher, n: int, seed: int, split: str) -> ArrayImageDataset:
    pixels, labels = _images(n, seed)
    return ArrayImageDataset(
        pixels=pixels, name="blobs", split=split, root=None,
        class_names=["red", "green", "blue", "yellow"], labels=labels,
        transform=teacher.preprocess, max_images=None,
    )  # fmt: skip


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    return Teacher(TeacherConfig(model_config=str(FIXTURES / "tiny-vit.json")))


@pytest.fixture(scope="module")
def clt() -> CrossLayerTranscoder:
    return _make_clt(1)


@pytest.fixture(scope="module")
def corpus(teacher: Teacher) -> ArrayImageDataset:
    return _dataset(teacher, N_CORPUS, seed=0, split="train")


@pytest.fixture(scope="module")
def queries(teacher: Teacher) -> ArrayImageDataset:
    return _dataset(teacher, 6, seed=1, split="val")


@pytest.fixture(scope="module")
def built(tmp_path_factory, teacher, clt, corpus) -> RS.RetrievalIndex:
    """A cosine Flat index over the corpus (all 3 layers, CLS codes)."""
    out = tmp_path_factory.mktemp("index")
    return R.build_index(teacher, clt, corpus, out, batch_size=8, progress=False)


def _query_batch(queries: ArrayImageDataset) -> torch.Tensor:
    return torch.stack([queries[i][0] for i in range(len(queries))])


def _brute_force(corpus: np.ndarray, query: np.ndarray, similarity: str, k: int):
    """Independent exact search in float64: ([Q, k] rows, [Q, k] scores)."""
    corpus, query = corpus.astype(np.float64), query.astype(np.float64)
    if similarity == "cosine":
        corpus = corpus / np.maximum(np.linalg.norm(corpus, axis=1, keepdims=True), 1e-12)
        query = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    if similarity == "l2":
        scores = ((query[:, None, :] - corpus[None, :, :]) ** 2).sum(-1)
        order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    else:
        scores = query @ corpus.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


# ----------------------------------------------------------------------------- descriptors


@pytest.mark.parametrize("aggregation", ["cls", "patches", "all"])
def test_aggregation_matches_numpy_token_means(teacher, clt, corpus, aggregation):
    images = torch.stack([corpus[i][0] for i in range(5)])
    x = teacher.capture(images).x  # [5, 17, 3, 32]
    with torch.no_grad():
        z = clt.encode(x.reshape(-1, 3, 32)).z.reshape(5, 17, 3, 64).numpy()
    expected = {"cls": z[:, 0], "patches": z[:, 1:].mean(axis=1), "all": z.mean(axis=1)}[
        aggregation
    ]
    # 7-row blocks split images across encode calls: the per-image sums must still add up
    got = RD.encode_descriptors(clt, x, aggregation, block_rows=7).numpy()
    assert got.shape == (5, 3, 64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    sub = RD.encode_descriptors(clt, x, aggregation, layers=[2, 0]).numpy()
    np.testing.assert_allclose(sub, expected[:, [2, 0]], rtol=1e-5, atol=1e-6)
    assert np.count_nonzero(expected) > 0


def test_descriptors_stream_in_chunks_like_one_chunk(tmp_path, teacher, clt, corpus):
    small = RD.compute_descriptors(
        teacher, clt, corpus, tmp_path / "a", aggregation="all", batch_size=5, progress=False
    )
    whole = RD.compute_descriptors(
        teacher, clt, corpus, tmp_path / "b", aggregation="all", batch_size=64, progress=False
    )
    assert [p.name for p in small.paths] == [f"descriptors_layer_{i:02d}.npy" for i in range(3)]
    for position in range(3):
        np.testing.assert_allclose(small.load(position), whole.load(position), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(small.labels, corpus.labels)
    np.testing.assert_array_equal(small.image_ids, np.arange(N_CORPUS))
    assert not list((tmp_path / "a").glob("*.partial"))


def test_float16_descriptors_are_plain_npy(tmp_path, teacher, clt, corpus):
    files = RD.compute_descriptors(
        teacher, clt, corpus, tmp_path, layers=[1], dtype="float16", progress=False
    )
    array = np.load(tmp_path / "descriptors_layer_01.npy")
    assert array.dtype == np.float16 and array.shape == (N_CORPUS, 64)
    assert files.layers == (1,)


def test_failed_corpus_pass_leaves_no_files(tmp_path, teacher, clt, corpus):
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            if i == 7:
                raise RuntimeError("disk on fire")
            return corpus[i]

    with pytest.raises(RuntimeError, match="disk on fire"):
        RD.compute_descriptors(teacher, clt, Broken(), tmp_path, batch_size=4, progress=False)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- index


@pytest.mark.parametrize("similarity", ["cosine", "ip", "l2"])
def test_exact_index_equals_brute_force(tmp_path, teacher, clt, corpus, queries, similarity):
    index = R.build_index(
        teacher, clt, corpus, tmp_path, aggregation="all", similarity=similarity, progress=False
    )
    assert index.manifest["index_type"] == "Flat"
    query = RD.compute_query_descriptors(teacher, clt, _query_batch(queries), "all")
    results = index.search(query, k=K)
    for position, result in enumerate(results):
        corpus_desc = np.load(tmp_path / f"descriptors_layer_{position:02d}.npy")
        rows, scores = _brute_force(corpus_desc, query.descriptors[position], similarity, K)
        assert result.layer == position and result.ids.shape == (6, K)
        np.testing.assert_array_equal(result.ids, rows)
        np.testing.assert_allclose(result.scores, scores, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(result.labels, corpus.labels[rows])


def test_save_then_load_gives_same_neighbours(built, teacher, clt, corpus, queries):
    before = R.query_image(built, teacher, clt, _query_batch(queries), k=K)
    loaded = RS.RetrievalIndex.load(built.path)  # verifies every file's sha256
    after = R.query_image(loaded, teacher, clt, _query_batch(queries), k=K)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)
    manifest = json.loads((built.path / "manifest.json").read_text())
    assert manifest["clt_fingerprint"] == RD.clt_fingerprint(clt)
    assert manifest["teacher"] == json.loads(json.dumps(teacher.identity()))
    assert manifest["class_names"] == ["red", "green", "blue", "yellow"]
    assert manifest["n_images"] == N_CORPUS and manifest["dim"] == 64
    assert manifest["labels"] == corpus.labels.tolist() and manifest["aggregation"] == "cls"
    assert manifest["dataset"]["split"] == "train"


def test_pil_queries_equal_tensor_queries(built, teacher, clt, queries):
    from_pil = R.query_image(built, teacher, clt, [queries.raw_image(0), queries.raw_image(1)], k=3)
    from_tensor = R.query_image(built, teacher, clt, _query_batch(queries)[:2], k=3)
    for a, b in zip(from_pil, from_tensor, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)


def test_index_refuses_query_from_another_clt(built, teacher, queries):
    other = _make_clt(2)
    with pytest.raises(CheckpointMismatchError) as error:
        R.query_image(built, teacher, other, _query_batch(queries), k=3)
    message = str(error.value)
    assert RD.clt_fingerprint(other) in message
    assert built.manifest["clt_fingerprint"] in message
    assert "--retrieval.rebuild true" in message


def test_index_refuses_other_teacher_and_aggregation(built, teacher, clt, queries):
    query = RD.compute_query_descriptors(teacher, clt, _query_batch(queries), "cls")
    bf16 = dict(query.teacher, precision="bf16")
    with pytest.raises(CheckpointMismatchError, match="precision: index 'fp32' vs query 'bf16'"):
        built.search(
            RD.QueryDescriptors(
                query.descriptors, query.layers, "cls", query.clt_fingerprint, bf16
            ),
            3,
        )
    patches = RD.compute_query_descriptors(teacher, clt, _query_batch(queries), "patches")
    with pytest.raises(
        CheckpointMismatchError, match="aggregation: index built with 'cls', requested 'patches'"
    ):
        built.search(patches, 3)


def test_k_larger_than_corpus_and_bad_queries(built, teacher, clt, queries):
    query = RD.compute_query_descriptors(teacher, clt, _query_batch(queries), "cls")
    assert built.search(query, k=1000)[0].ids.shape == (6, N_CORPUS)
    with pytest.raises(ConfigError, match="k=0"):
        built.search(query, k=0)
    with pytest.raises(ConfigError, match=r"\[L=3, Q, F=64\]"):
        built.search(np.zeros((2, 1, 64), dtype=np.float32), k=3)


def test_corrupt_index_file_is_named(tmp_path, built):
    import shutil

    copy = Path(shutil.copytree(built.path, tmp_path / "copy"))
    with open(copy / "layer_01.faiss", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(CacheError, match="layer_01.faiss fails its sha256"):
        RS.RetrievalIndex.load(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json missing"):
        RS.RetrievalIndex.load(copy)


@pytest.mark.parametrize("factory", ["Flat", "IVF4,SQ8", "IVF4,PQ8x4", "PQ4"])
def test_chunked_add_builds_the_same_index(factory):
    descriptors = np.random.default_rng(0).random((300, 32)).astype(np.float32)
    plan = RI.IndexPlan(factory, None, RI.default_nprobe(factory))
    one = RI.build_layer_index(descriptors, plan, "cosine", use_gpu=False)
    chunked = RI.build_layer_index(descriptors, plan, "cosine", chunk_rows=7, use_gpu=False)
    assert one.ntotal == chunked.ntotal == 300
    assert faiss.serialize_index(one).tobytes() == faiss.serialize_index(chunked).tobytes()


def test_trained_index_uses_a_bounded_sample(monkeypatch):
    descriptors = np.random.default_rng(0).random((500, 16)).astype(np.float32)
    monkeypatch.setattr(RI, "TRAIN_SAMPLE_BYTES", 100 * 16 * 4)
    sample = RI.train_sample(descriptors, RI.TRAIN_SAMPLE_BYTES, seed=3)
    assert sample.shape == (100, 16)
    assert np.isin(sample[:, 0], descriptors[:, 0]).all()
    index = RI.build_layer_index(
        descriptors, RI.IndexPlan("IVF2,Flat", None, 2), "l2", use_gpu=False
    )
    assert index.is_trained and index.ntotal == 500


def test_choose_index_type_thresholds():
    n, dim = 1000, 512
    assert RI.choose_index_type(n, dim, n * dim * 4) == "Flat"
    assert RI.choose_index_type(n, dim, n * dim * 4 - 1) == "SQfp16"
    assert RI.choose_index_type(n, dim, n * dim * 2) == "SQfp16"
    compressed = RI.choose_index_type(n, dim, n * dim * 2 - 1)
    assert compressed.startswith("IVF25,PQ") and compressed.endswith("x4")  # n/39 lists, 4 bits
    big_n = 50_000
    factory = RI.choose_index_type(big_n, 12_288, 256 * 2**20)
    nlist, m = map(int, factory.replace("IVF", "").split(",PQ"))
    n_train = RI.TRAIN_SAMPLE_BYTES // (4 * 12_288)  # 21,845 rows: at most 560 lists of 39
    assert nlist == min(round(4 * big_n**0.5), n_train // 39) == 560
    assert 12_288 % m == 0 and m == 256
    assert RI.choose_index_type(10**6, 256, 2**20 * 100).startswith("IVF4000,")  # 4 sqrt(n)
    assert RI.estimate_index_bytes(factory, big_n, 12_288) <= 256 * 2**20
    tight = RI.choose_index_type(big_n, 12_288, 45 * 2**20)
    assert (
        int(tight.split("PQ")[1]) < 256
        and RI.estimate_index_bytes(tight, big_n, 12_288) <= 45 * 2**20
    )
    with pytest.raises(ConfigError, match="too small"):
        RI.choose_index_type(big_n, 12_288, 2**20)
    faiss_index = RI.new_index(factory, 12_288)  # FAISS accepts what we choose
    assert faiss_index.d == 12_288


def test_estimate_index_bytes():
    assert RI.estimate_index_bytes("Flat", 10, 8) == 320
    assert RI.estimate_index_bytes("SQfp16", 10, 8) == 160
    assert RI.estimate_index_bytes("IVF4,PQ2", 10, 8) == 4 * 8 * 4 + 10 * (2 + 8) + 256 * 8 * 4
    assert RI.estimate_index_bytes("HNSW32", 10, 8) is None
    plan = RI.plan_index(10, 8, 1000, index_type="IVF2,Flat")
    assert plan == RI.IndexPlan("IVF2,Flat", 2 * 8 * 4 + 10 * (32 + 8), 1)


def test_bad_settings_are_named(tmp_path, teacher, clt, corpus):
    with pytest.raises(ConfigError, match="aggregation='mean'"):
        R.build_index(teacher, clt, corpus, tmp_path, aggregation="mean", progress=False)
    with pytest.raises(ConfigError, match="index_type='IVF4,PQ7'"):
        R.build_index(teacher, clt, corpus, tmp_path, index_type="IVF4,PQ7", progress=False)
    with pytest.raises(ConfigError, match="layers=\\[3\\]"):
        R.build_index(teacher, clt, corpus, tmp_path, layers=[3], progress=False)


# ----------------------------------------------------------------------------- figure, CLI entry


def test_grid_png_is_written(tmp_path, built, teacher, clt, corpus, queries):
    neighbours = R.query_image(built, teacher, clt, _query_batch(queries)[:1], k=3)
    path = retrieval_grid(
        queries.raw_image(0),
        neighbours,
        corpus,
        tmp_path / "grid.png",
        "test grid",
        query_label="red",
    )
    image = Image.open(path)
    assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 600


def test_build_and_query_writes_grid_and_json_and_reuses(tmp_path, teacher, clt, corpus, queries):
    run = R.build_and_query(
        teacher, clt, corpus, tmp_path / "index", tmp_path / "out",
        query_index=2, query_dataset=queries, k=3, layers=[0, 2], progress=False,
    )  # fmt: skip
    assert run.rebuilt and run.grid_path.is_file() and [n.layer for n in run.neighbours] == [0, 2]
    record = json.loads(run.json_path.read_text())
    assert record["query"]["source"] == "val[2]" and record["query"]["class"] == "blue"
    first = record["layers"][0]["neighbours"][0]
    assert first["image_id"] == int(run.neighbours[0].ids[0, 0])
    assert first["class"] == corpus.class_names[corpus.labels[first["image_id"]]]
    assert first["description"] == corpus.describe_image(first["image_id"])
    assert first["score"] == pytest.approx(float(run.neighbours[0].scores[0, 0]))
    # an image file as the query; the index is reused
    queries.raw_image(2).save(tmp_path / "q.png")
    again = R.build_and_query(
        teacher, clt, corpus, tmp_path / "index", tmp_path / "out",
        query_path=tmp_path / "q.png", k=3, layers=[0, 2], progress=False,
    )  # fmt: skip
    assert not again.rebuilt and again.grid_path.name == "retrieval_q_cls.png"
    np.testing.assert_array_equal(again.neighbours[1].ids, run.neighbours[1].ids)
    with pytest.raises(CheckpointMismatchError, match="--retrieval.rebuild true"):
        R.build_and_query(
            teacher,
            _make_clt(5),
            corpus,
            tmp_path / "index",
            tmp_path / "out",
            query_path=tmp_path / "q.png",
            progress=False,
        )
    forced = R.build_and_query(
        teacher, _make_clt(5), corpus, tmp_path / "index", tmp_path / "out",
        query_path=tmp_path / "q.png", rebuild=True, progress=False,
    )  # fmt: skip
    assert forced.rebuilt and [n.layer for n in forced.neighbours] == [0, 1, 2]


def test_build_and_query_needs_exactly_one_query(tmp_path, teacher, clt, corpus):
    with pytest.raises(ConfigError, match="exactly one"):
        R.build_and_query(teacher, clt, corpus, tmp_path, tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        R.build_and_query(
            teacher, clt, corpus, tmp_path, tmp_path, query_path=tmp_path / "nope.png"
        )
    assert not (tmp_path / "manifest.json").exists()  # failed before any build


@pytest.mark.gpu
@pytest.mark.skipif(not RI.gpu_available(), reason="needs a FAISS GPU build and a GPU")
def test_gpu_index_matches_cpu():
    descriptors = np.random.default_rng(0).random((2000, 256)).astype(np.float32)
    plan = RI.IndexPlan("Flat", None, None)
    cpu = RI.build_layer_index(descriptors, plan, "cosine", use_gpu=False)
    gpu = RI.build_layer_index(descriptors, plan, "cosine", use_gpu=True)
    query = RI.prepare_vectors(descriptors[:50], "cosine")
    gpu_search, on_gpu = RI.to_search_device(gpu, True)
    assert on_gpu
    (d_cpu, i_cpu), (d_gpu, i_gpu) = cpu.search(query, 10), gpu_search.search(query, 10)
    np.testing.assert_array_equal(i_cpu, i_gpu)
    np.testing.assert_allclose(d_cpu, d_gpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m.pop("files"), "files"),
        (lambda m: m.update(n_images="16"), "n_images"),
        (lambda m: m.update(labels=m["labels"][:-1]), "labels"),
        (lambda m: m.update(layers="all"), "layers"),
        (lambda m: m.pop("clt_fingerprint"), "clt_fingerprint"),
    ],
)
def test_damaged_index_manifest_names_the_field(tmp_path, built, edit, field):
    """Issue 12 kind 4: a retrieval manifest is validated before use (was a KeyError or
    TypeError at search time)."""
    copy = tmp_path / "index"
    shutil.copytree(built.path, copy)
    path = copy / RS.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=rf"manifest {re.escape(str(path))}: field '{field}'"):
        RS.RetrievalIndex.load(copy)
