"""The sparse training step (fused TopK encoder + sparse decode) equals the dense one.

One `CLTModule` optimisation step (compute_loss, backward, the module's AdamW) in
`decode="sparse"` against the same module in `decode="dense"`: losses, every gradient,
every parameter after the update and the dead-latent statistics, for ReLU-/Abs-TopK, with
and without dead latents (AuxK), on inputs with repeated tokens and rows with no positive
pre-activation. Also: the fused AdamW equals the loop implementation, bf16 autocast stays
within its stated tolerance of fp32, and `torch.compile` equals eager.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import Tensor

from clt_lightning.models import topk as topk_module
from clt_lightning.models.sparsifiers import SparsifierConfig
from clt_lightning.module import CLTModule

N_LAYERS, D_MODEL, N_LATENTS, K = 3, 8, 48, 4


def make_module(name: str, decode: str, dead: bool, dtype: torch.dtype) -> CLTModule:
    """A tiny module with non-trivial scales and biases; `dead` marks half the latents as
    (almost) dead so that AuxK is active."""
    config = SparsifierConfig(name=name, k=K, aux_k=6, dead_tokens=1000)
    module = CLTModule(
        n_latents=N_LATENTS,
        sparsifier=config,
        decode=decode,
        lr=1e-2,
        weight_decay=0.01,
        warmup_steps=0,
        n_layers=N_LAYERS,
        d_model=D_MODEL,
    )
    clt = module.clt
    clt.set_normalisation(torch.tensor([0.5, 2.0, 1.3]), torch.tensor([3.0, 0.25, 0.8]))
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.3)
        clt.b_enc[0, :] = -clt.b_enc[0].abs() - 0.1  # layer 0: x = 0 gives no positive pre
        clt.b_dec.normal_(0, 1.0)
        if dead:
            clt.sparsifier.tokens_since_fired[:, N_LATENTS // 2 :] = 995
    return module.to(dtype).train()


def make_batch(n_tokens: int, dtype: torch.dtype, seed: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, N_LAYERS, D_MODEL, generator=generator, dtype=torch.float64)
    x[1] = x[0]  # a repeated token: the same latents in two rows
    x[2, 0] = 0.0  # ReLU-TopK keeps only zeros at layer 0 for this token
    y = torch.randn(n_tokens, N_LAYERS, D_MODEL, generator=generator, dtype=torch.float64)
    return {"x": x.to(dtype), "y": y.to(dtype)}


def train_step(module: CLTModule, optimizer: torch.optim.Optimizer, batch: dict) -> dict:
    """One step as Lightning runs it; returns the loss terms, the encoding and the grads."""
    loss, terms, output = module.compute_loss(batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.clt.named_parameters()}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    values = {k: v.detach() for k, v in terms.items()}
    return {"loss": loss.detach(), "terms": values, "encoding": output.encoding, "grads": grads}


@pytest.mark.parametrize("dead", [False, True], ids=["no_dead", "auxk"])
@pytest.mark.parametrize("name", ["relu_topk", "abs_topk"])
def test_sparse_step_equals_dense_step(name: str, dead: bool) -> None:
    dense = make_module(name, "dense", dead, torch.float64)
    sparse = copy.deepcopy(dense)
    sparse.clt.decode_mode = "sparse"
    optimizers = [m.configure_optimizers()["optimizer"] for m in (dense, sparse)]
    tol = {"rtol": 1e-5, "atol": 1e-7}  # compute_loss takes the MSE in float32
    for seed in (0, 1):  # the second step reuses the recycled gradient buffers
        batch = make_batch(10, torch.float64, seed)
        want = train_step(dense, optimizers[0], batch)
        got = train_step(sparse, optimizers[1], batch)
        assert got["encoding"].pre is None and want["encoding"].pre is not None  # fused path
        assert set(got["terms"]) == set(want["terms"]) == {"per_layer", "mse_scaled_sum", "auxk"}
        for key, value in want["terms"].items():
            torch.testing.assert_close(got["terms"][key], value, **tol)
        assert (float(want["terms"]["auxk"]) > 0) == dead
        for key, value in want["grads"].items():
            torch.testing.assert_close(got["grads"][key], value, **tol, msg=key)
        for (key, p_dense), p_sparse in zip(
            dense.clt.named_parameters(), sparse.clt.parameters(), strict=True
        ):
            torch.testing.assert_close(p_sparse, p_dense, **tol, msg=key)
        for key, buffer in dense.clt.sparsifier.named_buffers():
            assert torch.equal(dict(sparse.clt.sparsifier.named_buffers())[key], buffer), key


def test_sparse_step_equals_dense_step_with_the_ddp_aux_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under DDP the AuxK codes come from a second pass after the (all-reduced) statistics
    update; on one process it must give what the dense path gives."""
    monkeypatch.setattr(topk_module, "_is_distributed", lambda: True)
    dense = make_module("abs_topk", "dense", True, torch.float64)
    sparse = copy.deepcopy(dense)
    sparse.clt.decode_mode = "sparse"
    batch = make_batch(10, torch.float64, 0)
    optimizers = [m.configure_optimizers()["optimizer"] for m in (dense, sparse)]
    want = train_step(dense, optimizers[0], batch)
    got = train_step(sparse, optimizers[1], batch)
    assert got["encoding"].aux_codes is not None and float(want["terms"]["auxk"]) > 0
    tol = {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(got["terms"]["auxk"], want["terms"]["auxk"], **tol)
    for key, value in want["grads"].items():
        torch.testing.assert_close(got["grads"][key], value, **tol, msg=key)


def test_fused_path_only_where_it_is_exact() -> None:
    module = make_module("relu_topk", "auto", False, torch.float32)
    clt = module.clt
    assert fused(clt)  # k * 8 <= F, training, gradients
    with torch.no_grad():
        assert not fused(clt)
    assert not fused(clt.eval())
    clt.train().decode_mode = "dense"
    assert not fused(clt)
    for name in ("jumprelu", "batch_topk"):
        assert not fused(make_module(name, "sparse", False, torch.float32).clt)


def fused(clt) -> bool:  # noqa: ANN001
    """Whether `forward` takes the sparsifier's fused encode now."""
    return clt.sparsifier.fuses(clt.decode_request())


def test_configure_optimizers_uses_the_fused_adamw() -> None:
    module = make_module("relu_topk", "dense", False, torch.float32)
    reference = copy.deepcopy(module)
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is True
    loop = torch.optim.AdamW(reference.clt.parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    batch = make_batch(10, torch.float32, 0)
    for m, opt in ((module, optimizer), (reference, loop)):
        for _ in range(2):
            train_step(m, opt, batch)
    for p, q in zip(module.clt.parameters(), reference.clt.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def relative_error(got: Tensor, want: Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("decode", ["sparse", "dense"])
def test_bf16_autocast_within_tolerance_of_fp32(decode: str) -> None:
    """bf16 autocast (Lightning's `precision="bf16-mixed"`): stated tolerance 1e-3 relative
    on the loss and 1e-2 relative (in norm) on every gradient (measured: 9e-5 and 3e-3,
    both paths). bf16 keeps 8 bits of
    mantissa (relative rounding 2^-8 = 3.9e-3); pre-activations closer than that may be
    ranked differently, which moves a whole decoder row's gradient, so this test keeps
    the kept latents apart (distinct bias magnitudes 0.1 apart, small inputs)."""
    fp32 = make_module("abs_topk", decode, False, torch.float32)
    with torch.no_grad():
        magnitudes = torch.linspace(0.2, 4.9, N_LATENTS)
        for layer in range(N_LAYERS):
            signs = torch.randint(0, 2, (N_LATENTS,)) * 2 - 1
            fp32.clt.b_enc[layer] = magnitudes[torch.randperm(N_LATENTS)] * signs
    bf16 = copy.deepcopy(fp32)
    batch = make_batch(64, torch.float32, 0)
    batch["x"] = batch["x"] * 0.01
    opt32, opt16 = (m.configure_optimizers()["optimizer"] for m in (fp32, bf16))
    want = train_step(fp32, opt32, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = train_step(bf16, opt16, batch)
    assert (got["encoding"].pre is None) == (decode == "sparse")
    assert relative_error(got["loss"], want["loss"]) < 1e-3
    for key, value in want["grads"].items():
        assert got["grads"][key].dtype == torch.float32, key
        assert relative_error(got["grads"][key], value) < 1e-2, key


def test_bf16_mixed_trainer_runs_the_sparse_step(tmp_path) -> None:
    module = make_module("relu_topk", "sparse", True, torch.float32)
    batches = [make_batch(32, torch.float32, seed) for seed in range(3)]
    for i, batch in enumerate(batches):
        batch["token"] = torch.arange(32) % 5
        batch["image"] = torch.arange(32) // 5 + 32 * i
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        precision="bf16-mixed",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = module.clt.W_enc.detach().clone()
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == 3
    assert not torch.equal(module.clt.W_enc.detach(), before)
    assert all(torch.isfinite(p).all() for p in module.clt.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["sparse", "dense"])
def test_compiled_step_equals_eager(decode: str) -> None:
    """`torch.compile` of the CLT (what `CLTModule(compile=True)` does), fp32: same loss
    and gradients as eager within 1e-5 (~70 s to compile the sparse path on 2 CPU cores)."""
    eager = make_module("abs_topk", decode, True, torch.float32)
    compiled = CLTModule(**{**eager.hparams, "compile": True})
    compiled.clt.load_state_dict(eager.clt.state_dict())
    compiled.train()
    opts = [m.configure_optimizers()["optimizer"] for m in (eager, compiled)]
    for seed in (0, 1):
        batch = make_batch(16, torch.float32, seed)
        want = train_step(eager, opts[0], batch)
        got = train_step(compiled, opts[1], batch)
        torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=1e-6)
        for key, value in want["grads"].items():
            torch.testing.assert_close(got["grads"][key], value, rtol=1e-5, atol=1e-6, msg=key)
