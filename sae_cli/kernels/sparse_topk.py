"""Autograd Functions of the sparse TopK decoder and encoder, written once over a backend of three sparse products.

A backend is a module with `gather_combine`, `row_dots` and `scatter_rows` (`triton_topk` on CUDA, `cpu_sparse` on
CPU). The math, per token b with k selected latents idx[b] and weights v[b]:

    decode   y[b] = sum_j v[b, j] W_dec[idx[b, j]]
             dL/dv[b, j]   = W_dec[idx[b, j]] . dL/dy[b]                           row_dots
             dL/dW_dec[f]  = sum_{idx[b, j] = f} v[b, j] dL/dy[b]                   scatter_rows
    encode   (v, idx) = TopK_k(ReLU(x W_enc^T + b_enc)), with g = dL/dv * 1[v > 0] (ReLU):
             dL/dx[b]      = sum_j g[b, j] W_enc[idx[b, j]]                         gather_combine
             dL/dW_enc[f]  = sum_{idx[b, j] = f} g[b, j] x[b];  dL/db_enc[f] = sum g  scatter_rows

The encoder's forward is the dense matmul + topk of the reference (the selection needs every pre-activation), but
nothing of size [B, F] is saved for backward and the backward touches only the selected latents.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor


class SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx_BK: Tensor, vals_BK: Tensor, W_dec_FD: Tensor, ops: ModuleType) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(idx_BK, vals_BK, W_dec_FD)
        ctx.ops = ops
        out_dtype = torch.promote_types(vals_BK.dtype, W_dec_FD.dtype)
        return ops.gather_combine(idx_BK, vals_BK, W_dec_FD, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad_BD: Tensor):  # type: ignore[override]
        idx_BK, vals_BK, W_dec_FD = ctx.saved_tensors
        grad_vals = grad_W = None
        if ctx.needs_input_grad[1]:
            grad_vals = ctx.ops.row_dots(idx_BK, W_dec_FD, grad_BD, out_dtype=vals_BK.dtype)
        if ctx.needs_input_grad[2]:
            grad_W, _ = ctx.ops.scatter_rows(
                idx_BK, vals_BK, grad_BD, W_dec_FD.shape[0], W_dec_FD.dtype, with_sum=False
            )
        return None, grad_vals, grad_W, None


class SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD: Tensor, W_enc_FD: Tensor, b_enc_F: Tensor, k: int, ops: ModuleType):  # type: ignore[override]
        # The same expression as topk_encode_ref, so that both select the same latents bit for bit.
        pre_BF = torch.relu(x_BD @ W_enc_FD.T + b_enc_F)
        vals_BK, idx_BK = pre_BF.topk(k, dim=-1, sorted=False)
        del pre_BF
        ctx.save_for_backward(x_BD, W_enc_FD, idx_BK, vals_BK)
        ctx.ops = ops
        ctx.b_dtype = b_enc_F.dtype
        ctx.mark_non_differentiable(idx_BK)
        return vals_BK, idx_BK

    @staticmethod
    def backward(ctx, grad_vals_BK: Tensor, _grad_idx):  # type: ignore[override]
        x_BD, W_enc_FD, idx_BK, vals_BK = ctx.saved_tensors
        # ReLU passes gradient only where its output is positive (torch's threshold_backward does the same).
        g_BK = grad_vals_BK * (vals_BK > 0)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.ops.gather_combine(idx_BK, g_BK, W_enc_FD, out_dtype=x_BD.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_W, grad_b = ctx.ops.scatter_rows(
                idx_BK, g_BK, x_BD, W_enc_FD.shape[0], W_enc_FD.dtype, with_sum=ctx.needs_input_grad[2]
            )
            grad_W = grad_W if ctx.needs_input_grad[1] else None
            grad_b = grad_b.to(ctx.b_dtype) if grad_b is not None else None
        return grad_x, grad_W, grad_b, None, None


def sparse_topk_decode(idx_BK: Tensor, vals_BK: Tensor, W_dec_FD: Tensor, ops: ModuleType) -> Tensor:
    return SparseDecode.apply(idx_BK, vals_BK, W_dec_FD, ops)


def sparse_topk_encode(
    x_BD: Tensor, W_enc_FD: Tensor, b_enc_F: Tensor, k: int, ops: ModuleType
) -> tuple[Tensor, Tensor]:
    return SparseEncode.apply(x_BD, W_enc_FD, b_enc_F, k, ops)
