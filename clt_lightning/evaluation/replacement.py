"""Replacement mechanics: the teacher with its MLPs replaced by the CLT from layer s on.

"Replace s -> L-1 for tokens M" (docs/metrics.md, "Cascaded replacement"): run the frozen teacher; at every layer
l >= s the MLP output of the tokens in M is replaced by the CLT's y_hat_l, whose inputs
x_i (i <= l) are read from the run being modified; other tokens keep their true MLP
output. Token modes are those of `token_modes` (the token groups the model has, or explicit
positions). `cascade` sweeps the starts and modes and counts zero-shot accuracy.

Design decisions:

- The clean prefix is computed once per image batch and shared by every start and mode:
  the residual h entering each layer, the clean codes z_l of the union of the modes'
  tokens, and the teacher-forced reconstruction y_hat_l of those tokens. The run for start
  s then continues from the clean residual at layer s. Up to and including layer s's MLP
  input the modified run *is* the clean run (same input, same ops), so x_s, z_s and y_hat_s
  are the clean ones and are reused; new codes are computed from layer s+1 on. Per start
  that saves s+1 blocks, s+1 encodes and one decode against recomputing from layer 0 (the
  naive way, `run_replaced`, kept as the reference and for single windows).
- Only the tokens in M are encoded and decoded (for "cls" that is 1 of T tokens).
- `OracleCLT` has the CLT's interface but returns the teacher's own MLP output; with it
  every window and mode must reproduce the teacher exactly (the tests check this).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clt_lightning.errors import CheckpointMismatchError, ConfigError
from clt_lightning.evaluation.token_modes import (
    TokenSpec,
    indexer,
    mode_positions,
    relative_index,
)
from clt_lightning.tokens import layout_of

# ---------------------------------------------------------------------- checks


def check_compatible(teacher: Any, clt: Any) -> None:
    """Raise unless the CLT's shape fits the teacher.

    Args:
        teacher: Object with `n_layers` and `d_model`.
        clt: Object with `n_layers` and `d_model`.

    Raises:
        CheckpointMismatchError: Naming both (n_layers, d_model) pairs.
    """
    clt_shape = (int(clt.n_layers), int(clt.d_model))
    teacher_shape = (int(teacher.n_layers), int(teacher.d_model))
    if clt_shape != teacher_shape:
        raise CheckpointMismatchError(
            f"the CLT has n_layers={clt_shape[0]}, d_model={clt_shape[1]} but the teacher has "
            f"n_layers={teacher_shape[0]}, d_model={teacher_shape[1]}; use a CLT trained on "
            "this teacher"
        )


def _check_window(start: int, stop: int, n_layers: int) -> None:
    if not 0 <= start <= stop <= n_layers:
        raise ConfigError(
            f"replacement window needs 0 <= start <= stop <= {n_layers}, got start={start}, "
            f"stop={stop}"
        )


def clt_dtype(clt: Any) -> torch.dtype:
    """The dtype the CLT computes in (its `dtype` attribute, else its first parameter's)."""
    dtype = getattr(clt, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    params = getattr(clt, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.dtype if first is not None else torch.float32


# ---------------------------------------------------------------------- the override


class Replacer:
    """MLP override replacing tokens `index` by the CLT's reconstruction on a window.

    Codes of the replaced tokens are collected as the run goes, so the decoder of layer l
    reads z_0..z_l of the run being modified. Codes of layers before the run's first block
    (and optionally the reconstruction at the window's first layer) come from the clean
    prefix.

    Args:
        clt: Object with `encode_layer(layer, x)` and `decode_target(target, zs)`.
        index: Token indexer (slice or int64 positions) into the T axis.
        start: First replaced layer s.
        stop: One past the last replaced layer.
        codes: Codes z_0.. already known (clean prefix), each [N, T_M, F]; copied.
        first_y_hat: The reconstruction at layer `start` if already known, [N, T_M, d].
    """

    def __init__(
        self,
        clt: Any,
        index: slice | Tensor,
        start: int,
        stop: int,
        codes: Sequence[Tensor] = (),
        first_y_hat: Tensor | None = None,
    ) -> None:
        self.clt, self.index, self.start, self.stop = clt, index, start, stop
        self.codes = list(codes)
        self.first_y_hat = first_y_hat
        self.dtype = clt_dtype(clt)

    def __call__(self, layer: int, x: Tensor, y: Tensor) -> Tensor:
        """The MLP output to use at `layer` (x, y [N, T, d]); see `MLPOverride`."""
        if layer >= self.stop:
            return y
        if layer == self.start and self.first_y_hat is not None:
            y_hat = self.first_y_hat
        else:
            if len(self.codes) == layer:
                self.codes.append(self.clt.encode_layer(layer, x[:, self.index].to(self.dtype)))
            if layer < self.start:
                return y
            y_hat = self.clt.decode_target(layer, self.codes[: layer + 1])
        y = y.clone()
        y[:, self.index] = y_hat.to(y.dtype)
        return y


# ---------------------------------------------------------------------- single window


@torch.no_grad()
def run_replaced(
    teacher: Any,
    clt: Any,
    images: Tensor,
    start: int,
    stop: int | None = None,
    mode: TokenSpec = "cls",
) -> Tensor:
    """Image embeddings with layers start..stop-1 replaced for the tokens of `mode`.

    The straightforward way: one run from layer 0, encoding every layer's tokens on the
    way. `cascade` gives the same numbers for many starts at a fraction of the cost.

    Args:
        teacher: Teacher (embed, run_blocks, head, n_layers, tokens_per_image).
        clt: CLT (encode_layer, decode_target, n_layers, d_model).
        images: [N, 3, H, W] preprocessed images.
        start: First replaced layer s (start == stop replaces nothing).
        stop: One past the last replaced layer (default L).
        mode: Token mode or explicit positions (empty replaces nothing).

    Returns:
        [N, E] image embeddings (not normalised), float32.
    """
    check_compatible(teacher, clt)
    stop = teacher.n_layers if stop is None else stop
    _check_window(start, stop, teacher.n_layers)
    h = teacher.embed(images)
    positions = mode_positions(mode, layout_of(teacher))
    if start == stop or positions.numel() == 0:
        return teacher.head(teacher.run_blocks(h).h).float()
    replacer = Replacer(clt, indexer(positions), start, stop)
    return teacher.head(teacher.run_blocks(h, override=replacer).h).float()


# ---------------------------------------------------------------------- shared clean prefix


@dataclass
class CleanPrefix:
    """The clean run of one image batch, shared by every start and mode.

    Attributes:
        h: L + 1 residuals [N, T, d]; h[l] enters block l, h[L] leaves the last block.
        codes: L clean codes of the union tokens, [N, T_U, F].
        y_hat: L teacher-forced reconstructions of the union tokens, [N, T_U, d].
        positions: int64 [T_U] token positions of the union.
        x: L MLP inputs of every token [N, T, d] (`record_all=True`), else None.
        y: L MLP outputs of every token [N, T, d] (`record_all=True`), else None.
    """

    h: list[Tensor]
    codes: list[Tensor]
    y_hat: list[Tensor]
    positions: Tensor
    x: list[Tensor] | None = None
    y: list[Tensor] | None = None


@torch.no_grad()
def clean_prefix(
    teacher: Any,
    clt: Any,
    images: Tensor,
    positions: Tensor,
    n_code_layers: int | None = None,
    record_all: bool = False,
) -> CleanPrefix:
    """Run the clean teacher once, keeping what every replacement start needs.

    Args:
        teacher: Teacher.
        clt: CLT.
        images: [N, 3, H, W] preprocessed images.
        positions: int64 [T_U] token positions to encode (the union of the modes').
        n_code_layers: Encode and decode only layers below this (default: all L).
        record_all: Also keep every layer's MLP input and output for every token (what
            `Teacher.capture` returns), so other metrics need no second teacher run.

    Returns:
        The `CleanPrefix` (`codes` and `y_hat` hold `n_code_layers` entries).
    """
    dtype, index = clt_dtype(clt), indexer(positions)
    n_code_layers = teacher.n_layers if n_code_layers is None else n_code_layers
    h = teacher.embed(images)
    hs, codes, y_hats = [h], [], []
    xs: list[Tensor] | None = [] if record_all else None
    ys: list[Tensor] | None = [] if record_all else None
    for layer in range(teacher.n_layers):
        record = record_all or layer < n_code_layers
        out = teacher.run_blocks(h, layer, layer + 1, record=record)
        if layer < n_code_layers and positions.numel():
            codes.append(clt.encode_layer(layer, out.x[0][:, index].to(dtype)))
            y_hats.append(clt.decode_target(layer, codes))
        if record_all:
            xs.append(out.x[0])
            ys.append(out.y[0])
        h = out.h
        hs.append(h)
    return CleanPrefix(hs, codes, y_hats, positions, xs, ys)


class IncrementalReplacer:
    """Replacement override for CLTs with an affine decoder, decoding only what changed.

    For start s, y_hat_l of the modified run differs from the clean teacher-forced
    reconstruction only through the codes that changed (layers s+1..l), and the decoder
    is affine (`y_hat_l = (b_dec[l] + sum_i z_i W_dec[i->l]) / output_scale[l]`), so

        y_hat_l = y_hat_l^clean + sum_{i=s+1}^{l} (z_i - z_i^clean) W_dec[i->l] / output_scale[l].

    Each new code is decoded once into every later target (one matmul per source), which
    costs (l - s) decoder blocks per target instead of l + 1.

    Args:
        clt: A CLT with `encode_layer`, `W_dec` (W_dec[s]: [F, L - s, d]) and
            `output_scale` [L], as `CrossLayerTranscoder`.
        index: Token indexer into the T axis.
        start: First replaced layer s (the window runs to L-1).
        clean_codes: L clean codes of the replaced tokens, [N, T_M, F].
        clean_y_hat: L clean reconstructions of the replaced tokens, [N, T_M, d].
    """

    def __init__(
        self,
        clt: Any,
        index: slice | Tensor,
        start: int,
        clean_codes: Sequence[Tensor],
        clean_y_hat: Sequence[Tensor],
    ) -> None:
        self.clt, self.index, self.start = clt, index, start
        self.clean_codes, self.clean_y_hat = clean_codes, clean_y_hat
        self.delta: Tensor | None = None  # scaled-space change [N, T_M, L, d]
        self.dtype = clt_dtype(clt)

    def _add_source(self, layer: int, x: Tensor) -> None:
        z = self.clt.encode_layer(layer, x[:, self.index].to(self.dtype))
        w_dec = self.clt.W_dec[layer]  # [F, L - layer, d]
        term = decode_rows(z - self.clean_codes[layer], w_dec.reshape(w_dec.shape[0], -1))
        term = term.unflatten(-1, tuple(w_dec.shape[1:]))  # [N, T_M, L - layer, d]
        if self.delta is None:
            n_layers = self.clt.n_layers
            self.delta = term.new_zeros(*term.shape[:2], n_layers, term.shape[-1])
        self.delta[:, :, layer:] += term

    def __call__(self, layer: int, x: Tensor, y: Tensor) -> Tensor:
        """The MLP output to use at `layer` (x, y [N, T, d]); see `MLPOverride`."""
        if layer < self.start:
            return y
        y_hat = self.clean_y_hat[layer]
        if layer > self.start:
            self._add_source(layer, x)
            y_hat = y_hat + self.delta[:, :, layer] / self.clt.output_scale[layer]
        y = y.clone()
        y[:, self.index] = y_hat.to(y.dtype)
        return y


SPARSE_RATIO = 8
"""`decode_rows` gathers rows when nnz * SPARSE_RATIO <= the dense matmul's row count."""


def decode_rows(codes: Tensor, table: Tensor) -> Tensor:
    """`codes @ table`, gathering only the table rows of non-zero codes when that is cheaper.

    A code difference z - z_clean of TopK codes has at most 2k non-zeros of F, so a
    weighted row gather (`F.embedding_bag`) does 2k/F of the dense matmul's work.

    Args:
        codes: [..., F] mostly-zero codes.
        table: [F, D] decoder rows.

    Returns:
        [..., D] in the table's dtype.
    """
    flat = codes.reshape(-1, codes.shape[-1]).to(table.dtype)
    rows, cols = torch.nonzero(flat, as_tuple=True)  # row-major: rows ascending
    if cols.numel() * SPARSE_RATIO > flat.numel():
        out = flat @ table
    else:
        counts = torch.bincount(rows, minlength=flat.shape[0])
        offsets = torch.cumsum(counts, 0) - counts
        weights = flat[rows, cols]
        out = F.embedding_bag(cols, table, offsets, mode="sum", per_sample_weights=weights)
    return out.reshape(*codes.shape[:-1], table.shape[-1])


def has_affine_decoder(clt: Any) -> bool:
    """Whether the CLT exposes the documented affine decoder (W_dec, b_dec, output_scale)."""
    return all(hasattr(clt, name) for name in ("W_dec", "b_dec", "output_scale"))


@torch.no_grad()
def replaced_from_prefix(
    teacher: Any,
    clt: Any,
    prefix: CleanPrefix,
    start: int,
    positions: Tensor,
    incremental: bool | None = None,
) -> Tensor:
    """Embeddings for window start..L-1 on `positions`, continuing a clean prefix.

    Args:
        teacher: Teacher.
        clt: CLT.
        prefix: The batch's clean prefix (its union must contain `positions`).
        start: First replaced layer s (L replaces nothing).
        positions: int64 [T_M] replaced token positions.
        incremental: Decode only the change in codes (`IncrementalReplacer`); None uses
            it whenever the CLT has an affine decoder (`has_affine_decoder`).

    Returns:
        [N, E] image embeddings, float32.
    """
    n_layers = teacher.n_layers
    if start >= n_layers or positions.numel() == 0:
        return teacher.head(prefix.h[n_layers]).float()
    rel = relative_index(prefix.positions, positions)
    index = indexer(positions)
    if incremental is None:
        incremental = has_affine_decoder(clt)
    if incremental:
        codes = [z[:, rel] for z in prefix.codes]
        y_hats = [y[:, rel] for y in prefix.y_hat]
        override: Any = IncrementalReplacer(clt, index, start, codes, y_hats)
    else:
        codes = [z[:, rel] for z in prefix.codes[: start + 1]]
        first = prefix.y_hat[start][:, rel]
        override = Replacer(clt, index, start, n_layers, codes=codes, first_y_hat=first)
    return teacher.head(teacher.run_blocks(prefix.h[start], start, override=override).h).float()


# ---------------------------------------------------------------------- oracle


class OracleCLT:
    """A CLT stand-in that returns the teacher's true MLP output (for tests).

    `encode_layer` stashes x itself as the "code" (z_l := x_l, so F = d) and
    `decode_target` applies the teacher's MLP to it (after LN2 when the teacher reads x at
    "ln2_in"). Replacing with it must reproduce the teacher for every window and mode.

    Args:
        teacher: The teacher whose MLPs to return.
    """

    def __init__(self, teacher: Any) -> None:
        self.teacher = teacher
        self.n_layers = int(teacher.n_layers)
        self.d_model = int(teacher.d_model)
        self.n_latents = self.d_model
        self.dtype = teacher.dtype

    def encode_layer(self, layer: int, x: Tensor) -> Tensor:
        """The code of layer `layer` is its input, unchanged: [..., d] -> [..., d]."""
        return x

    def decode_target(self, target: int, z: Sequence[Tensor]) -> Tensor:
        """The teacher's MLP output at `target` for the stashed input z[target]."""
        return self.teacher.mlp_output(target, z[target])
