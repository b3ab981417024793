"""Sparse decoding equals the dense decoder, in value and in every gradient."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.gather_decode import gather_decode
from clt_lightning.errors import ConfigError
from clt_lightning.models import sparse_decode as sd
from clt_lightning.models.gradient_recycler import (
    GRAD_RECYCLER,
    GradientRecycler,
    storage_use_count_available,
)
from clt_lightning.models.sparse_decode import dense_to_sparse, sparse_decode
from clt_lightning.models.triton_decode import triton_available

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = triton_available()
TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
}
TORCH_BACKENDS = ["torch", "auto", "embedding_bag", "gather"]


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")],
        ),
    ]
)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def make_decoder(
    n_layers: int, d_model: int, n_latents: int, dtype: torch.dtype, device: torch.device
) -> tuple[list[Tensor], Tensor]:
    """Random leaf W_dec[s] [F, L - s, d] and b_dec [L, d]."""
    W_dec = [
        torch.randn(n_latents, n_layers - s, d_model, dtype=dtype, device=device).requires_grad_()
        for s in range(n_layers)
    ]
    b_dec = torch.randn(n_layers, d_model, dtype=dtype, device=device).requires_grad_()
    return W_dec, b_dec


def make_codes(
    n_tokens: int, n_layers: int, n_latents: int, k: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Signed values and indices [B, L, k] with the awkward cases built in.

    Token 1 repeats token 0's indices (repeats across tokens), token 2 has all-zero
    values at every layer, token 3 repeats one index within each row (duplicates are
    summed, as the dense scatter-add reference does).
    """
    indices = torch.rand(n_tokens, n_layers, n_latents).topk(k, dim=-1).indices
    values = torch.randn(n_tokens, n_layers, k, dtype=torch.float64)
    indices[1] = indices[0]
    values[2] = 0.0
    indices[3, :, 1] = indices[3, :, 0]
    return values.to(dtype=dtype, device=device).requires_grad_(), indices.to(device)


def dense_reference(values: Tensor, indices: Tensor, W_dec: list[Tensor], b_dec: Tensor) -> Tensor:
    """Scatter codes to dense z [B, L, F], then one matmul per (source, target) pair."""
    n_tokens, n_layers, _ = values.shape
    z = values.new_zeros(n_tokens, n_layers, W_dec[0].shape[0]).scatter_add(-1, indices, values)
    targets = []
    for target in range(n_layers):
        y = b_dec[target].expand(n_tokens, -1)
        for source in range(target + 1):
            y = y + z[:, source] @ W_dec[source][:, target - source]
        targets.append(y)
    return torch.stack(targets, dim=1)


def decode(codes: object, W_dec: list[Tensor], b_dec: Tensor, **kwargs: object) -> Tensor:
    """`sparse_decode`, or the benchmark's `gather_decode` baseline for backend="gather"."""
    if kwargs.get("backend") == "gather":
        return gather_decode(
            codes, W_dec, b_dec, **{k: v for k, v in kwargs.items() if k != "backend"}
        )
    return sparse_decode(codes, W_dec, b_dec, **kwargs)


def grads(out: Tensor, inputs: list[Tensor], grad_out: Tensor) -> list[Tensor]:
    return list(torch.autograd.grad(out, inputs, grad_out))


def assert_matches_reference(
    values: Tensor,
    indices: Tensor,
    W_dec: list[Tensor],
    b_dec: Tensor,
    tol: dict[str, float] | None = None,
    **kwargs: object,
) -> None:
    """Output and gradients (values, every W_dec[s], b_dec) equal the dense reference."""
    inputs = [values, *W_dec, b_dec]
    expected = dense_reference(values, indices, W_dec, b_dec)
    actual = decode((values, indices), W_dec, b_dec, **kwargs)
    tol = tol or TOLERANCES[values.dtype]
    torch.testing.assert_close(actual, expected, **tol)
    grad_out = torch.randn_like(expected)
    for got, want in zip(
        grads(actual, inputs, grad_out), grads(expected, inputs, grad_out), strict=True
    ):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_sparse_decode_matches_dense_reference(
    backend: str, dtype: torch.dtype, device: torch.device
) -> None:
    W_dec, b_dec = make_decoder(4, 16, 64, dtype, device)
    values, indices = make_codes(10, 4, 64, 8, dtype, device)
    assert_matches_reference(values, indices, W_dec, b_dec, backend=backend)


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 8 * 64 * 8])
def test_gather_backend_chunks_over_tokens(chunk_bytes: int, device: torch.device) -> None:
    # 1 byte -> one token per chunk; the other -> chunks of 3 tokens with a ragged tail.
    W_dec, b_dec = make_decoder(4, 16, 64, torch.float64, device)
    values, indices = make_codes(10, 4, 64, 8, torch.float64, device)
    assert_matches_reference(
        values, indices, W_dec, b_dec, backend="gather", chunk_bytes=chunk_bytes
    )


