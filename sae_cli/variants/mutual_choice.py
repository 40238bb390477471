"""Mutual Choice SAE (Ayonrinde 2024, arXiv 2411.02124; no public code): the global top k*|B| over the
token x feature matrix, which is the allocation of BatchTopK, trained with aux_zipf_loss instead of AuxK.

Training: pre = ReLU(W_enc (x - b_dec) + b_enc); keep the k*|B| largest entries of the [B, F] matrix;
L = ||x - x_hat||^2 + aux_coef * aux_zipf, where aux_zipf is the AuxK-style reconstruction of the residual by
the under-used latents: those whose running firing frequency (StepState.freq_F) is below the Zipf target of
their frequency rank, the targets summing to k (see _common.zipf_targets).
Inference: one threshold for every latent, as BatchTopK: the allocation is global, so the batch's cut-off is a
single number shared by all latents and a per-latent estimate would only add noise to the same quantity.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..registry import register
from . import _common as C
from .base import StepState
from .batchtopk import BatchTopKSAE


@register
class MutualChoiceSAE(BatchTopKSAE):
    name = "mutual-choice"

    @dataclass(frozen=True)
    class Options(BatchTopKSAE.Options):
        zipf_exponent: float = 1.0
        """Exponent s of the Zipf target t_r proportional to r^-s (rank r by firing frequency)."""

    def aux_eligible(self, state: StepState) -> Tensor | None:
        return C.underused(state.freq_F, float(self.k), self.opts.zipf_exponent)
