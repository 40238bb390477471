"""The three sparse products of a TopK SAE (see `triton_topk`) in stock PyTorch ops, for CPU tensors.

    gather_combine  y[b]      = sum_j v[b, j] * W[idx[b, j]]     F.embedding_bag(mode="sum", per_sample_weights)
    row_dots        out[b, j] = W[idx[b, j]] . g[b]              the per_sample_weights gradient of that bag
    scatter_rows    G[f]      = sum_{idx[b, j] = f} v[b, j] X[b]  sort by latent, then one bag per latent over X

Why these forms (a one-off wall-clock comparison on the loaded 2-core CPU, batch 4096, d_in 576, d_sae 16384 /
65536, k 64 / 256): the weight gradient as one bag per latent took 152 / 582 ms against 260 / 1303 ms for
embedding_bag's own weight gradient, and index_add_ of per-pair products (which materialises [B*k, D]) was
slower still (2.7 s at d_sae 16384, k 64); the vals gradient through embedding_bag's per_sample_weights backward
took 361 ms (forward included; the bare aten op 231 ms) against 1.9-2.9 s for gathering [B, k, D] rows and
reducing them (d_sae 16384, k 64). scripts/bench_kernels.py times the whole paths (docs/benchmarks.md,
"Kernels"). The same functions work on any device; the dispatch uses them for CPU tensors only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gather_combine(
    idx_BK: Tensor, vals_BK: Tensor, W_FD: Tensor, out_dtype: torch.dtype | None = None
) -> Tensor:
    """y[b] = sum_j vals[b, j] * W[idx[b, j]]: [B, D] in `out_dtype` (default W's)."""
    dtype = torch.promote_types(vals_BK.dtype, W_FD.dtype)
    out_BD = F.embedding_bag(idx_BK, W_FD.to(dtype), mode="sum", per_sample_weights=vals_BK.to(dtype))
    return out_BD.to(out_dtype or W_FD.dtype)


def row_dots(idx_BK: Tensor, W_FD: Tensor, g_BD: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """out[b, j] = W[idx[b, j]] . g[b]: [B, K] in `out_dtype` (default g's).

    The public route to embedding_bag's fused per_sample_weights backward (one dot per (b, j), no [B, k, D]
    intermediate): differentiate a bag with unit weights with respect to those weights. The extra forward costs
    about an eighth of the total (43 of 361 ms at d_sae 16384, k 64, measured once)."""
    dtype = torch.promote_types(g_BD.dtype, W_FD.dtype)
    with torch.enable_grad():
        ones_BK = torch.ones(idx_BK.shape, dtype=dtype, device=g_BD.device, requires_grad=True)
        bag_BD = F.embedding_bag(idx_BK, W_FD.detach().to(dtype), mode="sum", per_sample_weights=ones_BK)
        (out_BK,) = torch.autograd.grad(bag_BD, ones_BK, g_BD.to(dtype))
    return out_BK.to(out_dtype or g_BD.dtype)


def scatter_rows(
    idx_BK: Tensor, vals_BK: Tensor, X_BD: Tensor, n_rows: int, out_dtype: torch.dtype, with_sum: bool
) -> tuple[Tensor, Tensor | None]:
    """G[f] = sum over (b, j) with idx[b, j] = f of vals[b, j] * X[b] ([n_rows, D]) and, when `with_sum`,
    s[f] = sum of those vals ([n_rows]); both in `out_dtype`. Duplicate latents across tokens are summed."""
    K = idx_BK.shape[1]
    flat_idx = idx_BK.reshape(-1)
    dtype = torch.promote_types(vals_BK.dtype, X_BD.dtype)
    flat_vals = vals_BK.reshape(-1).to(dtype)
    # A stable sort keeps each latent's segment in token order: deterministic sums.
    sorted_idx, perm = flat_idx.sort(stable=True)
    offsets_F = torch.searchsorted(
        sorted_idx, torch.arange(n_rows, device=idx_BK.device, dtype=sorted_idx.dtype)
    )
    G_FD = F.embedding_bag(
        perm // K, X_BD.to(dtype), offsets_F, mode="sum", per_sample_weights=flat_vals[perm]
    ).to(out_dtype)
    s_F = None
    if with_sum:
        s_F = torch.zeros(n_rows, dtype=torch.float32, device=X_BD.device)
        s_F = s_F.index_add_(0, flat_idx, flat_vals.float()).to(out_dtype)
    return G_FD, s_F
