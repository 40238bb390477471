"""Triton kernels for the three sparse products of a TopK SAE (CUDA; the tests run them under TRITON_INTERPRET=1).

A TopK code is a pair (idx_BK, vals_BK): token b uses the k latents idx[b] with weights vals[b]. The forward and
backward passes of the sparse decoder and of the TopK encoder need only three products over the rows of a
[F, D] weight matrix (encoder and decoder rows are a latent's directions, docs/architecture.md):

    gather_combine  y[b]      = sum_j v[b, j] * W[idx[b, j]]            decoder forward; encoder grad wrt x
    row_dots        out[b, j] = W[idx[b, j]] . g[b]                     decoder grad wrt vals
    scatter_rows    G[f]      = sum_{(b, j): idx[b, j] = f} v[b, j] * X[b]
                    s[f]      = sum_{(b, j): idx[b, j] = f} v[b, j]     decoder grad wrt W_dec; encoder grad
                                                                        wrt W_enc and b_enc

Each touches k rows per token instead of all F (OpenAI's sparse kernels, arXiv 2406.04093 appendix; EleutherAI
sparsify). `scatter_rows` sorts the (token, slot) pairs by latent and reduces each latent's segment in one program,
so it needs no atomics, is deterministic, and sums duplicate latents across tokens; programs of untouched latents
write the zero rows that a dense gradient needs anyway. Every kernel accumulates in fp32 and stores in the output
dtype. This module imports triton at import time: only `sae_cli.kernels` dispatch imports it, and only for CUDA
tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _gather_combine_kernel(
    idx_ptr,  # [B, K] int
    vals_ptr,  # [B, K]
    w_ptr,  # [F, D], row stride stride_wf, unit column stride
    out_ptr,  # [B, D] contiguous
    K,
    D,
    stride_wf,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc_D = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rows_K = tl.load(idx_ptr + b * K + offs_k, mask=mask_k, other=0).to(tl.int64)
        v_K = tl.load(vals_ptr + b * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w_KD = tl.load(
            w_ptr + rows_K[:, None] * stride_wf + offs_d[None, :],
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc_D += tl.sum(w_KD * v_K[:, None], axis=0)
    tl.store(out_ptr + b * D + offs_d, acc_D.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _row_dots_kernel(
    idx_ptr,  # [B, K] int
    w_ptr,  # [F, D]
    g_ptr,  # [B, D] contiguous
    out_ptr,  # [B, K] contiguous
    K,
    D,
    stride_wf,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    rows_K = tl.load(idx_ptr + b * K + offs_k, mask=mask_k, other=0).to(tl.int64)
    acc_K = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        g_D = tl.load(g_ptr + b * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        w_KD = tl.load(
            w_ptr + rows_K[:, None] * stride_wf + offs_d[None, :],
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc_K += tl.sum(w_KD * g_D[None, :], axis=1)
    tl.store(out_ptr + b * K + offs_k, acc_K.to(out_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def _scatter_rows_kernel(
    starts_ptr,  # [F + 1] int64: latent f owns sorted positions [starts[f], starts[f + 1])
    perm_ptr,  # [B * K] int64: sorted position -> flat (token, slot) position
    vals_ptr,  # [B * K] contiguous
    x_ptr,  # [B, D] contiguous
    out_ptr,  # [F, D] contiguous
    sum_ptr,  # [F] (written only when WITH_SUM)
    K,
    D,
    WITH_SUM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    f = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(starts_ptr + f)
    stop = tl.load(starts_ptr + f + 1)
    acc_D = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_S = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(start, stop, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < stop
        flat_S = tl.load(perm_ptr + offs_s, mask=mask_s, other=0)
        v_S = tl.load(vals_ptr + flat_S, mask=mask_s, other=0.0).to(tl.float32)
        tok_S = flat_S // K
        x_SD = tl.load(
            x_ptr + tok_S[:, None] * D + offs_d[None, :],
            mask=mask_s[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc_D += tl.sum(x_SD * v_S[:, None], axis=0)
        acc_S += v_S
    tl.store(out_ptr + f * D + offs_d, acc_D.to(out_ptr.dtype.element_ty), mask=mask_d)
    if WITH_SUM:
        if pid_d == 0:
            tl.store(sum_ptr + f, tl.sum(acc_S, axis=0).to(sum_ptr.dtype.element_ty))


def _blocks(n: int, cap: int) -> int:
    """The smallest power of two >= n (at least 16, the smallest tl.arange/tl.dot friendly size), at most cap."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _unit_cols(W_FD: Tensor) -> Tensor:
    return W_FD if W_FD.stride(1) == 1 else W_FD.contiguous()


