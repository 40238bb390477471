"""BatchTopK SAE (Bussmann et al. 2024, arXiv 2412.06410): the batch as a whole keeps its k*|B| largest
activations, so tokens get a variable number of latents with mean k.

Training: pre = ReLU(W_enc (x - b_dec) + b_enc); keep the k*|B| largest entries of pre over the whole [B, F]
matrix; x_hat = f W_dec + b_dec; L = R(x, x_hat) + aux_coef * AuxK (dead latents, as TopK).
Inference: f = pre * 1[pre > theta], theta = bias-corrected EMA (decay `threshold_decay`) of the smallest
positive kept activation of each training batch, updated in after_optimizer_step. theta = 0 (before the
first step) is plain ReLU. At the end of training (`calibrate`, LoopConfig.calibrate) theta is set to
the mean over batches of the calibration tokens of the threshold that keeps exactly the batch's picks, under
the final weights: the EMA averages cut-offs of earlier, different weights, and the cut-off falls as training
goes on, so the EMA sits above it (docs/variants.md, "Running inference thresholds"). Unit-norm decoder with
gradient projection; b_dec from the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .. import kernels
from ..calibration import pooled_top, value_at_rank
from ..objective import reconstruction
from ..registry import register
from . import _common as C
from .base import SAE, LossOutput, SAEConfig, StepState

if TYPE_CHECKING:
    from ..reducer import Reducer


@register
class BatchTopKSAE(SAE):
    name = "batchtopk"
    steered = False
    unit_norm_decoder = True
    sparse_path: ClassVar[bool] = True
    """The fused sparse pass (`kernels.batch_topk_encode_decode`, used while AuxK is off) computes this class's
    training rule and reconstruction: BatchTopK's `select` and `recon_loss`. A subclass that overrides either sets
    it False (Matryoshka's prefixes, Feature Choice's per-latent picks) and is trained densely; defining such an
    override without saying `sparse_path` is an error at class definition."""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        changed = [f for f in ("select", "recon_loss") if f in vars(cls)]
        if changed and "sparse_path" not in vars(cls):
            raise TypeError(
                f"{cls.__name__} overrides {', '.join(changed)}: set its class attribute sparse_path (False unless "
                "kernels.batch_topk_encode_decode computes the new rule)"
            )

    @dataclass(frozen=True)
    class Options:
        k_aux: int | None = None
        """Latents in the AuxK reconstruction; None = d_in // 2."""
        aux_coef: float = 1 / 32
        """Weight of the auxiliary loss (AuxK, 1/32 as TopK)."""
        threshold_decay: float = 0.99
        """Decay of the running inference threshold (SAELens uses a rate of 0.01, i.e. 0.99)."""
        b_dec_init: str = "median"
        """Decoder bias init from the first batch: "median" (geometric), "mean" or "zero"."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        C.check_choice("b_dec_init", self.opts.b_dec_init, ("median", "mean", "zero"))
        if not 0.0 <= self.opts.threshold_decay < 1.0:
            raise ValueError(f"option threshold_decay must be in [0, 1), got {self.opts.threshold_decay}")
        self.k = max(1, min(cfg.d_sae, round(cfg.l0_target)))
        self.k_aux = self.opts.k_aux if self.opts.k_aux is not None else max(1, cfg.d_in // 2)
        self.register_buffer("threshold", torch.zeros(self.threshold_shape(), dtype=torch.float32))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))
        self._pending_cutoff: Tensor | None = None

    def threshold_shape(self) -> tuple[int, ...]:
        return ()

    def pre_acts(self, x_in_BD: Tensor) -> Tensor:
        return torch.relu(x_in_BD @ self.W_enc_FD.T + self.b_enc_F)

    def encode(self, x_BD: Tensor) -> Tensor:
        pre_BF = self.pre_acts(x_BD - self.b_dec_D)
        return pre_BF * (pre_BF > self.threshold)

    def select(self, pre_BF: Tensor) -> tuple[Tensor, Tensor]:
        """Training rule: (acts [B, F], the cut-off that the inference threshold tracks)."""
        n_keep = min(self.k * pre_BF.shape[0], pre_BF.numel())
        vals_N, idx_N = kernels.flat_topk(pre_BF.flatten(), n_keep, row_len=pre_BF.shape[1])
        acts_BF = torch.zeros_like(pre_BF).flatten().scatter(0, idx_N, vals_N).view_as(pre_BF)
        return acts_BF, C.smallest_positive(vals_N.detach(), dim=0)

    def aux_eligible(self, state: StepState) -> Tensor | None:
        return state.dead_F

    def recon_loss(
        self, acts_BF: Tensor, x_BD: Tensor, state: StepState
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """(loss, x_hat, the objective's parts of x_hat, extra parts); Matryoshka overrides this with its prefix
        losses."""
        x_hat_BD = self.decode(acts_BF)
        recon = reconstruction(state, x_BD, x_hat_BD)
        return recon.loss, x_hat_BD, recon.parts, {}

    def _sparse_training_loss(self, x_BD: Tensor, state: StepState) -> LossOutput:
        """The training loss while AuxK is off (no eligible latent), on the kept pairs only (kernels)."""
        n_keep = min(self.k * x_BD.shape[0], x_BD.shape[0] * self.cfg.d_sae)
        x_hat_BD, vals_N, fired_F = kernels.batch_topk_encode_decode(
            x_BD - self.b_dec_D, self.W_enc_FD, self.b_enc_F, n_keep, self.W_dec_FD
        )
        self._pending_cutoff = C.smallest_positive(vals_N, dim=0)
        x_hat_BD = x_hat_BD + self.b_dec_D
        recon = reconstruction(state, x_BD, x_hat_BD)
        l0 = fired_F.sum().float() / x_BD.shape[0]
        parts = {**recon.parts, "aux": x_BD.new_zeros(())}
        return LossOutput(recon.loss, x_hat_BD, parts, l0, fired_F)

    def training_loss(self, x_BD: Tensor, state: StepState) -> LossOutput:
        eligible_F = self.aux_eligible(state)
        if (
            self.sparse_path
            and kernels.sparse_latents_ok(x_BD, self.W_enc_FD, self.b_enc_F, self.W_dec_FD)
            and self.k / self.cfg.d_sae <= kernels.CPU_SPARSE_DECODE_MAX_DENSITY
            and eligible_F is not None  # None (no dead-latent bookkeeping, direct calls): dense reference
            and (self.k_aux <= 0 or not bool(eligible_F.any()))
        ):
            return self._sparse_training_loss(x_BD, state)
        pre_BF = self.pre_acts(x_BD - self.b_dec_D)
        acts_BF, cutoff = self.select(pre_BF)
        self._pending_cutoff = cutoff
        recon, x_hat_BD, recon_parts, extra = self.recon_loss(acts_BF, x_BD, state)
        aux = C.aux_residual_loss_from_pre(pre_BF, eligible_F, self.W_dec_FD, x_BD - x_hat_BD, self.k_aux)
        loss = recon + self.opts.aux_coef * aux
        fired_F = C.fired_from_dense(acts_BF)
        l0 = fired_F.sum().float() / x_BD.shape[0]
        parts = {**recon_parts, "aux": aux.detach(), **extra}
        return LossOutput(loss, x_hat_BD, parts, l0, fired_F)

    @torch.no_grad()
    def init_from_data(self, x_BD: Tensor) -> None:
        super().init_from_data(x_BD)
        C.init_b_dec(self.b_dec_D, x_BD, self.opts.b_dec_init)

    def cutoff_rank(self, n_tokens: int) -> float:
        """1-based rank of the inference threshold among the calibration tokens' pre-activations: midway between
        the (k*N)-th and (k*N + 1)-th largest of all of them, so that the N tokens fire k latents each on average
        (entries past the N*d_sae count as 0)."""
        return min(self.k * n_tokens, n_tokens * self.cfg.d_sae) + 0.5

    @torch.no_grad()
    def calibrate(self, x_ND: Tensor, batch_size: int) -> None:
        """theta = the value at `cutoff_rank` of the pre-activations of all of `x_ND` under the current weights,
        pooled over blocks of `batch_size` tokens (sae_cli/calibration.py), per latent where
        `per_latent_calibration` says so. The gap's midpoint, not the smallest kept entry that the running EMA
        tracks: with the strict `pre > theta` that entry itself would be dropped."""
        if not len(x_ND):
            return
        rank = self.cutoff_rank(len(x_ND))
        blocks = (self.pre_acts(x_BD - self.b_dec_D) for x_BD in x_ND.split(max(1, batch_size)))
        top = pooled_top(blocks, math.floor(rank) + 1, per_column=self.per_latent_calibration())
        if top is not None:
            # one value fills every entry of a per-latent buffer (Feature Choice's global option)
            self.threshold.copy_(value_at_rank(top, rank))

    def per_latent_calibration(self) -> bool:
        """True: `calibrate` sets one threshold per latent (`cutoff_rank` is then a rank in each latent's column);
        False: one threshold for every latent."""
        return False

    @torch.no_grad()
    def reduce_batch_stats(self, reducer: Reducer) -> None:
        """The cut-off of this step's batch, averaged over the ranks (the running threshold then moves alike)."""
        if self._pending_cutoff is not None:
            reducer.mean_(self._pending_cutoff)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        if self._pending_cutoff is not None:
            C.update_running(
                self.threshold, self.threshold_updates, self._pending_cutoff, self.opts.threshold_decay
            )
            self._pending_cutoff = None
