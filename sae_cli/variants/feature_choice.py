"""Feature Choice SAE (Ayonrinde 2024, arXiv 2411.02124; expert-choice routing; no public code): each latent
picks its top m tokens of the batch, m = ceil(k*|B| / d_sae) (uniform capacity; the paper's Zipf-drawn
per-feature capacities are not implemented).

Training: pre = ReLU(W_enc (x - b_dec) + b_enc) [B, F]; for every latent keep its m largest entries along the
batch; L = ||x - x_hat||^2 + aux_coef * aux_zipf (as Mutual Choice). Every latent is allocated m tokens of
every batch, so no latent is dead as long as its pre-activation is positive on some token of the batch.
Inference: per-latent threshold theta_i = bias-corrected EMA of latent i's cut-off in each training batch
(its smallest positive kept activation, 0 if none); f_i = pre_i * 1[pre_i > theta_i]. A latent then fires on
about m/|B| of the tokens, so the inference L0 is about d_sae * m / |B| = k, as in training.
"""

from __future__ import annotations

import math

from torch import Tensor

from ..registry import register
from . import _common as C
from .mutual_choice import MutualChoiceSAE


@register
class FeatureChoiceSAE(MutualChoiceSAE):
    name = "feature-choice"

    def threshold_shape(self) -> tuple[int, ...]:
        return (self.cfg.d_sae,)

    def select(self, pre_BF: Tensor) -> tuple[Tensor, Tensor]:
        B, F = pre_BF.shape
        m = min(B, math.ceil(self.k * B / F))
        vals_MF, idx_MF = pre_BF.topk(m, dim=0, sorted=False)
        acts_BF = pre_BF.new_zeros(B, F).scatter(0, idx_MF, vals_MF)
        return acts_BF, C.smallest_positive(vals_MF.detach(), dim=0)