def test_int32_indices_and_leading_dims(device: torch.device) -> None:
    W_dec, b_dec = make_decoder(3, 8, 32, torch.float64, device)
    values, indices = make_codes(6, 3, 32, 4, torch.float64, device)
    flat = sparse_decode((values, indices), W_dec, b_dec)
    nested = decode(
        (values.view(2, 3, 3, 4), indices.view(2, 3, 3, 4).int()), W_dec, b_dec, backend="gather"
    )
    assert nested.shape == (2, 3, 3, 8)
    torch.testing.assert_close(nested.view(6, 3, 8), flat, **TOLERANCES[torch.float64])


def test_accepts_named_codes_object(device: torch.device) -> None:
    class Codes:  # stands in for encoding.SparseCodes (attribute access, any field order)
        def __init__(self, values: Tensor, indices: Tensor) -> None:
            self.indices, self.values = indices, values

    W_dec, b_dec = make_decoder(3, 8, 32, torch.float64, device)
    values, indices = make_codes(5, 3, 32, 4, torch.float64, device)
    torch.testing.assert_close(
        sparse_decode(Codes(values, indices), W_dec, b_dec),
        dense_reference(values, indices, W_dec, b_dec),
    )


def test_dense_codes_input_matches_reference_and_grad(device: torch.device) -> None:
    W_dec, b_dec = make_decoder(4, 16, 64, torch.float64, device)
    values, indices = make_codes(6, 4, 64, 8, torch.float64, device)
    z = torch.zeros(6, 4, 64, dtype=torch.float64, device=device)
    z = z.scatter_add(-1, indices, values.detach()).requires_grad_()
    out = sparse_decode(z, W_dec, b_dec)
    expected = dense_reference(values.detach(), indices, W_dec, b_dec)
    torch.testing.assert_close(out, expected)
    # The dense decoder's d/dz at source s is grad_y[:, s:] . W_dec[s]; the sparse path
    # passes it on only where z is non-zero (documented: enough for TopK, not for JumpReLU).
    grad_out = torch.randn_like(out)
    (grad_z,) = torch.autograd.grad(out, z, grad_out)
    for source in range(4):
        dense_grad = torch.einsum("btd,ftd->bf", grad_out[:, source:], W_dec[source]).detach()
        want = torch.where(z[:, source] != 0, dense_grad, 0)
        torch.testing.assert_close(grad_z[:, source], want)


def test_dense_to_sparse_round_trip_and_padding() -> None:
    z = torch.zeros(3, 2, 10, dtype=torch.float64)
    z[0, 0, [1, 4, 7]] = torch.tensor([1.5, -2.0, 3.0], dtype=torch.float64)
    z[0, 1, 0] = -1.0  # an active index 0, which padding repeats
    z[1, 1, 9] = 0.5  # token 2 stays all zero
    values, indices = dense_to_sparse(z)
    assert values.shape == indices.shape == (3, 2, 3)
    assert indices.dtype == torch.int64
    rebuilt = torch.zeros_like(z).scatter_add(-1, indices, values)
    torch.testing.assert_close(rebuilt, z, rtol=0, atol=0)
    padded = values == 0
    assert padded.sum() == 3 * 2 * 3 - 5
    assert (indices[padded] == 0).all()


def test_dense_to_sparse_k_bounds() -> None:
    assert dense_to_sparse(torch.zeros(2, 5))[0].shape == (2, 1)
    values, _ = dense_to_sparse(torch.tensor([[0.0, 2.0, 0.0, -1.0]]), k=3)
    assert sorted(values.flatten().tolist()) == [-1.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="non-zeros but k=1"):
        dense_to_sparse(torch.tensor([[0.0, 2.0, 0.0, -1.0]]), k=1)
    with pytest.raises(ValueError, match="exceeds"):
        dense_to_sparse(torch.zeros(1, 4), k=5)


