"""The report's prose: what each benchmark measures, against which baseline, its columns.

One `Spec` per benchmark, in `SPECS`: the section title, the overview line, the paragraph
that says what is measured and against what, the table's columns and the function that
checks its targets (`benchmarks.targets`). The prose lives in code, next to the targets, so
that docs/benchmarks.md is generated whole and never edited by hand; a benchmark without a
spec still gets a section, with one column per row key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from benchmarks.formatting import column, fmt_bytes, fmt_ratio, fmt_yes_no
from benchmarks.targets import (
    Rows,
    Verdict,
    cache_targets,
    cascade_targets,
    data_targets,
    features_targets,
    memory_targets,
    online_targets,
    suite_targets,
    train_step_targets,
)


@dataclass
class Spec:
    """How the report presents one benchmark."""

    title: str
    about: str
    """What is measured and against which baseline (prose for the report)."""
    short: str = ""
    """One line for the overview at the top of the report."""
    columns: list[tuple[str, Callable[[dict], str]]] = field(default_factory=list)
    targets: Callable[[dict[str, Rows]], list[Verdict]] | None = None


SPECS: dict[str, Spec] = {
    "decode": Spec(
        title="Decoder alone: sparse backends vs the dense decoder",
        short=(
            "the decoder's forward + backward alone, sparse backends against the dense "
            "GEMMs (context for `train_step`; no target)."
        ),
        about=(
            "Forward + backward of the decoder only (`benchmarks/bench_decode.py`): dense "
            "codes through one GEMM per source layer against the sparse backends on the "
            "same Abs-TopK-like codes; fresh gradients every step. No target of its own: it "
            "isolates the part of the training step that sparse decoding changes."
        ),
        columns=[
            ("variant", column("name")),
            ("tokens/s", column("tokens_per_s")),
            ("ratio vs dense", column("ratio_vs_dense", fmt_ratio)),
            ("s/step", column("seconds_per_step")),
            ("peak new alloc.", column("peak_mem_bytes", fmt_bytes)),
            ("min. GB moved", column("min_gb")),
            ("GB/s (min. bytes)", column("min_gb_per_s")),
            ("vs memory copy", column("min_fraction_of_copy", fmt_ratio)),
            ("GB/s (per slot)", column("slot_gb_per_s")),
            ("copy GB/s", column("gb_per_s")),
        ],
    ),
    "batch_size": Spec(
        title="The training step at the paper's batch sizes: time and peak memory",
        short=(
            "the sparse (and, where it fits, dense) training step at 128, 512 and 2,048 "
            "tokens: tokens/s and measured peak memory (RSS and torch's allocator)."
        ),
        about=(
            "`benchmarks/bench_batch_size.py`: the `train_step` step (ReLU-TopK, paper "
            "shape, fp32, one thread) at growing batches, smallest first; medians of two "
            "interleaved steps after a warm-up step. `peak RSS` is the process's resident "
            "peak over the warm-up step (VmHWM, reset before each batch size), Python, "
            "torch and MKL scratch included; `torch peak` is the allocator's (tensors alive "
            "at the step's start + its peak of new allocations, one profiled step) and "
            "`activations` that minus parameters, gradients and AdamW moments. Dense rows "
            "only where they fit the machine and the time (512 tokens; 128 is "
            "`train_step`'s)."
        ),
        columns=[
            ("step", column("name")),
            ("tokens/s", column("tokens_per_s")),
            ("ratio vs dense", column("ratio_vs_dense", fmt_ratio)),
            ("s/step (median)", column("seconds_per_step")),
            ("all steps (s)", lambda r: ", ".join(f"{t:.2f}" for t in r.get("seconds_all", []))),
            ("peak RSS", column("peak_rss_bytes", fmt_bytes)),
            ("torch peak", column("peak_total_bytes", fmt_bytes)),
            ("activations", column("peak_activation_bytes", fmt_bytes)),
        ],
    ),
    "online": Spec(
        title="Online activations: the online source vs the cached source and the step",
        short=(
            "tokens/s of the online source (teacher forward + capture + shuffle buffer) at "
            "the ViT-B-32 and ViT-B-16 shapes, against the cached source and the step."
        ),
        about=(
            "`benchmarks/bench_online.py`: `OnlineTokenStream` with an open_clip ViT "
            "(random weights, fp32 teacher, one thread) iterated once over random images, "
            "against the cached train stream over a synthetic fp16 cache of the same shape. "
            "`vs train step` divides by the tokens/s of `train_step`'s sparse ReLU-TopK "
            "step (128 tokens) and `vs 2,048-token step` by `batch_size`'s sparse step at "
            "2,048 tokens: above 1x, the source is not what limits training. (When those "
            "sections were measured in another run, their dates say so.)"
        ),
        columns=[
            ("source", column("name")),
            ("tokens/s", column("tokens_per_s")),
            ("vs cached", column("ratio_vs_cached", fmt_ratio)),
            ("vs train step", column("ratio_vs_train_step", fmt_ratio)),
            ("vs 2,048-token step", column("ratio_vs_big_step", fmt_ratio)),
            ("tokens/image", column("tokens_per_image")),
            ("s", column("seconds")),
        ],
        targets=online_targets,
    ),
    "train_step": Spec(
        title="Training step: sparse vs dense decoding, per sparsifier",
        short=(
            "one whole CLT training step at the paper shape (forward, loss, backward, "
            "AdamW), sparse against dense decoding, for each sparsifier."
        ),
        about=(
            "One optimisation step of `CLTModule` (compute_loss, backward, fused AdamW, "
            "zero_grad) at the paper shape, the same module switched between "
            '`decode="dense"` and `decode="sparse"`, steps interleaved, medians reported '
            "(`benchmarks/bench_train_step.py`). Sparse ReLU-/Abs-TopK is the fused path "
            "(layer-by-layer TopK encoder whose backward only touches the kept latents, "
            "decode, codes' and weight gradients as sparse-matrix products over the "
            "latent-sorted code matrix, recycled gradient buffers). BatchTopK keeps the dense "
            "encoder (its selection spans the batch); JumpReLU decodes densely in training "
            "in both modes by design (its threshold gradient needs dLoss/dz below the "
            "threshold), so its two rows time the same path. Not in the table, measured "
            "once on 2026-11-24 at load ~1.5 with the same settings: bf16 autocast "
            '(Lightning\'s `precision="bf16-mixed"`) makes the sparse ReLU-TopK step ~6% '
            "faster (2.39 s against 2.54 s; only the encoder's matmuls run in bf16, the "
            "decoder stays fp32). `torch.compile` (`CLTModule(compile=True)`) was not "
            "timed: compiling the sparse path at this shape had not finished after 12 "
            "minutes on the (then loaded) machine and was stopped; tests check that it "
            "equals eager on a tiny CLT. The `breakdown_*` rows (ReLU-TopK, sparse, "
            "interleaved) time the whole step against its floors: `step_encoder_only` "
            "(fused TopK encoder, a loss on its codes, backward, fused AdamW on "
            "`W_enc`/`b_enc`: no decoder) and `step_adamw_only` (`optimizer.step()` over "
            "all parameters, the update any step makes); `vs floors` = full seconds / "
            "(encoder-only + AdamW-only seconds). `step_full_no_recycling` is the step "
            "with `gradient_recycler.GRAD_RECYCLER` disabled (fresh gradients every step): "
            "`vs no recycling` = its seconds over the recycled step's, the measured case "
            "for the recycler (which relies on `torch._C._storage_Use_Count` and falls back "
            "to fresh gradients where torch lacks it)."
        ),
        columns=[
            ("step", column("name")),
            ("tokens/s", column("tokens_per_s")),
            ("ratio vs dense", column("ratio_vs_dense", fmt_ratio)),
            ("s/step (median)", column("seconds_per_step")),
            ("all steps (s)", lambda r: ", ".join(f"{t:.2f}" for t in r.get("seconds_all", []))),
            ("loss", column("loss", lambda v: "-" if v is None else f"{v:.6f}")),
            ("loss rel. diff", column("loss_rel_diff", lambda v: "-" if v is None else f"{v:.1e}")),
            ("fused encoder", column("fused_encoder", fmt_yes_no)),
            ("vs floors", column("ratio_vs_floors", fmt_ratio)),
            ("vs no recycling", column("ratio_vs_recycling", fmt_ratio)),
        ],
        targets=train_step_targets,
    ),
    "memory": Spec(
        title="Peak memory of the training step: sparse vs dense",
        short=(
            "the peak memory of that step, sparse against dense, split into the static part"
            " (weights, gradients, AdamW moments) and the activations."
        ),
        about=(
            "One profiled step per mode for the two TopK targets "
            "(`benchmarks/bench_memory.py`, same step as `train_step`). `static` = "
            "parameters + gradients + AdamW moments, identical in both modes; `total` = the "
            "step's peak of live tensors (what existed at its start + its peak of new "
            "allocations, `torch.profiler` memory events); `activations` = total - static, "
            "i.e. what the step needs beyond the model and its optimizer. The issue's "
            "target is about the part that sparse decoding can change, the activations; "
            "the total cannot be halved at this shape, since the static 13.6 GB is most of "
            "it in both modes."
        ),
        columns=[
            ("step", column("name")),
            ("total peak", column("peak_total_bytes", fmt_bytes)),
            ("total vs dense", column("peak_total_bytes_ratio_vs_dense", fmt_ratio)),
            ("activations", column("peak_activation_bytes", fmt_bytes)),
            ("activations vs dense", column("peak_activation_bytes_ratio_vs_dense", fmt_ratio)),
            ("static", column("static_bytes", fmt_bytes)),
            ("recycled grads", column("recycled_grad_bytes", fmt_bytes)),
        ],
        targets=memory_targets,
    ),
    "cache": Spec(
        title="Activation caching: write_cache vs the teacher's bare forward",
        short=(
            "writing the activation cache against the teacher's bare forward pass on the "
            "same images (ViT-B-32 architecture)."
        ),
        about=(
            "`clt_lightning.data.cache_writer.write_cache` with a real open_clip ViT (random "
            "weights) against the same teacher's bare forward (`encode_image`) on the same "
            "images, batch size and dtype (`benchmarks/bench_cache.py`): the ratio is what "
            "capturing, casting, checksumming and writing shards leave of the teacher's "
            "throughput."
        ),
        columns=[
            ("variant", column("name")),
            ("images/s", column("images_per_s")),
            ("ratio vs teacher", column("ratio_vs_teacher", fmt_ratio)),
            ("MB/s written", column("mb_per_s")),
            ("s (median)", column("seconds")),
        ],
        targets=cache_targets,
    ),
    "data": Spec(
        title="Cached token loading vs the training step's consumption",
        short=("reading cached token batches against what the fastest training step consumes."),
        about=(
            "Iterating the cached train stream of `ActivationDataModule` at the paper shape "
            "(`benchmarks/bench_data.py`, fp16 shards, float32 batches). The baseline is "
            "the fastest training step of this run (ReLU-TopK, sparse decoding, "
            "`train_step`): loading must not be what limits training."
        ),
        columns=[
            ("variant", column("name")),
            ("tokens/s", column("tokens_per_s")),
            ("ratio vs training step", column("ratio_vs_train_step", fmt_ratio)),
            ("MB/s", column("mb_per_s")),
            ("batches", column("batches")),
            ("batch size", column("batch_size")),
        ],
        targets=data_targets,
    ),
    "cascade": Spec(
        title="Cascaded replacement: shared prefix vs recomputing from layer 0",
        short=(
            "the cascaded-replacement evaluation, sharing the clean prefix against "
            "recomputing every run from layer 0."
        ),
        about=(
            "Zero-shot accuracy with the CLT replacing layers s..L-1 for every start s and "
            "token mode (`benchmarks/bench_cascade.py`); ratio = seconds / naive seconds "
            "(lower is better)."
        ),
        columns=[
            ("variant", column("name")),
            ("s", column("seconds")),
            ("ratio vs naive", column("ratio", fmt_ratio)),
            ("same counts", column("matches_naive")),
        ],
        targets=cascade_targets,
    ),
    "suite": Spec(
        title="Evaluation suite: one shared clean teacher pass vs one pass per metric",
        short=(
            "the whole evaluation suite (cascade, contributions, ablations, reconstruction), "
            "one shared clean teacher pass against one per metric family."
        ),
        about=(
            "Every number of `clt evaluate` on the same images (`benchmarks/bench_suite.py`): "
            "four clean teacher passes (cascade, contributions, ablations, reconstruction "
            "each running the teacher) against the suite's shared pass (cascade, "
            "contributions and reconstruction from one run; ablations, which rank sources "
            "by the finished scores, from a second). Ratio = seconds / four-pass seconds "
            "(lower is better)."
        ),
        columns=[
            ("variant", column("name")),
            ("s", column("seconds")),
            ("ratio vs four passes", column("ratio", fmt_ratio)),
            ("same numbers", column("matches_four_passes")),
        ],
        targets=suite_targets,
    ),
    "retrieval": Spec(
        title="Retrieval indexes: build/query throughput and recall",
        short=(
            "FAISS retrieval indexes, compressed against exact: size, build and query "
            "speed, recall@10 (no target)."
        ),
        about=(
            "FAISS indexes over synthetic CLT-like codes (`benchmarks/bench_retrieval.py`): "
            "compressed indexes against the exact `Flat` index of the same run (size, "
            "query speed), recall@10 against the exact top 10. No target set."
        ),
        columns=[
            ("index", column("index_type")),
            ("size", column("estimated_bytes", fmt_bytes)),
            ("size vs Flat", column("bytes_ratio_vs_flat", fmt_ratio)),
            ("build s", column("build_s")),
            ("queries/s", column("queries_per_s")),
            ("queries vs Flat", column("queries_ratio_vs_flat", fmt_ratio)),
            ("recall@10", column("recall_at_10")),
            ("n x dim", lambda r: f"{r.get('n', '-')} x {r.get('dim', '-')}"),
        ],
    ),
    "features": Spec(
        title="Latent dashboards: the `clt features` pass, its store, its site",
        short=(
            "`clt features`: the pass against the teacher forward + CLT encode it cannot "
            "avoid, the top-N store's memory at the paper shape, the site's build time."
        ),
        about=(
            "`benchmarks/bench_features.py`. `teacher_plus_encode` is the floor of any "
            "latent pass: the teacher forward recording every layer plus `encode_layer` for "
            "every layer, over 96 images. `features_pass_steady` is `features.collect.collect` "
            "over the same images without the per-latent contributions (what every image "
            "after the first `contribution_images` = 64 costs): top-N store with heatmaps, "
            "counters, histograms; the target is read on it. `features_pass_fill` / "
            "`teacher_plus_encode_fill` are the first 32 images alone, where the top-16 store "
            "is still filling and most (latent, image) pairs enter it; "
            "`features_pass_after_fill` is the difference (images 33-96, closer to the bulk "
            "of a real pass of thousands of images). `features_pass` is the first 16 images "
            "with the per-latent contributions (a CLT forward per token), as the first 64 "
            "images of a default pass. One repeat, the runs interleaved (the benchmark's "
            "300 s budget); ratio = seconds / floor over the same images. "
            "`topk_store` allocates the top-N store at the paper shape (12 x 12,288 latents x 16 images x 2 token "
            "groups, T = 50). `site_build` writes the static site for 12 x 1,024 latents "
            "from synthetic store tensors (500 thumbnails), then rebuilds it reusing them."
        ),
        columns=[
            ("row", column("name")),
            ("s", column("seconds")),
            ("images/s", column("images_per_s")),
            ("ratio", column("ratio", fmt_ratio)),
            ("entries", column("entries")),
            ("bytes held", column("bytes_held", fmt_bytes)),
            ("site MB", column("site_mb")),
            ("shape", column("shape")),
        ],
        targets=features_targets,
    ),
}
"""Each benchmark's report section, by name (`benchmarks.report.render` reads it)."""
