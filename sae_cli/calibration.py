"""Order statistics pooled over every calibration token: the end-of-run threshold calibration (`SAE.calibrate`).

A threshold set to the pooled quantile of N tokens lands the inference L0 on its target over those N tokens. The
mean over batches of each batch's own cut-off does not: the L0 is not linear in the threshold, so the mean of the
per-batch cut-offs fires more latents than the target (+0.4 to +1.1 % on pystdlib's calibration tokens, batch
1024), and more so for a per-latent rule, which averages order statistics of a handful of tokens (Feature Choice,
about k*B/d_sae = 7 picks per latent and batch: +5.5 %; docs/variants.md, "Running inference thresholds")."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from . import kernels


@torch.no_grad()
def pooled_top(blocks: Iterable[Tensor], n: int, per_column: bool = False) -> Tensor | None:
    """The n largest entries over every block, in descending order: of all entries (`per_column` False: a 1-D
    result) or of each column (`per_column`: [n, F], the blocks [B_i, F]). Streams: memory is n entries (per
    column) plus one block. Fewer than n when the blocks hold fewer; None when there is no block.

    All entries: once n are held, a block's entries below the n-th largest so far cannot enter and are dropped
    before the selection, which runs over `kernels.flat_topk`'s sampled candidates (width 4608, 4 blocks of 4096
    tokens, n = 524,288, one loaded core: 0.8 s, against 5.4 s for a plain topk over each block plus the held n)."""
    top: Tensor | None = None
    for block in blocks:
        block = block.detach().float()
        if per_column:
            both = block if top is None else torch.cat([top, block])
            top = both.topk(min(n, both.shape[0]), dim=0).values
            continue
        v = block.flatten()
        if top is not None and top.numel() >= n:
            v = v[v >= top.min()]
        both = v if top is None else torch.cat([top, v])
        row_len = block.shape[-1] if top is None and block.dim() > 1 else 1
        top = kernels.flat_topk(both, n, row_len)[0] if both.numel() > n else both
    if top is None or per_column:
        return top
    return top.sort(descending=True).values


def value_at_rank(top: Tensor, rank: float, past_end: float | None = 0.0) -> Tensor | None:
    """The value at 1-based `rank` of descending values `top` (along dim 0), linear between neighbouring ranks
    (rank n + 1/2: midway between the n-th and (n+1)-th largest). Ranks past the end read `past_end`; None (no
    value) when `past_end` is None and the rank needs an entry past the end."""
    i = max(1, math.floor(rank))
    if i > top.shape[0]:
        return None if past_end is None else torch.full_like(top[0], past_end)
    upper = top[i - 1]
    if rank == i:
        return upper
    if i < top.shape[0]:
        lower = top[i]
    elif past_end is None:
        return None
    else:
        lower = torch.full_like(upper, past_end)
    return upper + (rank - i) * (lower - upper)
