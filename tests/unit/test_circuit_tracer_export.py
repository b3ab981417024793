"""`clt export --format circuit-tracer`: circuit-tracer's own loader reads what we write."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from clt_lightning.errors import ConfigError
from clt_lightning.models.circuit_tracer_export import save_circuit_tracer
from clt_lightning.models.clt import CrossLayerTranscoder
from clt_lightning.models.sparsifiers import SparsifierConfig

L, D, F = 3, 8, 16


def trained_like(name: str) -> CrossLayerTranscoder:
    """A CLT with random weights, non-trivial scales and thresholds (as after training)."""
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(L, D, F, SparsifierConfig(name=name, k=4))
    with torch.no_grad():
        clt.b_enc.normal_(0.0, 0.3)
        clt.b_dec.normal_(0.0, 0.3)
        clt.set_normalisation(torch.tensor([0.5, 2.0, 1.5]), torch.tensor([3.0, 0.7, 1.2]))
        if name == "jumprelu":
            clt.sparsifier.threshold.uniform_(0.0, 0.5)
        if name == "batch_topk":
            clt.sparsifier.threshold.copy_(torch.tensor([0.1, 0.3, 0.2]))
            clt.sparsifier.threshold_updates.fill_(5)
    return clt.eval()


def numpy_reference(folder: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """circuit-tracer's documented CLT maths on its files, in numpy: (z [L,B,F], y [L,B,d])."""
    n_layers = len(list(folder.glob("W_enc_*.safetensors")))
    enc = [load_file(str(folder / f"W_enc_{i}.safetensors")) for i in range(n_layers)]
    dec = [load_file(str(folder / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"] for i in range(n_layers)]
    z = []
    for i, e in enumerate(enc):
        pre = x[:, i].astype(np.float64) @ e[f"W_enc_{i}"].T + e[f"b_enc_{i}"]
        z.append(pre * (pre > e[f"threshold_{i}"]))
    y = [
        enc[t][f"b_dec_{t}"] + sum(z[s] @ dec[s][:, t - s] for s in range(t + 1))
        for t in range(n_layers)
    ]
    return np.stack(z), np.stack(y)


@pytest.fixture
def load_clt(monkeypatch: pytest.MonkeyPatch):
    """circuit-tracer's loader. Its package imports transformers at import time only for
    graph files; where transformers is absent (it pins huggingface-hub<1.0, which our
    open_clip/timm environment does not allow) an empty stand-in module is supplied."""
    if importlib.util.find_spec("circuit_tracer") is None:
        pytest.skip("circuit-tracer is not installed (pip install --no-deps circuit-tracer==0.5.0)")
    if importlib.util.find_spec("transformers") is None:
        stub = types.ModuleType("transformers")
        stub.AutoTokenizer = None  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "transformers", stub)
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    return load_clt


@pytest.mark.parametrize("name", ["jumprelu", "batch_topk"])
def test_circuit_tracer_loader_encodes_and_decodes_as_we_do(
    name: str, tmp_path: Path, load_clt
) -> None:
    clt = trained_like(name)
    save_circuit_tracer(clt, tmp_path, "tiny", "ln2_out")
    theirs = load_clt(
        str(tmp_path), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False
    )
    x = torch.randn(10, L, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = clt(x)
    assert (ours.encoding.z != 0).any()  # thresholds leave some latents active
    with torch.no_grad():
        z_theirs = theirs.encode(x.transpose(0, 1))  # [L, B, F]
    torch.testing.assert_close(z_theirs, ours.encoding.z.transpose(0, 1), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        y_theirs = theirs.decode(z_theirs)  # [L, B, d]
    torch.testing.assert_close(y_theirs, ours.y_hat.transpose(0, 1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["jumprelu", "batch_topk"])
def test_documented_layout_and_maths(name: str, tmp_path: Path) -> None:
    clt = trained_like(name)
    save_circuit_tracer(clt, tmp_path / "out", "ViT-B-16", "ln2_in")
    folder = tmp_path / "out"
    names = sorted(p.name for p in folder.iterdir())
    want = [f"W_{k}_{i}.safetensors" for k in ("dec", "enc") for i in range(L)]
    assert names == sorted([*want, "config.yaml"])
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder"
    assert config["feature_input_hook"] == "hook_resid_mid"
    assert config["feature_output_hook"] == "hook_mlp_out"
    x = torch.randn(7, L, D, generator=torch.Generator().manual_seed(2))
    z, y = numpy_reference(folder, x.double().numpy())
    with torch.no_grad():
        ours = clt(x)
    np.testing.assert_allclose(z, ours.encoding.z.transpose(0, 1).numpy(), atol=1e-4)
    np.testing.assert_allclose(y, ours.y_hat.transpose(0, 1).numpy(), atol=1e-4)


@pytest.mark.parametrize("name", ["relu_topk", "abs_topk"])
def test_topk_sparsifiers_are_refused_before_writing(name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{name}.*relu and jump_relu"):
        save_circuit_tracer(trained_like(name), tmp_path / "out", "tiny")
    assert not (tmp_path / "out").exists()


def test_stale_layers_of_an_older_export_are_removed(tmp_path: Path) -> None:
    (tmp_path / "W_enc_5.safetensors").write_bytes(b"old")
    (tmp_path / "W_dec_5.safetensors").write_bytes(b"old")
    save_circuit_tracer(trained_like("jumprelu"), tmp_path, "tiny")
    assert not (tmp_path / "W_enc_5.safetensors").exists()
    assert not (tmp_path / "W_dec_5.safetensors").exists()
    assert len(list(tmp_path.glob("W_enc_*.safetensors"))) == L


def test_a_folder_with_other_files_is_refused_untouched(tmp_path: Path) -> None:
    (tmp_path / "W_enc_5.safetensors").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("kept")
    with pytest.raises(ConfigError, match="notes.txt"):
        save_circuit_tracer(trained_like("jumprelu"), tmp_path, "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["W_enc_5.safetensors", "notes.txt"]
