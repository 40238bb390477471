"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, arXiv 2503.17547; Nabeshima 2024): nested prefixes of the
dictionary (latents 0..m_j) each reconstruct x, so the inner prefixes learn the general features.

Training: the BatchTopK allocation over all latents; x_hat_j = f[:, :m_j] W_dec[:m_j] + b_dec for each prefix
size m_1 < ... < m_J = d_sae; L = mean_j R(x, x_hat_j) + aux_coef * AuxK (dead latents, residual of the
full reconstruction). The mean (not the sum) keeps the loss on the scale of one reconstruction, so learning
rates carry over from BatchTopK. Inference: BatchTopK's threshold (JumpReLU),
calibrated at the end of training.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..objective import reconstruction
from ..registry import register
from .base import SAEConfig, StepState
from .batchtopk import BatchTopKSAE


def prefix_sizes(prefixes: tuple[float, ...], d_sae: int) -> list[int]:
    """Fractions (<= 1) of d_sae or absolute sizes (> 1) -> strictly increasing sizes ending at d_sae."""
    sizes = sorted({max(1, round(p * d_sae)) if p <= 1 else int(p) for p in prefixes} | {d_sae})
    if sizes[-1] > d_sae:
        raise ValueError(f"option prefixes: size {sizes[-1]} exceeds d_sae={d_sae}")
    return sizes


@register
class MatryoshkaSAE(BatchTopKSAE):
    name = "matryoshka"
    sparse_path = False  # the prefix losses are not the fused pass's loss

    @dataclass(frozen=True)
    class Options(BatchTopKSAE.Options):
        prefixes: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
        """Nested prefix sizes: fractions of d_sae (<= 1) or latent counts (> 1); d_sae is always included."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.sizes = prefix_sizes(tuple(self.opts.prefixes), cfg.d_sae)

    def recon_loss(
        self, acts_BF: Tensor, x_BD: Tensor, state: StepState
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        x_hat_BD = self.b_dec_D.expand_as(x_BD)
        recons, start = [], 0
        for end in self.sizes:  # cumulative: each prefix adds its new latents' contribution
            x_hat_BD = x_hat_BD + acts_BF[:, start:end] @ self.W_dec_FD[start:end]
            recons.append(reconstruction(state, x_BD, x_hat_BD))
            start = end
        loss = sum(r.loss for r in recons) / len(recons)
        part = state.objective.recon_part if state.objective is not None else "mse"
        extra = {
            f"{part}_prefix{m}": r.loss.detach() for m, r in zip(self.sizes[:-1], recons[:-1], strict=True)
        }
        return loss, x_hat_BD, recons[-1].parts, extra
