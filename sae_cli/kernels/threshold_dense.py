"""Dense CPU training pass of the threshold rules (JumpReLU, ReLU) when too many latents fire for the sparse path
(`sparse_latents`): JumpReLU starts at theta = 0.001 with about half of its latents active, ReLU too.

The eager reference (`kernels.reference._JumpReLU` and `_Step`) makes about twenty passes over the [B, F]
pre-activations per step (the mask twice, bool-to-float copies, the rectangle kernel over every entry, a zero
[B, F] gradient for the step function); on a 2-core CPU they cost as much as the five matmuls of the step. Here
one autograd node gives f = pre * 1[pre > theta] and L0 per token from one mask, and its backward needs one pass
for the pre gradient: theta's straight-through terms live only on the pairs in the rectangle window
|pre - theta| < eps / 2, which are few, so they are found once in the forward (two compares) and kept as a short
COO list. Same outputs and gradients as the reference (tests/test_kernels_sparse_latents.py).
"""

from __future__ import annotations

import torch
from torch import Tensor


class ThresholdDense(torch.autograd.Function):
    """(f [B, F], l0 [B] fp32, active [B, F] bool) of f = pre * 1[pre > theta] (theta_F None: pre > 0, ReLU, l0
    not differentiable). Gradients: pre gets grad_f * active; theta the rectangle-kernel terms
    -(theta / eps) K(.) grad_f - (1 / eps) K(.) grad_l0 summed over the window pairs of each latent."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, pre_BF: Tensor, theta_F: Tensor | None, bandwidth: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        active_BF = pre_BF > (0.0 if theta_F is None else theta_F)
        acts_BF = pre_BF * active_BF
        l0_B = active_BF.view(torch.uint8).sum(-1, dtype=torch.int32).float()  # exact; faster than a bool sum
        ctx.has_theta = theta_F is not None
        ctx.bandwidth = bandwidth
        if theta_F is None:
            ctx.save_for_backward(active_BF)
            ctx.mark_non_differentiable(l0_B, active_BF)
            return acts_BF, l0_B, active_BF
        # The window with a margin of eps / 2 against rounding (two compares); the backward keeps the pairs that
        # pass the reference's own expression.
        lo_F, hi_F = theta_F - bandwidth, theta_F + bandwidth
        rows_N, cols_N = ((pre_BF > lo_F) & (pre_BF < hi_F)).nonzero(as_tuple=True)
        ctx.save_for_backward(active_BF, theta_F, rows_N, cols_N, pre_BF[rows_N, cols_N])
        ctx.mark_non_differentiable(active_BF)
        return acts_BF, l0_B, active_BF

    @staticmethod
    def backward(ctx, grad_f_BF: Tensor | None, grad_l0_B: Tensor | None, _grad_active: None):  # type: ignore[override]
        active_BF, *rest = ctx.saved_tensors
        grad_pre = grad_f_BF * active_BF if grad_f_BF is not None and ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.has_theta and ctx.needs_input_grad[1]:
            theta_F, rows_N, cols_N, pre_N = rest
            eps = ctx.bandwidth
            theta_N = theta_F[cols_N]
            win_N = ((pre_N - theta_N) / eps).abs() < 0.5
            per_N = torch.zeros_like(pre_N)
            if grad_f_BF is not None:
                per_N = per_N - (theta_N / eps) * grad_f_BF[rows_N, cols_N]
            if grad_l0_B is not None:
                per_N = per_N - grad_l0_B[rows_N] / eps
            per_N = torch.where(win_N, per_N, torch.zeros_like(per_N))
            grad_theta = torch.zeros_like(theta_F, dtype=torch.float32).index_add_(0, cols_N, per_N.float())
            grad_theta = grad_theta.to(theta_F.dtype)
        return grad_pre, grad_theta, None
