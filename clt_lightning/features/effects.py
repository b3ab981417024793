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

import warnings

import torch
from torch import Tensor


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


class LatentContributions:
    """Streaming per-latent contribution scores (see the module docstring).

    Per chunk of tokens, `clt(x)` gives z and y_hat (the CLT's own forward, so its own
    sparse decoding); then, per source s, one sparse product gathers
    M_s = z_s^T u [F, (L - s) d] with u_t[l] = y_hat_t[l] / (o_l ||y_hat_t[l]||^2), and the
    contributions are <W_dec[s][i, l - s], M_s[i, l]>: the decoder is read once per chunk,
    not once per firing.

    Args:
        clt: The CrossLayerTranscoder (eval mode; sums kept on its device, in float64).
        chunk_tokens: Tokens per forward (memory ~ chunk x L x F floats).
    """

    def __init__(self, clt: torch.nn.Module, chunk_tokens: int = 1024) -> None:
        self.clt, self.chunk_tokens = clt, chunk_tokens
        n_layers, n_latents = clt.n_layers, clt.n_latents
        on = {"dtype": torch.float64, "device": clt.W_enc.device}
        self.sums = [torch.zeros(n_latents, n_layers - s, **on) for s in range(n_layers)]
        self.n_tokens = torch.zeros(n_layers, dtype=torch.int64, device=clt.W_enc.device)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add tokens.

        Args:
            x: Raw MLP inputs [B, L, d] of B tokens (teacher-forced).
        """
        clt = self.clt
        scale = clt.output_scale.double()
        for part in x.split(self.chunk_tokens):
            out = clt(part.to(clt.W_enc.dtype))
            y_hat = out.y_hat.double()  # raw [b, L, d]
            norm2 = y_hat.pow(2).sum(-1)  # [b, L]
            valid = norm2 > 0
            self.n_tokens += valid.sum(0)
            u = torch.where(valid[..., None], y_hat / norm2.clamp_min(1e-300)[..., None], 0.0)
            u = (u / scale[:, None]).float()  # folds 1/o_l of the contribution into u
            for s, w_dec in enumerate(clt.W_dec):
                z_t = _csr(out.encoding.z[:, s].float().T.contiguous())  # [F, b]
                m = torch.sparse.mm(z_t, u[:, s:].reshape(part.shape[0], -1))  # [F, (L-s) d]
                dots = (m.reshape(w_dec.shape) * w_dec.float()).sum(-1)  # [F, L - s]
                self.sums[s] += dots.double()

    def compute(self) -> Tensor:
        """[L, F, L] float64 mean contribution (0 for l < s; NaN where no token counted)."""
        n_layers, n_latents = self.clt.n_layers, self.clt.n_latents
        out = torch.zeros(n_layers, n_latents, n_layers, dtype=torch.float64)
        for s, total in enumerate(self.sums):
            out[s, :, s:] = total.cpu() / self.n_tokens[s:].cpu().double()
        return out


def _csr(z: Tensor) -> Tensor:
    """z as a sparse CSR tensor (torch warns that CSR is beta; it is used as documented)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return z.to_sparse_csr()


def ln_post_scale(teacher: torch.nn.Module, h: Tensor) -> Tensor:
    """Per pooled vector, the standard deviation ln_post divides by.

    Args:
        teacher: The Teacher of an open_clip ViT (reads its tower's `ln_post`, `pool_type`,
            `final_ln_after_pool`).
        h: Final residual [N, T, d].

    Returns:
        [M] float64: sqrt(var + eps) of each vector ln_post normalises into the embedding
        (the [CLS] token, the mean of the patches, or every patch token).
    """
    visual = teacher.backbone.visual
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
    visual = teacher.backbone.visual
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
