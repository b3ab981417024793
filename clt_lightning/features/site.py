"""The static latent site: `index.html` + `latent.html`, opened from disk, no server, no CDN.

Layout of the output folder (next to the store):

    index.html, latent.html, assets/site.css, assets/site.js    (copied from the package)
    data/summary.js              run facts, per-layer overview, mean write-share matrix
    data/layer_XX.js             per-latent table of layer XX (frequency, activation, ...)
    data/LXX/chunk_YYYY.js       full records of latents YYYY*256 .. +255 of layer XX
    thumbs/<image id>.jpg        one thumbnail per image shown (written once, reused)

Design decisions:

- Data files are JavaScript (`window.__clt.add(...)`), loaded with <script> tags: browsers
  refuse `fetch()` of local JSON from a file:// page, but load local scripts.
- A latent page loads only its layer's table and its chunk (256 latents), so a paper-scale
  site (12 x 12,288 latents) opens as fast as a small one.
- Heatmaps are quantised to int8 (-127..127 of the image's largest |activation|, that
  maximum kept as a float) and base64-encoded per latent: 16 images x 50 tokens cost
  ~1 KB. They are display data; the exact values live in the store.
- Thumbnails are JPEG (photographs; 5-10x smaller than PNG at 96 px), a centre square crop
  like the teacher's preprocessing, so the heatmap grid lies over the pixels the teacher
  saw. `thumbs/dataset.json` records the dataset fingerprint: thumbnails of the same
  dataset are reused across runs, another dataset's are deleted first.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from clt_lightning.features.store import LAYER_TENSORS, layer_columns
from clt_lightning.features.topk import GROUPS
from clt_lightning.files import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

CHUNK = 256
"""Latents per data chunk file."""
ASSETS = ("assets/site.css", "assets/site.js", "latent.html", "index.html")
"""Copied in this order: index.html last, so a site with an index is whole."""
DIRECT_TOP = 8
"""Classes listed per direction (pushed up / down) on a latent page."""


def _js(name: str, payload: Any) -> str:
    return f"window.__clt.add({json.dumps(name)}, {json.dumps(payload, separators=(',', ':'))});\n"


def _rounded(values: np.ndarray, digits: int = 4) -> list:
    """Floats with `digits` significant digits (NaN -> None), as nested lists."""
    values = np.asarray(values, dtype=np.float64)
    out = (
        np.vectorize(lambda v: float(f"{v:.{digits}g}"), otypes=[float])(values)
        if values.size
        else values
    )
    return np.where(np.isfinite(out), out, np.nan).tolist() if out.size else []


def _clean(obj: Any) -> Any:
    """Replace NaN by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return None if obj != obj else obj
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    return obj


COLUMNS = {
    "freq": "token_frequency",
    "cls_freq": "cls_frequency",
    "img_freq": "image_frequency",
    "mean": "mean_activation",
    "max": "max_activation",
    "dist": "write_distance",
    "local": "local_share",
    "top": "top_images",
}
"""Short keys of the index table's columns in the data files -> `store.layer_columns` keys."""


def layer_tables(
    tensors: dict[str, torch.Tensor], manifest: dict[str, Any]
) -> list[dict[str, np.ndarray]]:
    """Per layer, the per-latent columns the index table shows ([F] arrays, top [F, 3])."""
    tables = []
    for s in range(manifest["n_layers"]):
        t = {name: tensors[name][s] for name in LAYER_TENSORS}
        columns = layer_columns(
            t, s, manifest["n_layers"], manifest["n_images"], manifest["n_tokens"]
        )
        tables.append({short: columns[name].numpy() for short, name in COLUMNS.items()})
    return tables


