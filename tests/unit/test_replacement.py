"""Cascaded replacement: oracle exactness, no-op windows, shared prefix vs a naive recompute."""

from __future__ import annotations

import pytest
import torch

from clt_lightning.errors import CheckpointMismatchError, ConfigError
from clt_lightning.evaluation.cascade import (
    cascade,
    cascade_table,
    compare_table,
    write_cascade_tables,
)
from clt_lightning.evaluation.replacement import OracleCLT, decode_rows, run_replaced
from clt_lightning.evaluation.token_modes import DEFAULT_MODES, mode_positions
from clt_lightning.evaluation.zeroshot import zero_shot_logits
from clt_lightning.models.clt import CrossLayerTranscoder
from clt_lightning.models.sparsifiers import SparsifierConfig

N_CLASSES = 6


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread (two spin-wait badly on a shared 2-core machine)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(10, 3, 32, 32)


@pytest.fixture
def head() -> tuple[torch.Tensor, torch.Tensor]:
    classifier = torch.nn.functional.normalize(torch.randn(16, N_CLASSES), dim=0)
    return classifier, torch.tensor(2.0)


@pytest.fixture
def random_clt(tiny_teacher) -> CrossLayerTranscoder:
    # k = 4 of F = 128: code differences take the sparse row-gather path of decode_rows
    clt = CrossLayerTranscoder(
        tiny_teacher.n_layers, tiny_teacher.d_model, 128, SparsifierConfig("relu_topk", k=4)
    )
    with torch.no_grad():
        clt.b_dec.normal_(0, 0.1)
        clt.set_normalisation(torch.full((3,), 0.8), torch.full((3,), 1.5))
    return clt.eval()


def batches(images: torch.Tensor, labels: torch.Tensor, size: int = 4):
    return [(images[i : i + size], labels[i : i + size]) for i in range(0, len(images), size)]


def naive_embeddings(teacher, clt, images, start, positions) -> torch.Tensor:
    """Independent reference: open_clip's block modules and the CLT's raw weights."""
    visual = teacher.clip.visual
    h = teacher.embed(images)
    codes = []
    for layer, block in enumerate(visual.transformer.resblocks):
        h = h + block.ls_1(block.attention(q_x=block.ln_1(h)))
        x = block.ln_2(h)
        y = block.mlp(x)
        codes.append(clt.encode_layer(layer, x[:, positions]))
        if layer >= start:
            y_hat = clt.b_dec[layer].clone()
            for source in range(layer + 1):
                y_hat = y_hat + codes[source] @ clt.W_dec[source][:, layer - source]
            y = y.clone()
            y[:, positions] = y_hat / clt.output_scale[layer]
        h = h + block.ls_2(y)
    pooled, _ = visual._pool(h)
    return pooled @ visual.proj


def test_token_positions():
    assert mode_positions("cls", 17).tolist() == [0]
    assert mode_positions("patches", 17).tolist() == list(range(1, 17))
    assert mode_positions("all", 17).tolist() == list(range(17))
    assert mode_positions([5, 2, 2], 17).tolist() == [2, 5]
    with pytest.raises(ConfigError, match="valid"):
        mode_positions("both", 17)
    with pytest.raises(ConfigError, match="0..16"):
        mode_positions([17], 17)


