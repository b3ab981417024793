"""Where a latent writes: its cross-layer write profile, mean contribution, direct effect.

For source layer s, latent i and target l >= s (raw space, o_l = output_scale[l]):

    write_norm[s, i, l]   = ||W_dec[s][i, l - s]|| / o_l          (0 for l < s)
    write_share[s, i, l]  = write_norm[s, i, l] / sum_l' write_norm[s, i, l']
    contribution[s, i, l] = mean over tokens t of
                            <z_t,s,i W_dec[s][i, l - s] / o_l, y_hat_t[l]> / ||y_hat_t[l]||^2

`contribution` is the contribution score of docs/metrics.md restricted to one latent:
summed over the latents of layer s it is the token mean of p_t[s, l] (tokens with
y_hat_t[l] = 0 are left out, as there). The direct effect on the zero-shot classes is the
latent's raw decoder vector into the last layer, v = W_dec[s][i, L-1-s] / o_{L-1}, taken
through the rest of the network as a first-order change of the image embedding:

    e(v) = ((ls_2(v) - mean(ls_2(v))) * ln_post.weight / sigma_bar) @ proj
    direct_effect[s, i, c] = <e(v), t_c>                                 (t_c unit-norm)

with sigma_bar the mean over the pass's images of the standard deviation ln_post divides
by (of the pooled token, or of every pooled token when ln_post precedes pooling). This is
ln_post linearised at the mean scale: the change of the scale itself (a term along the
image's own direction) and the final L2 normalisation are ignored, and only the pooled
position is considered, so it reads "one unit of activation at the pooled token pushes
class c by this much", not a measured logit change.
"""

from __future__ import annotations

import torch
from torch import Tensor

PAIR_CHUNK = 4096
"""Active (token, latent) pairs handled at once by `LatentContributions.update`."""


