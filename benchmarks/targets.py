"""The report's targets: what each benchmark must show, checked on the numbers of a run.

One function per benchmark, ``{name}_targets(results) -> list[Verdict]``, where
``results`` maps a benchmark's name to its rows (one dict per row, as its
``benchmarks/bench_{name}.py`` returned them, after `annotate`). A verdict whose numbers
are missing (the benchmark failed, or was not run) is ``met=None``, never a pass.
`benchmarks.specs` attaches each function to its benchmark's section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.formatting import fmt_bytes, fmt_ratio

Rows = list[dict[str, Any]]
"""A benchmark's rows: one dict per table row, keys as the benchmark wrote them."""


@dataclass
class Verdict:
    """One target of one benchmark, as checked in this run."""

    target: str
    measured: str
    met: bool | None
    """None: could not be checked (missing data)."""
    note: str = ""
    """Why, when it is not met (or what the number does not say)."""


def rows_named(results: dict[str, Rows], bench: str) -> dict[str, dict]:
    """The rows of benchmark `bench` that are not errors, by their ``name``."""
    return {row.get("name", ""): row for row in results.get(bench, []) if "error" not in row}


STEP_SPEEDUP_TARGET = 5.0
"""Sparse step tokens/s over dense step tokens/s at 128 tokens, ReLU-/Abs-TopK."""
FLOORS_TARGET = 2.0
"""Full sparse step seconds over (encoder-only + AdamW-only step seconds), same run."""


def train_step_targets(results: dict[str, Rows]) -> list[Verdict]:
    """The `train_step` targets, checked on `results`."""
    rows = rows_named(results, "train_step")
    verdicts = []
    for name in ("relu_topk", "abs_topk"):
        target = f"{name}: training step >= {STEP_SPEEDUP_TARGET:g}x faster with sparse decode"
        row = rows.get(f"train_step_{name}_sparse")
        if row is None:
            verdicts.append(Verdict(target, "not measured", None))
            continue
        ratio, equal = row.get("ratio_vs_dense"), row.get("losses_equal")
        verdicts.append(
            Verdict(
                target + ", same loss",
                f"{fmt_ratio(ratio)}, loss rel. diff {row.get('loss_rel_diff', 0):.1e}",
                bool(ratio is not None and ratio >= STEP_SPEEDUP_TARGET and equal),
            )
        )
    full = rows.get("breakdown_step_full", {})
    floors = full.get("ratio_vs_floors")
    target = f"full sparse step <= {FLOORS_TARGET:g}x (encoder-only + AdamW-only step)"
    measured = "not measured" if floors is None else f"{fmt_ratio(floors)}"
    verdicts.append(Verdict(target, measured, None if floors is None else floors <= FLOORS_TARGET))
    return verdicts


def online_targets(results: dict[str, Rows]) -> list[Verdict]:
    """The `online` targets, checked on `results`."""
    row = rows_named(results, "online").get("online_ViT-B-32")
    target = "online source (ViT-B-32) >= the training step's consumption"
    if row is None or row.get("ratio_vs_train_step") is None:
        return [Verdict(target, "not measured", None)]
    ratio = row["ratio_vs_train_step"]
    return [
        Verdict(
            target,
            f"{fmt_ratio(ratio)} ({row['tokens_per_s']:,.0f} tokens/s)",
            ratio >= 1.0,
        )
    ]


def memory_targets(results: dict[str, Rows]) -> list[Verdict]:
    """The `memory` targets, checked on `results`."""
    rows = rows_named(results, "memory")
    verdicts = []
    for name in ("relu_topk", "abs_topk"):
        row = rows.get(f"memory_{name}_sparse")
        if row is None:
            verdicts.append(Verdict(f"{name}: sparse peak <= 0.5x dense", "not measured", None))
            continue
        act = row.get("peak_activation_bytes_ratio_vs_dense")
        total = row.get("peak_total_bytes_ratio_vs_dense")
        verdicts.append(
            Verdict(
                f"{name}: peak memory of the sparse step <= 0.5x dense (activations)",
                f"activations {fmt_ratio(act)}; total incl. weights/grads/AdamW {fmt_ratio(total)}",
                bool(act is not None and act <= 0.5),
            )
        )
    return verdicts


def cache_targets(results: dict[str, Rows]) -> list[Verdict]:
    """The `cache` targets, checked on `results`."""
    rows = [r for r in results.get("cache", []) if "ratio_vs_teacher" in r]
    if not rows:
        return [Verdict("write_cache >= 0.85x the bare teacher forward", "not measured", None)]
    verdicts = []
    for row in rows:
        if not row["name"].startswith("cache_write"):
            continue
        ratio = row["ratio_vs_teacher"]
        precision = row.get("teacher_precision", "?")
        note = ""
        if ratio < 0.85:
            note = (
                f"{0.85 - ratio:.2f} short. The gap is per image, not a fixed per-run cost "
                "(a separate run at load ~1.5 measured 0.866 with 48 and 0.869 with 96 "
                "bf16 images): capturing x and y at every layer, the fp16 cast and the "
                "writer thread's statistics, sha256 and serialisation grow with the images "
                "and weigh more against the bf16 teacher, twice as fast as fp32. The writer "
                "thread needs the second core, which other processes share on this "
                "machine, so the ratio also moves with the load."
            )
        verdicts.append(
            Verdict(
                f"write_cache >= 0.85x the bare forward ({precision} teacher)",
                f"{fmt_ratio(ratio)} ({row['images_per_s']:.1f} img/s)",
                ratio >= 0.85,
                note,
            )
        )
    return verdicts


