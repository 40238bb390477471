"""TopK SAE (Gao et al. 2024, arXiv 2406.04093): each token keeps its k largest pre-activations.

f = ReLU(TopK_k(W_enc (x - b_dec) + b_enc)), x_hat = f W_dec + b_dec, k = round(l0_target).
L = ||x - x_hat||^2 + aux_coef * AuxK, AuxK reconstructing the residual from the dead latents only.
Unit-norm decoder with gradient projection (base hooks); b_dec from the data's geometric median.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels
from ..registry import register
from . import _common as C
from .base import SAE, LossOutput, SAEConfig, StepState


@register
class TopKSAE(SAE):
    name = "topk"
    steered = False
    unit_norm_decoder = True

    @dataclass(frozen=True)
    class Options:
        k_aux: int | None = None
        """Latents in the AuxK reconstruction; None = d_in // 2 (sparsify; the paper uses 512)."""
        aux_coef: float = 1 / 32
        """alpha, the weight of the AuxK loss (paper: 1/32)."""
        b_dec_init: str = "median"
        """Decoder bias init from the first batch: "median" (geometric, the paper), "mean" or "zero"."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        C.check_choice("b_dec_init", self.opts.b_dec_init, ("median", "mean", "zero"))
        self.k = max(1, min(cfg.d_sae, round(cfg.l0_target)))
        self.k_aux = self.opts.k_aux if self.opts.k_aux is not None else max(1, cfg.d_in // 2)

    def encode(self, x_BD: Tensor) -> Tensor:
        vals_BK, idx_BK = kernels.topk_encode(x_BD - self.b_dec_D, self.W_enc_FD, self.b_enc_F, self.k)
        return C.dense_from_topk(idx_BK, vals_BK, self.cfg.d_sae)

    def training_loss(self, x_BD: Tensor, state: StepState) -> LossOutput:
        x_in_BD = x_BD - self.b_dec_D
        vals_BK, idx_BK = kernels.topk_encode(x_in_BD, self.W_enc_FD, self.b_enc_F, self.k)
        x_hat_BD = kernels.topk_decode(idx_BK, vals_BK, self.W_dec_FD) + self.b_dec_D
        mse = C.mse(x_hat_BD, x_BD)
        aux = C.aux_residual_loss(
            x_in_BD, self.W_enc_FD, self.b_enc_F, self.W_dec_FD, state.dead_F, x_BD - x_hat_BD, self.k_aux
        )
        loss = mse + self.opts.aux_coef * aux
        l0 = (vals_BK > 0).sum(-1).float().mean()
        fired_F = C.fired_from_topk(idx_BK, vals_BK, self.cfg.d_sae)
        return LossOutput(loss, x_hat_BD, {"mse": mse.detach(), "aux": aux.detach()}, l0.detach(), fired_F)

    @torch.no_grad()
    def init_from_data(self, x_BD: Tensor) -> None:
        super().init_from_data(x_BD)
        C.init_b_dec(self.b_dec_D, x_BD, self.opts.b_dec_init)