def gather_combine(
    idx_BK: Tensor, vals_BK: Tensor, W_FD: Tensor, out_dtype: torch.dtype | None = None
) -> Tensor:
    """y[b] = sum_j vals[b, j] * W[idx[b, j]]: [B, D] in `out_dtype` (default W's), accumulated in fp32."""
    idx_BK, vals_BK, W_FD = idx_BK.contiguous(), vals_BK.contiguous(), _unit_cols(W_FD)
    (B, K), D = idx_BK.shape, W_FD.shape[1]
    out_BD = torch.empty(B, D, dtype=out_dtype or W_FD.dtype, device=W_FD.device)
    if B == 0 or D == 0:
        return out_BD
    block_d = _blocks(D, 256)
    grid = (B, triton.cdiv(D, block_d))
    _gather_combine_kernel[grid](
        idx_BK, vals_BK, W_FD, out_BD, K, D, W_FD.stride(0), BLOCK_K=_blocks(K, 32), BLOCK_D=block_d
    )
    return out_BD


def row_dots(idx_BK: Tensor, W_FD: Tensor, g_BD: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """out[b, j] = W[idx[b, j]] . g[b]: [B, K] in `out_dtype` (default g's), accumulated in fp32."""
    idx_BK, W_FD, g_BD = idx_BK.contiguous(), _unit_cols(W_FD), g_BD.contiguous()
    (B, K), D = idx_BK.shape, W_FD.shape[1]
    out_BK = torch.empty(B, K, dtype=out_dtype or g_BD.dtype, device=g_BD.device)
    if B == 0 or K == 0:
        return out_BK
    block_k = _blocks(K, 64)
    grid = (B, triton.cdiv(K, block_k))
    _row_dots_kernel[grid](
        idx_BK, W_FD, g_BD, out_BK, K, D, W_FD.stride(0), BLOCK_K=block_k, BLOCK_D=_blocks(D, 128)
    )
    return out_BK


def scatter_rows(
    idx_BK: Tensor, vals_BK: Tensor, X_BD: Tensor, n_rows: int, out_dtype: torch.dtype, with_sum: bool
) -> tuple[Tensor, Tensor | None]:
    """G[f] = sum over (b, j) with idx[b, j] = f of vals[b, j] * X[b] ([n_rows, D], dense, zero rows for untouched
    latents) and, when `with_sum`, s[f] = sum of those vals ([n_rows]); both in `out_dtype`, accumulated in fp32."""
    idx_BK, vals_BK, X_BD = idx_BK.contiguous(), vals_BK.contiguous(), X_BD.contiguous()
    K, D = idx_BK.shape[1], X_BD.shape[1]
    G_FD = torch.empty(n_rows, D, dtype=out_dtype, device=X_BD.device)
    s_F = torch.empty(n_rows, dtype=out_dtype, device=X_BD.device) if with_sum else None
    if n_rows == 0:
        return G_FD, s_F
    # Segments by latent: a stable sort keeps each segment in token order, so the fp32 sums are reproducible.
    sorted_idx, perm = idx_BK.reshape(-1).sort(stable=True)
    starts = torch.searchsorted(
        sorted_idx, torch.arange(n_rows + 1, device=idx_BK.device, dtype=sorted_idx.dtype)
    )
    block_d = _blocks(D, 256)
    grid = (n_rows, triton.cdiv(D, block_d))
    _scatter_rows_kernel[grid](
        starts,
        perm,
        vals_BK,
        X_BD,
        G_FD,
        s_F if s_F is not None else G_FD,  # unused pointer when not WITH_SUM
        K,
        D,
        WITH_SUM=with_sum,
        BLOCK_S=16,
        BLOCK_D=block_d,
    )
    return G_FD, s_F