def test_bad_backend_and_shapes() -> None:
    W_dec, b_dec = make_decoder(2, 4, 8, torch.float32, torch.device("cpu"))
    values, indices = make_codes(4, 2, 8, 2, torch.float32, torch.device("cpu"))
    with pytest.raises(ConfigError, match="valid:.*embedding_bag"):
        sparse_decode((values, indices), W_dec, b_dec, backend="fast")
    with pytest.raises(ValueError, match=r"W_dec\[1\]"):
        sparse_decode((values, indices), [W_dec[0], W_dec[0]], b_dec)
    with pytest.raises(ValueError, match="L=2"):
        sparse_decode((values[:, :1], indices[:, :1]), W_dec, b_dec)


@pytest.mark.skipif(HAS_CUDA and HAS_TRITON, reason="checks the fallback without CUDA+triton")
def test_auto_never_picks_triton_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sd.FUSED_ENV_VAR, "1")
    weight = torch.zeros(2, 2)
    assert sd._resolve_backend("auto", weight) == "embedding_bag"
    with pytest.raises(ConfigError, match="triton"):
        sd._resolve_backend("triton", weight)


def test_auto_needs_env_var_for_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sd, "triton_available", lambda: True)
    cuda_like = torch.empty(0, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.delenv(sd.FUSED_ENV_VAR, raising=False)
    assert sd._resolve_backend("auto", cuda_like) == "embedding_bag"
    monkeypatch.setenv(sd.FUSED_ENV_VAR, "1")
    assert sd._resolve_backend("auto", cuda_like) == "triton"


class RecordShapes(TorchDispatchMode):
    """Records the shape of every dense (strided) tensor an aten op returns (the sparse
    code matrices of the weight gradients have the codes' size by design)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(item, Tensor) and item.layout == torch.strided:
                self.shapes.append(tuple(item.shape))
        return out


@pytest.mark.parametrize("backend", ["embedding_bag", "gather"])
def test_no_dense_codes_or_full_gather_are_built(backend: str) -> None:
    n_tokens, n_layers, d_model, n_latents, k = 7, 4, 16, 1000, 8
    W_dec, b_dec = make_decoder(n_layers, d_model, n_latents, torch.float32, torch.device("cpu"))
    values, indices = make_codes(
        n_tokens, n_layers, n_latents, k, torch.float32, torch.device("cpu")
    )
    with RecordShapes() as recorder:
        out = decode((values, indices), W_dec, b_dec, backend=backend, chunk_bytes=1)
        torch.autograd.grad(out, [values, *W_dec, b_dec], torch.ones_like(out))
    weight_like = {(n_latents, (n_layers - s) * d_model) for s in range(n_layers)}
    weight_like |= {(n_latents, n_layers - s, d_model) for s in range(n_layers)}
    for shape in recorder.shapes:
        numel = torch.Size(shape).numel()
        if shape in weight_like:
            continue  # the decoder's own (dense) gradient
        assert n_latents not in shape, f"dense code-sized tensor {shape}"
        assert numel < n_tokens * k * d_model, f"unchunked gather-sized tensor {shape}"


def test_paper_like_shape_smoke() -> None:
    # L and k as in the paper, expansion 16 at a reduced width (F = 16 d), a few tokens.
    n_layers, d_model, k = 12, 48, 128
    W_dec, b_dec = make_decoder(n_layers, d_model, 16 * d_model, torch.float32, torch.device("cpu"))
    values, indices = make_codes(4, n_layers, 16 * d_model, k, torch.float32, torch.device("cpu"))
    # fp32 sums of up to L * k = 1536 terms of size ~1, in a different order: atol 1e-4.
    assert_matches_reference(values, indices, W_dec, b_dec, tol={"rtol": 1e-5, "atol": 1e-4})


@pytest.mark.slow
def test_paper_shape_forward_and_values_grad() -> None:
    # Exact paper shape (W_dec is 2.9 GB in fp32): output and the codes' gradient.
    n_layers, d_model, n_latents, k = 12, 768, 12_288, 128
    W_dec = [torch.randn(n_latents, n_layers - s, d_model) for s in range(n_layers)]
    b_dec = torch.randn(n_layers, d_model)
    values, indices = make_codes(4, n_layers, n_latents, k, torch.float32, torch.device("cpu"))
    out = sparse_decode((values, indices), W_dec, b_dec)
    (grad_values,) = torch.autograd.grad(out, values, torch.ones_like(out))
    z = torch.zeros(4, n_layers, n_latents).scatter_add(-1, indices, values.detach())
    expected = b_dec.expand(4, n_layers, d_model).clone()
    for source in range(n_layers):
        table = W_dec[source].reshape(n_latents, -1)
        expected[:, source:] += (z[:, source] @ table).view(4, n_layers - source, d_model)
        # d out.sum() / d values[b, s, j] = sum of decoder row indices[b, s, j] over targets
        row_sums = table.sum(1)[indices[:, source]]
        torch.testing.assert_close(grad_values[:, source], row_sums, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3)


TRITON_INTERPRETER_SCRIPT = """
import torch, torch.nn.functional as F
from clt_lightning.models.triton_decode import BLOCK_D, TritonDecode

torch.manual_seed(0)
# (F, targets, d, tokens, k, dtype, index dtype): a table narrower than one block, one
# spanning a ragged second block, a single token with k = 1, float64 (accumulated in
# fp32 by the kernel) and int32 indices.
SHAPES = [
    (50, 2, 20, 5, 6, torch.float32, torch.int64),
    (64, 3, BLOCK_D // 2 + 1, 7, 8, torch.float32, torch.int64),
    (10, 1, 3, 1, 1, torch.float32, torch.int64),
    (40, 2, 30, 6, 5, torch.float64, torch.int32),
]
for n_latents, targets, d_model, n_tokens, k, dtype, index_dtype in SHAPES:
    weight = torch.randn(n_latents, targets, d_model, dtype=dtype, requires_grad=True)
    indices = torch.randint(0, n_latents, (n_tokens, k))
    values = torch.randn(n_tokens, k, dtype=dtype)
    if n_tokens > 3:
        indices[1] = indices[0]  # the same latents in two tokens
        indices[2, -1] = indices[2, 0]  # a latent twice in one token (summed)
        values[3] = 0.0  # a token whose latents are all zero
    indices = indices.to(index_dtype)
    values.requires_grad_(True)
    got = TritonDecode.apply(values, indices, weight, 2**20)
    table = weight.reshape(n_latents, -1)
    want = F.embedding_bag(indices, table, per_sample_weights=values, mode="sum")
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(got, want, **tol)
    grad_out = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, [values, weight], grad_out)
    want_grads = torch.autograd.grad(want, [values, weight], grad_out)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **tol)
