"""Equal-shape sweep members as one batched computation: parameters stacked to [M, F, D], the encoder as one
`torch.baddbmm`, the decoder as one `bmm` (JumpReLU) or one `embedding_bag` over the stacked rows (TopK).

Not used by the trainer on CPU: scripts/bench_sweep.py measured the loop over members as fast as the batched step
on the 2-core CPU (a matmul of [4096, 576] x [576, 4608] already keeps both cores busy, so stacking two saves
only the per-op overhead, and the batched TopK step cannot use the per-member sparse encoder backward of
sae_cli/kernels); numbers in docs/benchmarks.md, "Sweeps". On a GPU, where one small-member step is launch-bound,
a trainer hook would run each `sweep.shape_groups` group through these functions: Adam is elementwise, so one
Adam over the stacked tensors equals one Adam per member.

The losses match the variants' `training_loss` (sae_cli/variants/topk.py with decoder_norm="unit", jumprelu.py)
member by member (only gradient normalisation / clipping needs per-member norms);
tests/test_sweep_batched.py checks losses and gradients against the loop.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .variants import _common as C
from .variants.base import SAE


class GroupLoss(NamedTuple):
    loss: Tensor
    """Scalar: the sum of the members' losses (their parameters are disjoint, so one backward serves all)."""
    loss_M: Tensor
    """Detached per-member losses."""
    x_hat_MBD: Tensor
    l0_M: Tensor
    """Detached mean active latents per token, per member."""
    fired_MF: Tensor
    """Detached: tokens each latent fired on, per member."""


def stack_params(saes: list[SAE]) -> dict[str, Tensor]:
    """Leaf tensors [M, ...] (requires_grad) holding copies of each parameter of equal-shape members."""
    names = [n for n, _ in saes[0].named_parameters()]
    shapes = {tuple(p.shape for _, p in s.named_parameters()) for s in saes}
    if len(shapes) != 1:
        raise ValueError("members of one group must have parameters of equal shapes")
    return {
        n: torch.stack([dict(s.named_parameters())[n].detach() for s in saes]).clone().requires_grad_(True)
        for n in names
    }


def topk_group_loss(
    p: dict[str, Tensor],
    x_BD: Tensor,
    ks: list[int],
    dead_MF: Tensor | None = None,
    k_aux: int = 0,
    aux_coef: float = 1 / 32,
) -> GroupLoss:
    """TopK members that differ only in k: one top-k_max over [M, B, F], masked to each member's k."""
    W_enc_MFD, b_enc_MF, W_dec_MFD, b_dec_MD = p["W_enc_FD"], p["b_enc_F"], p["W_dec_FD"], p["b_dec_D"]
    M, Fn, D = W_enc_MFD.shape
    x_in_MBD = x_BD.unsqueeze(0) - b_dec_MD.unsqueeze(1)
    pre_MBF = torch.relu(torch.baddbmm(b_enc_MF.unsqueeze(1), x_in_MBD, W_enc_MFD.transpose(1, 2)))
    k_max = max(ks)
    vals_MBK, idx_MBK = pre_MBF.topk(k_max, dim=-1, sorted=True)  # sorted: a member's k are the first k
    keep_MK = torch.arange(k_max, device=x_BD.device) < torch.tensor(ks, device=x_BD.device).unsqueeze(1)
    vals_MBK = vals_MBK * keep_MK.unsqueeze(1)
    B = x_BD.shape[0]
    # One sparse decode for every member: member m's latent f is row m * F + f of the stacked decoder.
    flat_idx = (idx_MBK + (torch.arange(M, device=x_BD.device) * Fn).view(M, 1, 1)).view(M * B, k_max)
    x_hat_MBD = F.embedding_bag(
        flat_idx, W_dec_MFD.reshape(M * Fn, D), mode="sum", per_sample_weights=vals_MBK.reshape(M * B, k_max)
    ).view(M, B, D) + b_dec_MD.unsqueeze(1)
    mse_M = (x_hat_MBD - x_BD).pow(2).sum(-1).mean(-1)
    aux_M = torch.stack(
        [
            C.aux_residual_loss(
                x_in_MBD[m], W_enc_MFD[m], b_enc_MF[m], W_dec_MFD[m],
                None if dead_MF is None else dead_MF[m], x_BD - x_hat_MBD[m], k_aux,
            )
            for m in range(M)
        ]
    )  # fmt: skip
    loss_M = mse_M + aux_coef * aux_M
    fired_MBK = vals_MBK > 0
    fired_MF = torch.zeros(M, Fn, dtype=torch.int64, device=x_BD.device)
    fired_MF.view(-1).index_add_(0, flat_idx.view(-1), fired_MBK.view(-1).long())
    l0_M = fired_MBK.sum(-1).float().mean(-1)
    return GroupLoss(loss_M.sum(), loss_M.detach(), x_hat_MBD, l0_M.detach(), fired_MF.detach())


