"""Dense CPU training passes of the threshold rules (JumpReLU, ReLU) and the Gated rule when too many latents fire
for the sparse path (`sparse_latents`): JumpReLU starts at theta = 0.001 with about half of its latents active,
ReLU and the gates of a Gated SAE too.

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


class GatedDense(torch.autograd.Function):
    """Gated SAE (arXiv 2404.16014, weight tying) on all of [B, F] from proj = x_in W^T: returns
    (f, ReLU(pi_gate), fired count per latent [F] int64) with pi_gate = proj + b_gate, pi_mag = exp(r_mag) proj +
    b_mag, f = 1[pi_gate > 0] ReLU(pi_mag). Two masks (gate open; f > 0) are all the backward needs besides proj:
    dL/dproj = dL/dReLU(gate) 1[open] + dL/df 1[f > 0] exp(r_mag), and the per-latent sums of the same terms for
    b_gate, r_mag and b_mag. Same outputs and gradients as `kernels._gated_dense`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, proj_BF: Tensor, b_gate_F: Tensor, r_mag_F: Tensor, b_mag_F: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        scale_F = r_mag_F.exp()
        gate_BF = proj_BF + b_gate_F
        open_BF = gate_BF > 0
        mag_BF = torch.addcmul(b_mag_F, proj_BF, scale_F)
        on_BF = open_BF & (mag_BF > 0)
        acts_BF = mag_BF.mul_(on_BF)
        gate_pos_BF = gate_BF.mul_(open_BF)  # ReLU(gate): open exactly where gate > 0
        fired_F = on_BF.view(torch.uint8).sum(0, dtype=torch.int32).long()
        ctx.save_for_backward(proj_BF, open_BF, on_BF, scale_F)
        ctx.mark_non_differentiable(fired_F)
        return acts_BF, gate_pos_BF, fired_F

    @staticmethod
    def backward(ctx, grad_f_BF: Tensor | None, grad_gate_BF: Tensor | None, _grad_fired: None):  # type: ignore[override]
        proj_BF, open_BF, on_BF, scale_F = ctx.saved_tensors
        g_gate = grad_gate_BF * open_BF if grad_gate_BF is not None else torch.zeros_like(proj_BF)
        g_mag = grad_f_BF * on_BF if grad_f_BF is not None else torch.zeros_like(proj_BF)
        grad_proj = torch.addcmul(g_gate, g_mag, scale_F) if ctx.needs_input_grad[0] else None
        grad_b_gate = g_gate.sum(0) if ctx.needs_input_grad[1] else None
        grad_r = (g_mag * proj_BF).sum(0) * scale_F if ctx.needs_input_grad[2] else None
        grad_b_mag = g_mag.sum(0) if ctx.needs_input_grad[3] else None
        return grad_proj, grad_b_gate, grad_r, grad_b_mag