def summary_payload(
    tensors: dict[str, torch.Tensor], manifest: dict[str, Any], tables: list[dict], config: Any
) -> dict[str, Any]:
    """Run facts, per-layer overview and the layer-mean write-share matrix."""
    layers = []
    for s, t in enumerate(tables):
        alive = t["freq"] > 0
        layers.append(
            {
                "layer": s,
                "dead": int((~alive).sum()),
                "dense": int((t["freq"] > config.dense_threshold).sum()),
                "median_freq": float(np.median(t["freq"][alive])) if alive.any() else 0.0,
                "mean_dist": float(t["dist"][alive].mean()) if alive.any() else 0.0,
                "log_freq_hist": np.histogram(np.log10(t["freq"][alive]), bins=24, range=(-7, 0))[
                    0
                ].tolist(),
            }
        )
    share = tensors["write_share"].mean(1).numpy()  # [L, L] mean over latents
    keys = ("dataset", "split", "sparsifier", "n_layers", "n_latents", "n_top", "n_images")
    keys += ("n_tokens", "tokens_per_image", "grid_size", "created", "checkpoint")
    return _clean(
        {
            **{k: manifest.get(k) for k in keys},
            "dense_threshold": config.dense_threshold,
            "histogram_range": [float(v) for v in config.histogram_range],
            "chunk": CHUNK,
            "has_direct_effect": "direct_effect" in tensors,
            "contribution_images": manifest.get("contribution_images"),
            "fingerprint": manifest["fingerprints"]["clt"][:16],
            "layers": layers,
            "mean_share": _rounded(share),
        }
    )


def layer_payload(table: dict[str, np.ndarray]) -> dict[str, Any]:
    """The index table of one layer (column arrays of F values)."""
    columns = {k: _rounded(v) for k, v in table.items() if k != "top"}
    return _clean({**columns, "top": table["top"].tolist()})


def _heat_block(heatmaps: np.ndarray) -> tuple[str, list]:
    """int8 base64 of [n, T] heatmaps scaled per row, and the per-row scale."""
    scale = np.abs(heatmaps).max(1)
    q = np.round(127 * heatmaps / np.maximum(scale, 1e-30)[:, None]).astype(np.int8)
    return base64.b64encode(q.tobytes()).decode(), _rounded(scale)


def latent_record(t: dict[str, np.ndarray], layer: int, i: int, labels: np.ndarray | None) -> dict:
    """The JSON record of latent i of `layer` from numpy views of the store tensors."""
    slots: dict[int, int] = {}
    heat_rows, top = [], {}
    for g in GROUPS:
        entries = []
        for v, img, tok, heat in zip(
            t[f"top_value_{g}"][i],
            t[f"top_image_{g}"][i],
            t[f"top_token_{g}"][i],
            t[f"top_heatmap_{g}"][i],
            strict=True,
        ):
            if img < 0:
                continue
            if int(img) not in slots:
                slots[int(img)] = len(heat_rows)
                heat_rows.append(heat)
            entries.append([slots[int(img)], float(f"{v:.4g}"), int(tok)])
        top[g] = entries
    n_tokens = t[f"top_heatmap_{GROUPS[0]}"].shape[-1]
    heat_block = np.asarray(heat_rows, dtype=np.float32).reshape(len(heat_rows), n_tokens)
    heat, scale = _heat_block(heat_block)
    images = list(slots)
    record = {
        "images": images,
        "labels": [int(labels[k]) for k in images] if labels is not None else [],
        "heat": heat,
        "heat_scale": scale,
        "top": top,
        "hist": t["histogram"][i].tolist(),
        "write": _rounded(t["write_norm"][i, layer:]),
        "share": _rounded(t["write_share"][i, layer:]),
        "contrib": _rounded(t["contribution"][i, layer:]),
    }
    if "direct_effect" in t:
        effect = t["direct_effect"][i]
        order = np.argsort(effect)
        up = [c for c in order[::-1][:DIRECT_TOP] if effect[c] > 0]
        down = [c for c in order[:DIRECT_TOP] if effect[c] < 0]
        record["up"] = [[int(c), float(f"{effect[c]:.4g}")] for c in up]
        record["down"] = [[int(c), float(f"{effect[c]:.4g}")] for c in down]
    return _clean(record)


