"""BatchTopK's inference threshold is calibrated on the final weights (issue 11.5).

The running EMA of the smallest kept value still carried the first, random-init batch:
at inference on val, L0 per layer drifted to [20.5, 7.5, 5.2, 3.2] for k = 8 on the
quickstart. Now every checkpoint carries a threshold refit to its own weights, so on the
val tokens L0 is within 10% of k per layer after any number of epochs, and `clt export`
writes that threshold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clt_lightning.data.cache_reader import open_cache
from clt_lightning.data.streams import shard_token_rows
from clt_lightning.models.clt import CrossLayerTranscoder
from tests.integration.tiny_run import quiet_cli, write_config

K = 4


def val_inputs(cache: Path) -> np.ndarray:
    """Every val token's x [N, L, d] as float64."""
    val = open_cache(cache / "val")
    rows = [shard_token_rows(val.load_shard(i), "all")["x"] for i in range(val.n_shards)]
    return torch.cat(rows).double().numpy()


@pytest.mark.parametrize("epochs", [1, 3])
def test_l0_at_inference_is_k_after_any_number_of_epochs(epochs, tiny_cache, tmp_path):
    torch.set_num_threads(1)
    run, exported = tmp_path / "run", tmp_path / "exported"
    config = write_config(tmp_path / "run.yaml", tiny_cache, run, **{
        "model.sparsifier": {"name": "batch_topk", "k": K}, "model.n_latents": 128,
        "trainer.max_epochs": epochs})  # fmt: skip
    ckpt = run / "checkpoints" / "last.ckpt"
    for args in (["fit"], ["export", "--ckpt_path", str(ckpt), "--output_dir", str(exported)]):
        code, err = quiet_cli([*args, "--config", str(config)])
        assert code == 0, err[-3000:]
    tensors = load_file(exported / "clt.safetensors")
    checkpoint = torch.load(ckpt, weights_only=True)["state_dict"]
    x = val_inputs(tiny_cache)
    n_layers = x.shape[1]
    for layer in range(n_layers):
        threshold = tensors[f"threshold_{layer}"].double().numpy()  # [F], one value per layer
        assert threshold[0] == checkpoint["clt.sparsifier.threshold"][layer].item()
        # the export folds the scales in: pre = x @ W_enc^T + b_enc on raw activations
        pre = x[:, layer] @ tensors[f"W_enc_{layer}"].double().numpy().T
        pre += tensors[f"b_enc_{layer}"].double().numpy()
        l0 = (pre > threshold).sum(axis=1).mean()
        assert abs(l0 - K) <= 0.1 * K, f"layer {layer}: L0 {l0:.2f} for k = {K}"
    clt = CrossLayerTranscoder.from_pretrained(exported).eval()
    with torch.no_grad():
        z = clt.encode(torch.from_numpy(x).float()).z
    l0 = (z != 0).sum(-1).float().mean(0)
    assert bool(((l0 - K).abs() <= 0.1 * K).all()), l0.tolist()