def data_targets(results: dict[str, Rows]) -> list[Verdict]:
    """The `data` targets, checked on `results`."""
    data = [r for r in results.get("data", []) if "tokens_per_s" in r]
    step = rows_named(results, "train_step").get("train_step_relu_topk_sparse")
    if not data or step is None:
        return [Verdict("cached loading >= 5x the training step's consumption", "n/a", None)]
    best = max(data, key=lambda r: r["tokens_per_s"])
    ratio = best["tokens_per_s"] / step["tokens_per_s"]
    return [
        Verdict(
            "cached datamodule >= 5x the tokens/s the (fastest) training step consumes",
            f"{best['name']}: {fmt_ratio(ratio)} ({best['tokens_per_s']:,.0f} vs "
            f"{step['tokens_per_s']:.0f} tokens/s)",
            ratio >= 5.0,
        )
    ]


def cascade_targets(results: dict[str, Rows]) -> list[Verdict]:
    """The `cascade` targets, checked on `results`."""
    rows = [r for r in results.get("cascade", []) if r.get("name", "") != "cascade_naive"]
    rows = [r for r in rows if "ratio" in r]
    if not rows:
        return [Verdict("cascade time <= 0.6x naive", "not measured", None)]
    best = min(rows, key=lambda r: r["ratio"])
    same = all(r.get("matches_naive") for r in rows)
    return [
        Verdict(
            "shared-prefix cascade <= 0.6x the naive time, same accuracies",
            ", ".join(f"{r['name']}: {fmt_ratio(r['ratio'])}" for r in rows)
            + ("" if same else " (**counts differ**)"),
            best["ratio"] <= 0.6 and same,
        )
    ]


def suite_targets(results: dict[str, Rows]) -> list[Verdict]:
    """The `suite` targets, checked on `results`."""
    rows = {r.get("name"): r for r in results.get("suite", [])}
    shared = rows.get("suite_shared_pass")
    if shared is None or "ratio" not in shared:
        return [Verdict("evaluation suite with one shared clean pass < 1x", "not measured", None)]
    same = bool(shared.get("matches_four_passes"))
    return [
        Verdict(
            "evaluation suite with one shared clean teacher pass < 1x the four-pass time, "
            "same numbers",
            fmt_ratio(shared["ratio"]) + ("" if same else " (**numbers differ**)"),
            shared["ratio"] < 1.0 and same,
        )
    ]


def features_targets(results: dict[str, Rows]) -> list[Verdict]:
    """The `features` targets, checked on `results`."""
    rows = rows_named(results, "features")
    steady, first = rows.get("features_pass_steady"), rows.get("features_pass")
    fill, after = rows.get("features_pass_fill"), rows.get("features_pass_after_fill")
    store, built = rows.get("topk_store"), rows.get("site_build")
    verdicts = []
    if steady is None or first is None:
        verdicts.append(Verdict("features pass <= 1.5x teacher forward + encode", "n/a", None))
    else:
        phases = ""
        if fill is not None and after is not None:
            phases = (
                f"; by phase: first {fill['n_images']} images (the store filling) "
                f"{fmt_ratio(fill['ratio'])}, the next {after['n_images']} {fmt_ratio(after['ratio'])}"
            )
        verdicts.append(
            Verdict(
                "features pass <= 1.5x the teacher forward + CLT encode (top-N, counters), "
                f"over {steady['n_images']} images",
                f"{fmt_ratio(steady['ratio'])}{phases}; with the per-latent contributions (the "
                f"first 64 images of a default pass) {fmt_ratio(first['ratio'])}",
                steady["ratio"] <= 1.5,
            )
        )
    if store is not None:
        verdicts.append(
            Verdict(
                "top-N store memory at the paper shape measured",
                f"{store['entries']:,} entries, {fmt_bytes(store['bytes_held'])} held "
                f"(formula {fmt_bytes(store['bytes_formula'])}, RSS +"
                f"{fmt_bytes(store['rss_growth_bytes'])}); B/16: {fmt_bytes(store['bytes_formula_b16'])}",
                store["bytes_held"] == store["bytes_formula"],
            )
        )
    if built is not None:
        verdicts.append(
            Verdict(
                "site for 12 x 1,024 latents builds in seconds (<= 60 s)",
                f"{built['seconds']:.1f} s ({built['site_mb']:.0f} MB, {built['thumbnails']} "
                f"thumbnails; rebuild reusing them {built['rebuild_seconds']:.1f} s)",
                built["seconds"] <= 60,
            )
        )
    return verdicts


def annotate(results: dict[str, Rows]) -> None:
    """Add the cross-row ratios the tables show (baselines measured in the same run)."""
    step = rows_named(results, "train_step").get("train_step_relu_topk_sparse")
    for row in results.get("data", []):
        if step is not None and "tokens_per_s" in row:
            row["ratio_vs_train_step"] = row["tokens_per_s"] / step["tokens_per_s"]
    big = rows_named(results, "batch_size").get("batch_2048_sparse")
    for row in results.get("online", []):
        if "tokens_per_s" not in row:
            continue
        if step is not None:
            row["ratio_vs_train_step"] = row["tokens_per_s"] / step["tokens_per_s"]
        if big is not None:
            row["ratio_vs_big_step"] = row["tokens_per_s"] / big["tokens_per_s"]
    flat = next((r for r in results.get("retrieval", []) if r.get("index_type") == "Flat"), None)
    for row in results.get("retrieval", []):
        if flat is None or "error" in row:
            continue
        if row.get("estimated_bytes") and flat.get("estimated_bytes"):
            row["bytes_ratio_vs_flat"] = row["estimated_bytes"] / flat["estimated_bytes"]
        if row.get("queries_per_s") and flat.get("queries_per_s"):
            row["queries_ratio_vs_flat"] = row["queries_per_s"] / flat["queries_per_s"]
