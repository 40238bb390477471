"""JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435; Gemma Scope, arXiv 2408.05147).

pi = W_enc x + b_enc, f = pi * H(pi - theta) with theta > 0 learned per latent, x_hat = f W_dec + b_dec.
L = R(x, x_hat) + lambda * sum_i H(pi_i - theta_i), lambda = state.sparsity_coef (steered by the trainer).
theta gets gradient through the rectangle-kernel straight-through estimators (sae_cli.kernels.jumprelu/step).
theta is a plain fp32 parameter, not log theta: with Adam, log theta barely moves and L0 never falls
(SAELens issues #494, #382, fixed in #718). The defaults assume the trainer passes unit-mean-squared-norm data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import kernels
from ..objective import reconstruction
from ..registry import register
from . import _common as C
from .base import SAE, LossOutput, SAEConfig, StepState

THETA_INIT_CHUNK = 4096  # rows of the normalisation sample per pre-activation block (theta_init_rule=target)


@register
class JumpReLUSAE(SAE):
    name = "jumprelu"
    steered = True
    # Free decoder norms, the L0 penalty unweighted (Gemma Scope): L0 does not depend on the decoder norms. On the
    # ground-truth test data (tests/test_ground_truth.py) the free decoder recovers the true features faster than
    # a unit-norm one (mean max cosine 0.964 against 0.916 after 800 steps); `unit_norm_decoder=True` restores
    # the projection + renormalisation (dictionary_learning's JumpReLU trainer).
    unit_norm_decoder = False
    adam_betas = (0.0, 0.999)
    """beta1 = 0, as Gemma Scope trains JumpReLU (arXiv 2408.05147, sec. 4.2)."""

    @dataclass(frozen=True)
    class Options:
        bandwidth: float = 0.001
        """epsilon of the rectangle kernel K(u) = 1[|u| < 1/2] (paper, on E||x||^2 = 1 data)."""
        theta_init: float = 0.001
        """Initial threshold of every latent (paper, on E||x||^2 = 1 data); see theta_init_rule."""
        theta_init_rule: str = "fixed"
        """"fixed": every threshold starts at theta_init; "target": each latent's threshold starts at the
        (1 - l0_target / d_sae) quantile of its pre-activations on the normalisation sample, so that the L0 starts
        near its target instead of near d_sae / 2 (never below theta_init)."""
        b_dec_init: str = "zero"
        """Decoder bias init from the first batch: "zero" (Gemma Scope), "mean" or "median"."""
        unit_norm_decoder: bool = False
        """Keep decoder rows at unit norm (gradient projection + renormalisation) instead of free norms."""
        aux_coef: float = 0.0
        """Weight of an AuxK term (TopK's, arXiv 2406.04093): the dead latents' k_aux largest ReLU pre-activations
        reconstruct the residual, which pulls their encoder rows back to where they fire. 0: off."""
        k_aux: int | None = None
        """Latents in the AuxK reconstruction; None = d_in // 2."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        C.check_choice("b_dec_init", self.opts.b_dec_init, ("median", "mean", "zero"))
        C.check_choice("theta_init_rule", self.opts.theta_init_rule, ("fixed", "target"))
        if self.opts.bandwidth <= 0 or self.opts.theta_init < 0 or self.opts.aux_coef < 0:
            raise ValueError("option bandwidth must be > 0, theta_init >= 0 and aux_coef >= 0")
        self.k_aux = self.opts.k_aux if self.opts.k_aux is not None else max(1, cfg.d_in // 2)
        self.unit_norm_decoder = self.opts.unit_norm_decoder  # instance override of the class default
        self.theta_F = nn.Parameter(
            torch.full((cfg.d_sae,), float(self.opts.theta_init), dtype=torch.float32)
        )

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        return x_BD @ self.W_enc_FD.T + self.b_enc_F

    def encode(self, x_BD: Tensor) -> Tensor:
        pre_BF = self.pre_acts(x_BD)
        return pre_BF * (pre_BF > self.theta_F)

    def training_loss(self, x_BD: Tensor, state: StepState) -> LossOutput:
        # f W_dec and L0 per token (fp32) in one pass; sparse after the encoder matmul at low L0 (kernels)
        x_hat_BD, l0_B, _, fired_F = kernels.threshold_encode_decode(
            x_BD, self.W_enc_FD, self.b_enc_F, self.theta_F, self.opts.bandwidth, self.W_dec_FD
        )
        x_hat_BD = x_hat_BD + self.b_dec_D
        recon = reconstruction(state, x_BD, x_hat_BD)
        l0_penalty = l0_B.mean()
        loss = recon.loss + state.sparsity_coef * l0_penalty
        parts = {**recon.parts, "sparsity": l0_penalty.detach()}
        if self.opts.aux_coef > 0:
            aux = C.aux_residual_loss(
                x_BD, self.W_enc_FD, self.b_enc_F, self.W_dec_FD, state.dead_F, x_BD - x_hat_BD, self.k_aux
            )
            loss = loss + self.opts.aux_coef * aux
            parts["aux"] = aux.detach()
        l0 = fired_F.sum().float() / x_BD.shape[0]
        return LossOutput(loss, x_hat_BD, parts, l0, fired_F)

    def firing_margin(self, x_BD: Tensor) -> Tensor:
        return self.pre_acts(x_BD) - self.theta_F

    @torch.no_grad()
    def shift_threshold(self, delta: float) -> None:
        # Lower (raise) every threshold by delta: the active values are unchanged. Thresholds stay >= 0, so a
        # latent already at 0 moves no further (the next step's trim measures what that left).
        self.theta_F.sub_(delta).clamp_(min=0.0)

    @torch.no_grad()
    def init_from_data(self, x_BD: Tensor) -> None:
        super().init_from_data(x_BD)
        C.init_b_dec(self.b_dec_D, x_BD, self.opts.b_dec_init)
        if self.opts.theta_init_rule == "target" and self.cfg.l0_target > 0:
            # the r-th largest pre-activation of each latent, r = N * l0_target / d_sae (the top quantile)
            # over row chunks, so that memory is (r + chunk) x d_sae, never the whole sample's N x d_sae
            r = max(1, min(len(x_BD), round(len(x_BD) * self.cfg.l0_target / self.cfg.d_sae)))
            top_RF = None
            for x_CD in x_BD.split(THETA_INIT_CHUNK):
                pre_CF = self.pre_acts(x_CD.float())
                both = pre_CF if top_RF is None else torch.cat([top_RF, pre_CF])
                top_RF = both.topk(min(r, len(both)), dim=0).values
            self.theta_F.copy_(top_RF[-1].clamp(min=self.opts.theta_init))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        # theta < 0 would let negative pre-activations through; theta = 0 is exactly ReLU.
        self.theta_F.clamp_(min=0.0)