@pytest.mark.parametrize("n_active", [0, 3, 40])
def test_decode_rows_sparse_and_dense_paths(n_active):
    codes = torch.zeros(2, 5, 64)
    for row in codes.view(-1, 64):
        row[torch.randperm(64)[:n_active]] = torch.randn(n_active)
    codes[0, 0] = 0  # an all-zero row
    table = torch.randn(64, 12)
    torch.testing.assert_close(decode_rows(codes, table), codes @ table, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_oracle_reproduces_teacher_for_every_window_and_mode(tiny_teacher, images, head):
    oracle = OracleCLT(tiny_teacher)
    reference = tiny_teacher.encode_image(images)
    ref_logits = zero_shot_logits(reference, *head)
    n_layers = tiny_teacher.n_layers
    for mode in DEFAULT_MODES:
        for start in range(n_layers + 1):
            for stop in range(start, n_layers + 1):
                emb = run_replaced(tiny_teacher, oracle, images, start, stop, mode)
                torch.testing.assert_close(emb, reference, atol=1e-6, rtol=0)
        logits = zero_shot_logits(run_replaced(tiny_teacher, oracle, images, 0, None, mode), *head)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_oracle_cascade_equals_baseline(tiny_teacher, images, head):
    labels = torch.randint(0, N_CLASSES, (10,))
    keep = [(s, m) for s in range(4) for m in DEFAULT_MODES]
    result = cascade(
        tiny_teacher,
        OracleCLT(tiny_teacher),
        batches(images, labels),
        *head,
        starts=range(4),
        keep=keep,
    )
    for mode in DEFAULT_MODES:
        assert result.accuracy[mode]["top1"] == [result.baseline["top1"]] * 4
        for start in range(4):
            torch.testing.assert_close(
                result.embeddings[(start, mode)], result.baseline_embeddings, atol=1e-6, rtol=0
            )


@torch.no_grad()
def test_no_replacement_equals_baseline(tiny_teacher, random_clt, images):
    reference = tiny_teacher.encode_image(images)
    assert torch.equal(run_replaced(tiny_teacher, random_clt, images, 3, 3, "all"), reference)
    assert torch.equal(run_replaced(tiny_teacher, random_clt, images, 0, None, []), reference)
    assert torch.equal(run_replaced(tiny_teacher, random_clt, images, 1, 1, "cls"), reference)


@torch.no_grad()
def test_baseline_accuracy_matches_direct_computation(tiny_teacher, random_clt, images, head):
    logits = zero_shot_logits(tiny_teacher.encode_image(images), *head)
    order = logits.argsort(dim=1, descending=True)
    ranks = torch.arange(10) % N_CLASSES  # image i's label is its rank-(i % 6) class
    labels = order[torch.arange(10), ranks]
    result = cascade(tiny_teacher, random_clt, batches(images, labels, 3), *head, modes=["cls"])
    assert result.n_images == 10
    assert result.baseline["top1"] == pytest.approx(20.0)  # ranks 0 at i = 0, 6
    assert result.baseline["top5"] == pytest.approx(90.0)  # rank 5 only at i = 5


@pytest.mark.parametrize("incremental", [True, False])
@torch.no_grad()
def test_cascade_shared_prefix_equals_naive_recompute(
    tiny_teacher, random_clt, images, head, incremental
):
    labels = torch.randint(0, N_CLASSES, (10,))
    starts = list(range(tiny_teacher.n_layers + 1))
    keep = [(s, m) for s in starts for m in DEFAULT_MODES]
    result = cascade(
        tiny_teacher,
        random_clt,
        batches(images, labels),
        *head,
        starts=starts,
        keep=keep,
        incremental=incremental,
    )
    baseline = result.baseline_embeddings
    torch.testing.assert_close(baseline, tiny_teacher.encode_image(images), atol=1e-6, rtol=0)
    for start in starts:
        for mode in DEFAULT_MODES:
            positions = mode_positions(mode, tiny_teacher.tokens_per_image)
            expected = naive_embeddings(tiny_teacher, random_clt, images, start, positions)
            got = result.embeddings[(start, mode)]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            naive = run_replaced(tiny_teacher, random_clt, images, start, None, mode)
            torch.testing.assert_close(naive, expected, atol=1e-5, rtol=0)
            if start < tiny_teacher.n_layers and mode != "patches":
                assert (got - baseline).abs().max() > 1e-3  # the random CLT changes things
    assert result.labels.tolist() == labels.tolist()


@torch.no_grad()
def test_scattered_token_positions_match_naive(tiny_teacher, random_clt, images):
    positions = torch.tensor([0, 3, 4, 9])
    got = run_replaced(tiny_teacher, random_clt, images, 1, None, positions)
    expected = naive_embeddings(tiny_teacher, random_clt, images, 1, positions)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_mismatched_clt_is_rejected(tiny_teacher, images, head):
    topk = SparsifierConfig("relu_topk", k=8)
    wrong = CrossLayerTranscoder(4, 32, 64, topk)
    with pytest.raises(CheckpointMismatchError, match=r"n_layers=4.*n_layers=3"):
        run_replaced(tiny_teacher, wrong, images, 0)
    wrong = CrossLayerTranscoder(3, 48, 64, topk)
    with pytest.raises(CheckpointMismatchError, match=r"d_model=48.*d_model=32"):
        cascade(tiny_teacher, wrong, [(images, torch.zeros(10, dtype=torch.long))], *head)


def test_empty_evaluation_set_is_a_clear_error(tiny_teacher, random_clt, head):
    with pytest.raises(ConfigError, match="empty"):
        cascade(tiny_teacher, random_clt, [], *head)


def test_bad_starts_and_modes(tiny_teacher, random_clt, images, head):
    data = [(images, torch.zeros(10, dtype=torch.long))]
    with pytest.raises(ConfigError, match=r"0\.\.3"):
        cascade(tiny_teacher, random_clt, data, *head, starts=[5])
    with pytest.raises(ConfigError, match="valid"):
        cascade(tiny_teacher, random_clt, data, *head, modes=["tokens"])


@torch.no_grad()
def test_tables_and_writers(tiny_teacher, random_clt, images, head, tmp_path):
    labels = torch.randint(0, N_CLASSES, (10,))
    result = cascade(tiny_teacher, random_clt, batches(images, labels), *head)
    rows = cascade_table(result)
    assert [r["range"] for r in rows] == ["0→2", "1→2", "2→2", "baseline"]
    assert rows[1]["patches"] == result.top1("patches", 1)
    assert rows[-1]["all"] == result.baseline["top1"]
    paper = compare_table({"JR": result, "RTK": result}, "cls")
    assert list(paper[0]) == ["range", "JR", "RTK"]
    paths = write_cascade_tables(result, tmp_path)
    markdown = paths["top1_md"].read_text(encoding="utf-8")
    assert markdown.splitlines()[0] == "| range | cls | patches | all |"
    assert "| 0→2 |" in markdown
    csv_lines = paths["top5_csv"].read_text(encoding="utf-8").splitlines()
    assert csv_lines[0] == "range,cls,patches,all" and len(csv_lines) == 5
    assert result.to_dict()["accuracy"]["cls"]["top1"] == result.accuracy["cls"]["top1"]