def write_thumbnails(
    folder: Path, image_ids: list[int], dataset: Any, size: int, fingerprint: str, progress: bool
) -> None:
    """Write `thumbs/<id>.jpg` for each id that does not have one yet (same dataset)."""
    thumbs = folder / "thumbs"
    stamp = thumbs / "dataset.json"
    if thumbs.is_dir():
        try:
            same = json.loads(stamp.read_text()).get("dataset") == fingerprint
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(thumbs)
    thumbs.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, json.dumps({"dataset": fingerprint, "size": size}))
    todo = [i for i in image_ids if not (thumbs / f"{i}.jpg").is_file()]
    for i in tqdm(todo, desc="thumbnails", disable=not progress or not todo):
        image = dataset.raw_image(i).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize(
            (size, size), Image.Resampling.BICUBIC
        )
        buffer = _jpeg(image)
        atomic_write_bytes(thumbs / f"{i}.jpg", buffer)
    log.info("thumbnails: %d written, %d reused", len(todo), len(image_ids) - len(todo))


def _jpeg(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def copy_assets(folder: Path) -> None:
    """Copy the HTML, CSS and JS of the site from the package."""
    root = resources.files("clt_lightning.features") / "site_assets"
    for name in ASSETS:
        atomic_write_bytes(folder / name, (root / Path(name).name).read_bytes())


def write_chunks(
    data: Path, tensors: dict[str, torch.Tensor], layer: int, labels: np.ndarray | None, steps: Any
) -> set[int]:
    """Write the chunk files of one layer; returns the image ids they show."""
    names = [f"top_{k}_{g}" for g in GROUPS for k in ("value", "image", "token", "heatmap")]
    names += ["histogram", "write_norm", "write_share", "contribution"]
    names += ["direct_effect"] if "direct_effect" in tensors else []
    t = {}
    for name in names:
        part = tensors[name][layer]
        t[name] = (part.float() if part.is_floating_point() else part).numpy()
    n_latents, shown = t["histogram"].shape[0], set()
    for start in range(0, n_latents, CHUNK):
        stop = min(n_latents, start + CHUNK)
        records = {i: latent_record(t, layer, i, labels) for i in range(start, stop)}
        for record in records.values():
            shown.update(record["images"])
        name = f"chunk/{layer}/{start // CHUNK}"
        path = data / f"L{layer:02d}" / f"chunk_{start // CHUNK:04d}.js"
        atomic_write_text(path, _js(name, records))
        steps.update(stop - start)
    return shown


def write_site(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    dataset: Any,
    config: Any,
    progress: bool = True,
) -> Path:
    """Write the site for a store into `folder` (index.html last).

    Args:
        folder: The store's folder.
        tensors: The store's tensors (as `collect` returns them).
        manifest: The store's manifest (n_images, fingerprints, ...).
        dataset: The split, for thumbnails (`raw_image`) and labels (`labels`).
        config: FeaturesConfig (dense_threshold, thumbnail_size).
        progress: Progress bars.

    Returns:
        The path of index.html.
    """
    data = folder / "data"
    if data.is_dir():
        shutil.rmtree(data)
    labels = getattr(dataset, "labels", None)
    labels = None if labels is None else np.asarray(labels)
    tables = layer_tables(tensors, manifest)
    summary = summary_payload(tensors, manifest, tables, config)
    summary["dataset_classes"] = list(getattr(dataset, "class_names", []) or [])
    summary["zero_shot_classes"] = manifest.get("class_names") or []
    atomic_write_text(data / "summary.js", _js("summary", summary))
    shown: set[int] = set()
    n_layers, n_latents = manifest["n_layers"], manifest["n_latents"]
    steps = tqdm(total=n_layers * n_latents, desc="site", disable=not progress)
    for s in range(n_layers):
        table = layer_payload(tables[s])
        atomic_write_text(data / f"layer_{s:02d}.js", _js(f"layer/{s}", table))
        shown |= write_chunks(data, tensors, s, labels, steps)
    steps.close()
    write_thumbnails(
        folder,
        sorted(shown),
        dataset,
        config.thumbnail_size,
        manifest["fingerprints"]["dataset"],
        progress,
    )
    copy_assets(folder)
    return folder / "index.html"
