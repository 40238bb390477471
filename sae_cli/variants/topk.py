"""TopK SAE (Gao et al. 2024, arXiv 2406.04093): each token keeps its k largest pre-activations.

f = ReLU(TopK_k(W_enc (x - b_dec) + b_enc)), x_hat = f W_dec + b_dec, k = round(l0_target).
L = R(x, x_hat) + aux_coef * AuxK, AuxK reconstructing the residual from the dead latents only.
Decoder norms (option `decoder_norm`): "unit" keeps the rows at unit norm (gradient projection, base hooks);
"free" leaves them free and uses the rows' directions: with n_i = ||W_dec_i||, pre_i = n_i (W_enc_i (x - b_dec) +
b_enc_i) and x_hat = sum_i f_i W_dec_i / n_i (SAELens's `rescale_acts_by_decoder_norm`). The two give the same
family of functions (the saved SAE has the norms folded in, so it is a unit-norm TopK SAE); they differ in how
Adam moves them: with free norms a latent's effective encoder row w_i n_i learns at a rate that grows with n_i.
b_dec from the data's geometric median.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels
from ..objective import reconstruction
from ..registry import register
from . import _common as C
from .base import SAE, LossOutput, SAEConfig, StepState


@register
class TopKSAE(SAE):
    name = "topk"
    steered = False
    calibrates = False  # k per token: no threshold to set at the end
    unit_norm_decoder = False
    """The default, Options.decoder_norm = "free"; "unit" turns it on for the instance."""

    @dataclass(frozen=True)
    class Options:
        k_aux: int | None = None
        """Latents in the AuxK reconstruction; None = d_in // 2 (sparsify; the paper uses 512)."""
        aux_coef: float = 1 / 32
        """alpha, the weight of the AuxK loss (paper: 1/32)."""
        b_dec_init: str = "median"
        """Decoder bias init from the first batch: "median" (geometric, the paper), "mean" or "zero"."""
        decoder_norm: str = "free"
        """"free": free rows, the rule reads their directions (module docstring; FVU at L0 64 on SmolLM2 0.053
        against 0.070 for "unit", docs/benchmarks.md); "unit": unit-norm decoder rows (OpenAI, sparsify)."""
        decoder_init_norm: float = 0.1
        """With decoder_norm="free": initial norm of the tied encoder and decoder rows (SAELens: 0.1)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        C.check_choice("b_dec_init", self.opts.b_dec_init, ("median", "mean", "zero"))
        C.check_choice("decoder_norm", self.opts.decoder_norm, ("unit", "free"))
        if self.opts.decoder_init_norm <= 0:
            raise ValueError("option decoder_init_norm must be > 0")
        self.unit_norm_decoder = self.opts.decoder_norm == "unit"  # the option decides, per instance
        self.k = max(1, min(cfg.d_sae, round(cfg.l0_target)))
        self.k_aux = self.opts.k_aux if self.opts.k_aux is not None else max(1, cfg.d_in // 2)

    def unit_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """(W_enc, b_enc, W_dec) of the unit-norm SAE this one computes: the parameters themselves for
        decoder_norm="unit", the decoder norms moved into the encoder for "free" (differentiable)."""
        if self.unit_norm_decoder:
            return self.W_enc_FD, self.b_enc_F, self.W_dec_FD
        n_F = self.W_dec_FD.norm(dim=1).clamp_min(1e-12)
        return self.W_enc_FD * n_F[:, None], self.b_enc_F * n_F, self.W_dec_FD / n_F[:, None]

    def encode(self, x_BD: Tensor) -> Tensor:
        W_enc_FD, b_enc_F, _ = self.unit_weights()
        vals_BK, idx_BK = kernels.topk_encode(x_BD - self.b_dec_D, W_enc_FD, b_enc_F, self.k)
        return C.dense_from_topk(idx_BK, vals_BK, self.cfg.d_sae)

    def decode(self, acts_BF: Tensor) -> Tensor:
        return acts_BF @ self.unit_weights()[2] + self.b_dec_D

    def training_loss(self, x_BD: Tensor, state: StepState) -> LossOutput:
        W_enc_FD, b_enc_F, W_dec_FD = self.unit_weights()
        x_in_BD = x_BD - self.b_dec_D
        vals_BK, idx_BK = kernels.topk_encode(x_in_BD, W_enc_FD, b_enc_F, self.k)
        x_hat_BD = kernels.topk_decode(idx_BK, vals_BK, W_dec_FD) + self.b_dec_D
        recon = reconstruction(state, x_BD, x_hat_BD)
        aux = C.aux_residual_loss(
            x_in_BD, W_enc_FD, b_enc_F, W_dec_FD, state.dead_F, x_BD - x_hat_BD, self.k_aux
        )
        loss = recon.loss + self.opts.aux_coef * aux
        l0 = (vals_BK > 0).sum(-1).float().mean()
        fired_F = C.fired_from_topk(idx_BK, vals_BK, self.cfg.d_sae)
        return LossOutput(loss, x_hat_BD, {**recon.parts, "aux": aux.detach()}, l0.detach(), fired_F)

    @torch.no_grad()
    def init_from_data(self, x_BD: Tensor) -> None:
        super().init_from_data(x_BD)
        if not self.unit_norm_decoder:
            self.W_dec_FD.mul_(self.opts.decoder_init_norm)
            self.W_enc_FD.mul_(self.opts.decoder_init_norm)
        C.init_b_dec(self.b_dec_D, x_BD, self.opts.b_dec_init)

    @torch.no_grad()
    def fold_scale(self, c: float) -> None:
        """Free norms: fold them first, so the saved SAE is the unit-norm SAE it computes, and say so in its
        config (a free-norm rule cannot read the 1/c-norm rows the input scale leaves in the decoder)."""
        if not self.unit_norm_decoder:
            W_enc_FD, b_enc_F, W_dec_FD = self.unit_weights()
            self.W_enc_FD.copy_(W_enc_FD)
            self.b_enc_F.copy_(b_enc_F)
            self.W_dec_FD.copy_(W_dec_FD)
            self.cfg = dataclasses.replace(self.cfg, options={**self.cfg.options, "decoder_norm": "unit"})
            self.unit_norm_decoder = True
        super().fold_scale(c)