def _rectangle(u: Tensor) -> Tensor:
    # K(u) = 1[|u| < 1/2], the JumpReLU paper's straight-through kernel (arXiv 2407.14435, eq. 11-12).
    return (u.abs() < 0.5).to(u.dtype)


class _GroupJumpReLU(torch.autograd.Function):
    """f = pre * H(pre - theta) over [M, B, F] with theta [M, F]; theta's gradient summed over tokens only."""

    @staticmethod
    def forward(ctx, pre_MBF: Tensor, theta_MF: Tensor, bandwidth: float, step: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre_MBF, theta_MF)
        ctx.bandwidth, ctx.step = bandwidth, step
        mask = pre_MBF > theta_MF.unsqueeze(1)
        return mask.to(pre_MBF.dtype) if step else pre_MBF * mask

    @staticmethod
    def backward(ctx, grad_MBF: Tensor):  # type: ignore[override]
        pre_MBF, theta_MF = ctx.saved_tensors
        eps, theta_M1F = ctx.bandwidth, theta_MF.unsqueeze(1)
        kernel = _rectangle((pre_MBF - theta_M1F) / eps) * grad_MBF
        if ctx.step:  # dH/dtheta = -(1/eps) K(.), no gradient to pre (the paper's pseudo-code)
            return torch.zeros_like(pre_MBF), (-(1.0 / eps) * kernel).sum(1), None, None
        grad_theta = (-(theta_M1F / eps) * kernel).sum(1)
        return grad_MBF * (pre_MBF > theta_M1F), grad_theta, None, None


def jumprelu_group_loss(
    p: dict[str, Tensor], x_BD: Tensor, coefs_M: Tensor, bandwidth: float = 0.001
) -> GroupLoss:
    """JumpReLU members that differ only in their L0 target (so in lambda): one baddbmm, one bmm."""
    W_enc_MFD, b_enc_MF, W_dec_MFD, b_dec_MD = p["W_enc_FD"], p["b_enc_F"], p["W_dec_FD"], p["b_dec_D"]
    theta_MF = p["theta_F"]
    M = W_enc_MFD.shape[0]
    pre_MBF = torch.baddbmm(b_enc_MF.unsqueeze(1), x_BD.expand(M, -1, -1), W_enc_MFD.transpose(1, 2))
    acts_MBF = _GroupJumpReLU.apply(pre_MBF, theta_MF, bandwidth, False)
    x_hat_MBD = torch.baddbmm(b_dec_MD.unsqueeze(1), acts_MBF, W_dec_MFD)
    mse_M = (x_hat_MBD - x_BD).pow(2).sum(-1).mean(-1)
    l0_pen_M = _GroupJumpReLU.apply(pre_MBF, theta_MF, bandwidth, True).sum(-1).mean(-1)
    loss_M = mse_M + coefs_M.to(mse_M.dtype) * l0_pen_M
    fired_MF = (acts_MBF != 0).sum(1)
    l0_M = fired_MF.sum(-1).float() / x_BD.shape[0]
    return GroupLoss(loss_M.sum(), loss_M.detach(), x_hat_MBD, l0_M.detach(), fired_MF.detach())
