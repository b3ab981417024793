"""Export a CLT in circuit-tracer's per-layer layout (`clt export --format circuit-tracer`).

circuit-tracer (0.5.0, `circuit_tracer.transcoder.cross_layer_transcoder.load_clt`) reads a
folder of one file per layer:

    W_enc_{i}.safetensors   W_enc_{i} [F, d], b_enc_{i} [F], b_dec_{i} [d], threshold_{i} [F]
    W_dec_{i}.safetensors   W_dec_{i} [F, L - i, d]  (index j = target layer i + j)
    config.yaml             model_kind: cross_layer_transcoder, feature_input_hook,
                            feature_output_hook, model_name

and computes `pre_l = x_l @ W_enc_l.T + b_enc_l`, `z_l = pre_l * (pre_l > threshold_l)`
(JumpReLU; ReLU when no threshold is stored) and `y_hat_l = b_dec_l + sum_{s<=l} z_s @
W_dec_s[:, l - s]` on raw activations. Our `export_tensors` already folds the
normalisation scales in and uses these names.

Design decisions:

- Its CLT has only ReLU and JumpReLU activations (TopK was missing, its issue #56). Our
  `jumprelu` exports as is; `batch_topk` exports its calibrated inference threshold, a
  per-layer JumpReLU that is exactly its inference rule (z = pre * (pre > threshold),
  threshold >= 0). `relu_topk` and `abs_topk` select per token (and Abs-TopK keeps negative
  values), which no per-latent threshold reproduces: they are refused in one line.
- The loader counts `W_enc_*.safetensors` files to find L, and circuit-tracer treats
  config.yaml as the mark of a complete folder: the old config.yaml and any stale layer
  files are removed first and config.yaml is written last, each file atomically.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save

from clt_lightning.errors import ConfigError
from clt_lightning.files import atomic_write_bytes, commit_folder

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
INPUT_HOOKS = {"ln2_out": "ln2.hook_normalized", "ln2_in": "hook_resid_mid"}
"""Our `teacher.input_site` -> the TransformerLens hook circuit-tracer reads features at."""
OUTPUT_HOOK = "hook_mlp_out"
_LAYER_FILE = re.compile(r"W_(enc|dec)_(\d+)\.safetensors")


def check_representable(clt: Any) -> None:
    """Raise ConfigError unless circuit-tracer's CLT can compute this sparsifier.

    Args:
        clt: A `CrossLayerTranscoder`.

    Raises:
        ConfigError: The sparsifier has no threshold form (relu_topk, abs_topk).
    """
    if clt.sparsifier.export_threshold() is None:
        name = clt.sparsifier_config.name
        raise ConfigError(
            f"sparsifier {name!r} cannot be exported for circuit-tracer, whose CLT has only "
            "relu and jump_relu activations (per-token TopK is not a per-latent threshold); "
            "export jumprelu or batch_topk CLTs, or use --format clt-lightning"
        )


def save_circuit_tracer(
    clt: Any, path: str | Path, model_name: str, input_site: str = "ln2_out"
) -> Path:
    """Write the CLT as circuit-tracer's per-layer folder (see the module docstring).

    Args:
        clt: A `CrossLayerTranscoder` with a threshold-based sparsifier.
        path: Output folder (created; circuit-tracer files already in it are replaced).
        model_name: The teacher's name, recorded in config.yaml.
        input_site: The teacher's input site ("ln2_out" or "ln2_in").

    Returns:
        The folder.

    Raises:
        ConfigError: A sparsifier circuit-tracer cannot represent, or an unknown input site.
    """
    check_representable(clt)
    if input_site not in INPUT_HOOKS:
        raise ConfigError(f"input_site={input_site!r} unknown; valid: {sorted(INPUT_HOOKS)}")
    tensors = clt.export_tensors()
    n_layers = clt.n_layers
    folder = Path(path)
    metadata = {"format": "circuit-tracer", "source": "clt-lightning"}
    config = {
        "model_kind": "cross_layer_transcoder",
        "model_name": model_name,
        "feature_input_hook": INPUT_HOOKS[input_site],
        "feature_output_hook": OUTPUT_HOOK,
        "sparsifier": clt.sparsifier_config.name,
        "activation_function": "jump_relu",
    }
    # one unit: the old export or the new one, never layers of both (files.commit_folder)
    with commit_folder(folder, _owned, "a circuit-tracer export") as staging:
        for i in range(n_layers):
            encoder = {f"{k}_{i}": tensors[f"{k}_{i}"] for k in ("W_enc", "b_enc", "b_dec")}
            encoder[f"threshold_{i}"] = tensors[f"threshold_{i}"]
            atomic_write_bytes(staging / f"W_enc_{i}.safetensors", save(encoder, metadata=metadata))
            decoder = {f"W_dec_{i}": tensors[f"W_dec_{i}"]}
            atomic_write_bytes(staging / f"W_dec_{i}.safetensors", save(decoder, metadata=metadata))
        atomic_write_bytes(staging / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False).encode())
    logger.info("circuit-tracer CLT (%d layers) written to %s", n_layers, folder)
    return folder


def _owned(entry: Path) -> bool:
    """Entries of a circuit-tracer export folder (its files, temp files of a killed write)."""
    return (
        entry.name == CONFIG_FILE
        or _LAYER_FILE.fullmatch(entry.name) is not None
        or (entry.name.startswith(".") and entry.name.endswith(".tmp"))
    )