@torch.no_grad()
def write_profile(clt: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """Raw-space decoder norms per target and their shares.

    Args:
        clt: A CrossLayerTranscoder (W_dec[s] is [F, L - s, d]; output_scale [L]).

    Returns:
        (write_norm [L, F, L], write_share [L, F, L]) float32; entry (s, i, l) is zero for
        l < s, and a share row is all zero for a latent whose decoder is zero.
    """
    n_layers, n_latents = clt.n_layers, clt.n_latents
    norm = torch.zeros(n_layers, n_latents, n_layers)
    scale = clt.output_scale.detach().float().cpu()
    for s, w_dec in enumerate(clt.W_dec):
        norm[s, :, s:] = torch.linalg.vector_norm(w_dec.detach().float().cpu(), dim=-1) / scale[s:]
    total = norm.sum(-1, keepdim=True)
    share = torch.where(total > 0, norm / total.clamp_min(1e-30), torch.zeros_like(norm))
    return norm, share


def write_distance(share: Tensor) -> Tensor:
    """Mean number of layers ahead a latent writes: sum_l share[s, i, l] * (l - s).

    Args:
        share: write_share [L, F, L].

    Returns:
        [L, F] float32 (0 = writes only to its own layer).
    """
    n_layers = share.shape[0]
    ahead = torch.arange(n_layers)[None, :] - torch.arange(n_layers)[:, None]  # [s, l]
    return (share * ahead.clamp_min(0)[:, None, :].float()).sum(-1)


def active_pairs(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(token [P], latent [P], value [P]) of the stored entries of a CSR matrix z [B, F]."""
    rows = z.crow_indices()
    token = torch.repeat_interleave(torch.arange(z.shape[0], device=rows.device), rows.diff())
    return token, z.col_indices(), z.values()


class LatentContributions:
    """Streaming per-latent contribution scores (see the module docstring).

    Args:
        clt: The CrossLayerTranscoder (sums kept on its device, in float64).
    """

    def __init__(self, clt: torch.nn.Module) -> None:
        self.clt = clt
        n_layers, n_latents = clt.n_layers, clt.n_latents
        on = {"dtype": torch.float64, "device": clt.W_enc.device}
        self.sums = [torch.zeros(n_latents, n_layers - s, **on) for s in range(n_layers)]
        self.n_tokens = torch.zeros(n_layers, dtype=torch.int64, device=clt.W_enc.device)

    @torch.no_grad()
    def update(self, zs: list[Tensor]) -> None:
        """Add a chunk of tokens.

        Args:
            zs: Per source layer, activations z_s [B, F] of the same B tokens, as sparse
                CSR tensors (`z.to_sparse_csr()`) so a batch of every layer stays small.
        """
        clt = self.clt
        scale = clt.output_scale.float()
        y_hat = clt.b_dec.float()[None].repeat(zs[0].shape[0], 1, 1)  # scaled [B, L, d]
        for s, z in enumerate(zs):
            w = clt.W_dec[s].float().reshape(clt.n_latents, -1)
            y_hat[:, s:] += torch.sparse.mm(z, w).reshape(z.shape[0], clt.n_layers - s, clt.d_model)
        y_hat = y_hat / scale[:, None]  # raw
        norm2 = y_hat.double().pow(2).sum(-1)  # [B, L]
        valid = norm2 > 0
        self.n_tokens += valid.sum(0)
        u = torch.where(valid[..., None], y_hat.double() / norm2.clamp_min(1e-300)[..., None], 0.0)
        u = (u / scale.double()[:, None]).float()  # folds 1/o_l of the contribution into u
        for s, z in enumerate(zs):
            token, latent, value = active_pairs(z)
            for start in range(0, len(token), PAIR_CHUNK):
                part = slice(start, start + PAIR_CHUNK)
                rows = clt.W_dec[s].float()[latent[part]]  # [P, L - s, d]
                dots = (rows * u[token[part], s:]).sum(-1)  # [P, L - s]
                self.sums[s].index_add_(0, latent[part], (dots * value[part, None]).double())

    def compute(self) -> Tensor:
        """[L, F, L] float64 mean contribution (0 for l < s; NaN where no token counted)."""
        n_layers, n_latents = self.clt.n_layers, self.clt.n_latents
        out = torch.zeros(n_layers, n_latents, n_layers, dtype=torch.float64)
        for s, total in enumerate(self.sums):
            out[s, :, s:] = total.cpu() / self.n_tokens[s:].cpu().double()
        return out


def ln_post_scale(teacher: torch.nn.Module, h: Tensor) -> Tensor:
    """Per pooled vector, the standard deviation ln_post divides by.

    Args:
        teacher: The Teacher (reads `visual.ln_post`, `pool_type`, `final_ln_after_pool`).
        h: Final residual [N, T, d].

    Returns:
        [M] float64: sqrt(var + eps) of each vector ln_post normalises into the embedding
        (the [CLS] token, the mean of the patches, or every patch token).
    """
    visual = teacher.visual
    h = h.double()
    if visual.pool_type == "tok":
        vectors = h[:, 0]
    elif visual.final_ln_after_pool:
        vectors = h[:, 1:].mean(1)
    else:
        vectors = h[:, 1:].reshape(-1, h.shape[-1])
    return torch.sqrt(vectors.var(-1, unbiased=False) + visual.ln_post.eps)


@torch.no_grad()
def direct_effect(
    teacher: torch.nn.Module, clt: torch.nn.Module, classifier: Tensor, sigma_bar: float
) -> Tensor:
    """Every latent's first-order push on the zero-shot classes (module docstring).

    Args:
        teacher: The Teacher the CLT was trained on.
        clt: The CrossLayerTranscoder.
        classifier: [E, C] unit-norm class text embeddings (`zeroshot.build_classifier`).
        sigma_bar: Mean ln_post scale over the pass (`ln_post_scale(...).mean()`).

    Returns:
        [L, F, C] float32: change of <image embedding, t_c> per unit of activation.
    """
    visual = teacher.visual
    last = clt.n_layers - 1
    block = visual.transformer.resblocks[last]
    weight = visual.ln_post.weight.detach().float().cpu()
    gamma = getattr(block.ls_2, "gamma", None)
    gamma = None if gamma is None else gamma.detach().float().cpu()
    proj = None if visual.proj is None else visual.proj.detach().float().cpu()
    out = []
    for s, w_dec in enumerate(clt.W_dec):
        v = w_dec[:, last - s].detach().float().cpu() / float(clt.output_scale[last])  # [F, d]
        if gamma is not None:  # open_clip's LayerScale multiplies by gamma (else Identity)
            v = v * gamma
        v = (v - v.mean(-1, keepdim=True)) * weight / sigma_bar
        e = v @ proj if proj is not None else v
        out.append(e @ classifier.float())
    return torch.stack(out)