print("ok", len(SHAPES))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package")
def test_triton_kernel_under_cpu_interpreter() -> None:
    """The Triton backend (kernel forward, embedding-bag backward) against
    `F.embedding_bag` in values and gradients, on CPU tensors under Triton's interpreter.

    No GPU here: ``TRITON_INTERPRET=1`` runs the kernel in numpy emulation, in a fresh
    process since the interpreter is chosen when the kernel is decorated."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", TRITON_INTERPRETER_SCRIPT],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "4"]


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_backend_matches_dense_reference(dtype: torch.dtype) -> None:
    device = torch.device("cuda")
    W_dec, b_dec = make_decoder(4, 16, 64, dtype, device)
    values, indices = make_codes(10, 4, 64, 8, dtype, device)
    tol = {"rtol": 1e-5, "atol": 1e-5}  # the kernel accumulates in fp32 even for fp64
    assert_matches_reference(values, indices, W_dec, b_dec, tol=tol, backend="triton")


# --------------------------------------------------------------------------- gradient recycling


def _decode_grad(values: Tensor, indices: Tensor, W_dec: list[Tensor], b_dec: Tensor) -> None:
    out = sparse_decode((values, indices), W_dec, b_dec)
    (out * _weights(*out.shape)).sum().backward()


def test_recycled_gradients_reuse_storage_and_stay_correct() -> None:
    W_dec, b_dec = make_decoder(3, 8, 50, torch.float64, torch.device("cpu"))
    values, indices = make_codes(6, 3, 50, 4, torch.float64, torch.device("cpu"))
    expected = grads(dense_reference(values, indices, W_dec, b_dec), W_dec, _weights(6, 3, 8))
    _decode_grad(values, indices, W_dec, b_dec)
    for w, g in zip(W_dec, expected, strict=True):
        torch.testing.assert_close(w.grad, g, **TOLERANCES[torch.float64])
    first = [w.grad.data_ptr() for w in W_dec]
    for w in W_dec:
        w.grad = None  # zero_grad(set_to_none=True)
    values2, indices2 = make_codes(6, 3, 50, 4, torch.float64, torch.device("cpu"))
    _decode_grad(values2, indices2, W_dec, b_dec)
    assert [w.grad.data_ptr() for w in W_dec] == first  # the same memory, zeroed and reused
    want = grads(dense_reference(values2, indices2, W_dec, b_dec), W_dec, _weights(6, 3, 8))
    for w, g in zip(W_dec, want, strict=True):
        torch.testing.assert_close(w.grad, g, **TOLERANCES[torch.float64])


def _weights(n_tokens: int, n_layers: int, d_model: int) -> Tensor:
    return torch.linspace(-1, 1, n_tokens * n_layers * d_model, dtype=torch.float64).view(
        n_tokens, n_layers, d_model
    )


def test_recycling_never_overwrites_a_gradient_still_in_use() -> None:
    W_dec, b_dec = make_decoder(3, 8, 50, torch.float64, torch.device("cpu"))
    v1, i1 = make_codes(6, 3, 50, 4, torch.float64, torch.device("cpu"))
    v2, i2 = make_codes(6, 3, 50, 4, torch.float64, torch.device("cpu"))
    g1 = grads(dense_reference(v1, i1, W_dec, b_dec), W_dec, _weights(6, 3, 8))
    g2 = grads(dense_reference(v2, i2, W_dec, b_dec), W_dec, _weights(6, 3, 8))
    tol = TOLERANCES[torch.float64]
    # A caller keeps last step's gradient: the next backward must not write into it.
    _decode_grad(v1, i1, W_dec, b_dec)
    kept = [w.grad for w in W_dec]
    for w in W_dec:
        w.grad = None
    _decode_grad(v2, i2, W_dec, b_dec)
    for k, w, a, b in zip(kept, W_dec, g1, g2, strict=True):
        torch.testing.assert_close(k, a, **tol)
        torch.testing.assert_close(w.grad, b, **tol)
    # Gradient accumulation (no zero_grad) and two decodes of the same weight in one graph.
    _decode_grad(v1, i1, W_dec, b_dec)
    for w, a, b in zip(W_dec, g1, g2, strict=True):
        torch.testing.assert_close(w.grad, a + b, **tol)
    for w in W_dec:
        w.grad = None
    out = sparse_decode((v1, i1), W_dec, b_dec) + sparse_decode((v2, i2), W_dec, b_dec)
    (out * _weights(6, 3, 8)).sum().backward()
    for w, a, b in zip(W_dec, g1, g2, strict=True):
        torch.testing.assert_close(w.grad, a + b, **tol)


def test_recycler_reserve_and_clear() -> None:
    recycler = GradientRecycler()
    weight = torch.zeros(4, 3)
    recycler.reserve([weight])
    assert recycler.nbytes() == weight.nbytes
    grad = recycler.zeros_like(weight)
    assert recycler.zeros_like(weight).data_ptr() != grad.data_ptr()  # in use: fresh
    del grad
    assert (recycler.zeros_like(weight) == 0).all()
    recycler.clear()
    assert recycler.nbytes() == 0


def test_recycler_fallback_hands_out_fresh_gradients() -> None:
    """The fallback when torch lacks the private storage count (the recycler's own
    switch): nothing is kept, every gradient is a fresh tensor."""
    assert storage_use_count_available()  # this torch has it; the default recycler uses it
    recycler = GradientRecycler(enabled=False)
    weight = torch.zeros(4, 3)
    recycler.reserve([weight])
    assert recycler.nbytes() == 0
    grad = recycler.zeros_like(weight)
    assert (grad == 0).all() and grad.shape == weight.shape
    assert recycler.empty_like(weight).shape == weight.shape
    assert recycler.nbytes() == 0


def test_decode_gradients_without_recycling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GRAD_RECYCLER, "enabled", False)
    GRAD_RECYCLER.clear()
    W_dec, b_dec = make_decoder(3, 8, 50, torch.float64, torch.device("cpu"))
    for _ in range(2):  # the second step would reuse buffers if recycling were on
        values, indices = make_codes(6, 3, 50, 4, torch.float64, torch.device("cpu"))
        want = grads(dense_reference(values, indices, W_dec, b_dec), W_dec, _weights(6, 3, 8))
        for w in W_dec:
            w.grad = None
        _decode_grad(values, indices, W_dec, b_dec)
        for w, g in zip(W_dec, want, strict=True):
            torch.testing.assert_close(w.grad, g, **TOLERANCES[torch.float64])
    assert GRAD_RECYCLER.nbytes() == 0


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_values_grad_with_repeated_latents_equals_naive_loop(index_dtype: torch.dtype) -> None:
    # The CPU values' gradient is computed latent by latent (sampled_addmm on the sorted
    # code matrix) and mapped back to the slots; repeated latents within a token (padding)
    # and across tokens must each get <grad_out[b], W_dec[s][i, :]> summed over targets.
    n_tokens, n_layers, d_model, n_latents, k = 5, 3, 4, 6, 4
    generator = torch.Generator().manual_seed(3)
    W_dec = [
        torch.randn(n_latents, n_layers - s, d_model, generator=generator, dtype=torch.float64)
        for s in range(n_layers)
    ]
    b_dec = torch.zeros(n_layers, d_model, dtype=torch.float64)
    indices = torch.randint(0, n_latents, (n_tokens, n_layers, k), generator=generator)
    indices[:, :, 1] = indices[:, :, 0]  # a latent twice in the same (token, source)
    indices[0, :, 2:] = 0  # padding-like repeats of latent 0
    values = torch.randn(n_tokens, n_layers, k, generator=generator, dtype=torch.float64)
    values.requires_grad_(True)
    grad_y = torch.randn(n_tokens, n_layers, d_model, generator=generator, dtype=torch.float64)
    out = sparse_decode((values, indices.to(index_dtype)), W_dec, b_dec)
    (grad_values,) = torch.autograd.grad(out, values, grad_y)
    expected = torch.zeros(n_tokens, n_layers, k, dtype=torch.float64)
    for b in range(n_tokens):
        for s in range(n_layers):
            for j in range(k):
                row = W_dec[s][int(indices[b, s, j])]  # [L - s, d]
                expected[b, s, j] = sum(
                    float(row[t] @ grad_y[b, s + t]) for t in range(n_layers - s)
                )
    torch.testing.assert_close(grad_values, expected, rtol=1e-12, atol=1e-12)


def test_second_backward_with_retained_graph_gives_the_same_gradients() -> None:
    # The CPU forward keeps its code matrix for the first backward only; a second
    # backward through the retained graph rebuilds it and must give the same gradients.
    n_tokens, n_layers, d_model, n_latents, k = 6, 3, 8, 40, 5
    W_dec, b_dec = make_decoder(n_layers, d_model, n_latents, torch.float64, torch.device("cpu"))
    values, indices = make_codes(
        n_tokens, n_layers, n_latents, k, torch.float64, torch.device("cpu")
    )
    out = sparse_decode((values, indices), W_dec, b_dec)
    inputs = [values, *W_dec]
    first = torch.autograd.grad(out, inputs, torch.ones_like(out), retain_graph=True)
    first = [g.clone() for g in first]
    second = torch.autograd.grad(out, inputs, torch.ones_like(out))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_slot_dot_kernel_and_public_fallback_match_a_gathered_reference(dtype) -> None:
    """The values gradient's per-slot dot products: ATen's private kernel (when torch has
    it) and the public `F.embedding_bag` autograd fallback, against an explicit gather."""
    from clt_lightning.models.embedding_bag_decode import PER_SAMPLE_WEIGHTS_BACKWARD, per_slot_dot

    g = torch.Generator().manual_seed(0)
    table = torch.randn(40, 12, generator=g).to(dtype)
    grad_out = torch.randn(7, 12, generator=g).to(dtype)
    indices = torch.randint(0, 40, (7, 5), generator=g)
    indices[0] = 3  # one latent in every slot of a token
    reference = (grad_out.double()[:, None, :] * table.double()[indices]).sum(-1).flatten()
    tolerance = (
        {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}
    )
    fallback = per_slot_dot(grad_out, table, indices, kernel=False)
    assert fallback.dtype == dtype and fallback.shape == (35,)
    torch.testing.assert_close(fallback.double(), reference, **tolerance)
    if PER_SAMPLE_WEIGHTS_BACKWARD is not None:
        torch.testing.assert_close(per_slot_dot(grad_out, table, indices), fallback)
