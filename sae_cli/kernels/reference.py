"""Eager PyTorch references for every fused kernel. The fast paths must match these (tests/test_kernels*.py)."""

from __future__ import annotations

import torch
from torch import Tensor


def topk_encode_ref(x_BD: Tensor, W_enc_FD: Tensor, b_enc_F: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """ReLU(TopK(x W_enc^T + b_enc)): returns (values [B, k], indices [B, k]). Differentiable in all inputs."""
    pre_BF = torch.relu(x_BD @ W_enc_FD.T + b_enc_F)
    vals_BK, idx_BK = pre_BF.topk(k, dim=-1, sorted=False)
    return vals_BK, idx_BK


def topk_decode_ref(idx_BK: Tensor, vals_BK: Tensor, W_dec_FD: Tensor) -> Tensor:
    """x_hat[b] = sum_j vals[b, j] * W_dec[idx[b, j]] (no bias). Differentiable in vals and W_dec."""
    return (vals_BK.unsqueeze(-1) * W_dec_FD[idx_BK]).sum(dim=1)


def _rectangle(u: Tensor) -> Tensor:
    # K(u) = 1[|u| < 1/2], the JumpReLU paper's straight-through kernel (arXiv 2407.14435, eq. 11-12).
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.bandwidth = bandwidth
        return pre_BF * (pre_BF > theta_F)

    @staticmethod
    def backward(ctx, grad_BF: Tensor):  # type: ignore[override]
        pre_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_BF * (pre_BF > theta_F)
        # d f / d theta = -(theta / eps) K((pre - theta) / eps)
        grad_theta = (-(theta_F / eps) * _rectangle((pre_BF - theta_F) / eps) * grad_BF).sum(0)
        return grad_pre, grad_theta.to(theta_F.dtype), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.bandwidth = bandwidth
        return (pre_BF > theta_F).to(pre_BF.dtype)

    @staticmethod
    def backward(ctx, grad_BF: Tensor):  # type: ignore[override]
        pre_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        # d H / d theta = -(1 / eps) K((pre - theta) / eps); no gradient to pre (paper's pseudo-code).
        grad_theta = (-(1.0 / eps) * _rectangle((pre_BF - theta_F) / eps) * grad_BF).sum(0)
        return torch.zeros_like(pre_BF), grad_theta.to(theta_F.dtype), None


def jumprelu_ref(pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    """f = pre * H(pre - theta) with the straight-through gradient to theta."""
    return _JumpReLU.apply(pre_BF, theta_F, bandwidth)


def step_ref(pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    """H(pre - theta) with the straight-through gradient to theta (for the L0 penalty)."""
    return _Step.apply(pre_BF, theta_F, bandwidth)


def jumprelu_encode_ref(
    x_BD: Tensor, W_enc_FD: Tensor, b_enc_F: Tensor, theta_F: Tensor, bandwidth: float
) -> tuple[Tensor, Tensor]:
    """(f, L0 per token): f = jumprelu(x W_enc^T + b_enc), L0 = sum_F step(...) in fp32 (a bf16 sum is not exact
    beyond 256). Both carry the straight-through gradient to theta; f also to x, W_enc and b_enc."""
    pre_BF = x_BD @ W_enc_FD.T + b_enc_F
    return jumprelu_ref(pre_BF, theta_F, bandwidth), step_ref(pre_BF, theta_F, bandwidth).sum(
        -1, dtype=torch.float32
    )


def topk_decode_dense(idx_BK: Tensor, vals_BK: Tensor, W_dec_FD: Tensor) -> Tensor:
    """topk_decode_ref as a dense product: scatter the codes into [B, F] and multiply by W_dec (sums duplicate
    indices like the reference). Faster than gathering when k / d_sae is large (docs/benchmarks.md, "Kernels")."""
    dtype = torch.promote_types(vals_BK.dtype, W_dec_FD.dtype)
    acts_BF = vals_BK.new_zeros(vals_BK.shape[0], W_dec_FD.shape[0], dtype=dtype)
    return acts_BF.scatter_add(1, idx_BK, vals_BK.to(dtype)) @ W_dec_FD.to(dtype)
