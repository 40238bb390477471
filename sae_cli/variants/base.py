"""The contract every SAE variant implements. One trainer (sae_cli/trainer.py) calls these hooks for every
variant and every sweep member; a variant file holds its parameters, its encode rule, its sparsity loss and
its aux loss, and nothing else. The reconstruction term R(x, x_hat) of its loss comes from the run's objective
(`objective.reconstruction(state, x, x_hat)`, sae_cli/objective.py; MSE unless the trainer is given another).

Weights use the [d_sae, d_in] layout for encoder and decoder (`W_enc_FD`, `W_dec_FD`), `b_enc_F`, `b_dec_D`.
During training an SAE sees activations scaled by one scalar c (TrainConfig.normalize); the
saved SAE takes raw activations because `fold_scale` folds the normalisation into the weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from ..calibration import pooled_top, value_at_rank

if TYPE_CHECKING:
    from ..objective import Objective, ObjectiveContext
    from ..reducer import Reducer


@dataclass(frozen=True)
class SAEConfig:
    """What defines an SAE's shape and rule; saved as cfg.json beside the weights."""

    variant: str
    """Registry name of the variant, e.g. "topk"."""
    d_in: int
    """Width of the activations the SAE reads."""
    d_sae: int
    """Number of latents."""
    l0_target: float
    """Target mean number of active latents per token (k for TopK-like variants; the steering target otherwise)."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Variant-specific hyper-parameters; validated against the variant's `Options` dataclass."""
    passthrough_norm: float | None = None
    """Out-of-range rule: a token whose norm exceeds this comes back unchanged from `forward` / `reconstruct`
    (x_hat = x, no latent active). Set at the end of a run that dropped tokens above a norm from its training
    (--max-norm-ratio), to that cut-off in raw units (the ratio times the median token norm of the calibration
    tokens); None: every token goes through the SAE. docs/variants.md, "Tokens outside the training range"."""

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "options": dict(self.options)}


@dataclass
class StepState:
    """What the trainer tells a variant at each step (read-only for the variant)."""

    step: int
    total_steps: int
    sparsity_coef: float
    """Current sparsity coefficient lambda (warm-up and L0 steering applied by the trainer)."""
    dead_F: Tensor | None = None
    """Bool [d_sae]: latents that have not fired for the dead-latent window (AuxK uses it)."""
    freq_F: Tensor | None = None
    """Float [d_sae]: running firing frequency per latent (aux_zipf_loss uses it)."""
    objective: Objective | None = None
    """The run's reconstruction objective (sae_cli/objective.py); None: MSE. Variants reach it through
    `objective.reconstruction(state, x, x_hat)`."""
    context: ObjectiveContext | None = None
    """The step as the objective sees it (member key, input scale, the reader's batch); None outside a step."""


class LossOutput(NamedTuple):
    loss: Tensor
    """Scalar total loss to back-propagate."""
    x_hat_BD: Tensor
    """Reconstruction (training rule)."""
    parts: dict[str, Tensor]
    """Named detached scalars for logging: at least "mse"; e.g. "sparsity", "aux"."""
    l0: Tensor
    """Detached scalar: mean active latents per token under the training rule."""
    fired_F: Tensor
    """Detached int/float [d_sae]: how many tokens of the batch each latent fired on."""


class SAE(nn.Module):
    """Base class. Subclasses set `name`, `steered`, an `Options` frozen dataclass, and implement
    `encode_pre`/`encode`/`training_loss`; decode and the decoder-norm hooks have defaults."""

    name: ClassVar[str] = ""
    steered: ClassVar[bool] = False
    """True when the trainer must steer `sparsity_coef` to reach `l0_target` (ReLU, Gated, JumpReLU); False when
    the rule itself fixes the L0 (TopK, BatchTopK, the choice variants, Matryoshka)."""
    unit_norm_decoder: ClassVar[bool] = True
    """True: decoder rows kept at unit norm (gradient projected, rows renormalised after each step). The class
    attribute is the variant's default (`sae variants` prints it); an option may change it per instance (TopK's
    `decoder_norm`, JumpReLU's `unit_norm_decoder`)."""
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    """Adam's (beta1, beta2) for this variant (sae_cli/training/plan.py reads it)."""
    calibrates: ClassVar[bool] = True
    """True when `calibrate` sets an inference threshold (every rule with a firing margin or a batch-level
    threshold); False when it has nothing to set (TopK), so a run of such members holds no tokens back for it."""
    l0_gain: ClassVar[float] = 1.0
    """Steered variants: factor on the L0 controller's integral gain (sae_cli/l0_control.py). Below 1 for a rule
    whose L0 falls steeply and irreversibly once lambda is too high (ReLU's L1: latents pushed below zero get no
    gradient and do not come back)."""

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        try:
            self.opts = self.Options(**dict(cfg.options))
        except TypeError as e:
            known = ", ".join(f.name for f in dataclasses.fields(self.Options)) or "none"
            raise ValueError(
                f"bad option for SAE variant {cfg.variant!r}: {e}; known options: {known}"
            ) from None
        d, f = cfg.d_in, cfg.d_sae
        self.W_dec_FD = nn.Parameter(torch.empty(f, d))
        self.W_enc_FD = nn.Parameter(torch.empty(f, d))
        self.b_enc_F = nn.Parameter(torch.zeros(f))
        self.b_dec_D = nn.Parameter(torch.zeros(d))

    # ---- the rule -------------------------------------------------------------------------------------------
    def encode(self, x_BD: Tensor) -> Tensor:
        """Inference rule: dense [B, d_sae] latent activations, independent of the rest of the batch."""
        raise NotImplementedError

    def decode(self, acts_BF: Tensor) -> Tensor:
        return acts_BF @ self.W_dec_FD + self.b_dec_D

    def forward(self, x_BD: Tensor) -> Tensor:
        """The reconstruction under the inference rule, the pass-through rule applied (what the splice uses)."""
        return self.reconstruct(x_BD)[1]

    def passed_through(self, x_BD: Tensor) -> Tensor | None:
        """Bool [B]: the tokens the out-of-range rule passes through (norm above cfg.passthrough_norm); None when
        the SAE has no such rule."""
        limit = self.cfg.passthrough_norm
        return None if limit is None else x_BD.norm(dim=-1) > limit

    def reconstruct(self, x_BD: Tensor, passthrough: bool = True) -> tuple[Tensor, Tensor]:
        """(latents [B, d_sae], reconstruction [B, d_in]) under the inference rule. `passthrough` (default): a token
        of norm above cfg.passthrough_norm comes back as it is, with no latent active (the SAE never saw such a
        token in training; its rule can fire thousands of latents on it)."""
        acts_BF = self.encode(x_BD)
        x_hat_BD = self.decode(acts_BF)
        mask_B = self.passed_through(x_BD) if passthrough else None
        if mask_B is not None:
            acts_BF = acts_BF.masked_fill(mask_B[:, None], 0.0)
            x_hat_BD = torch.where(mask_B[:, None], x_BD, x_hat_BD)
        return acts_BF, x_hat_BD

    def training_loss(self, x_BD: Tensor, state: StepState) -> LossOutput:
        raise NotImplementedError

    # ---- hooks the trainer calls ------------------------------------------------------------------------
    @torch.no_grad()
    def reduce_batch_stats(self, reducer: Reducer) -> None:
        """Before `after_optimizer_step`: combine the statistics of this step's batch that the variant keeps
        (a batch-level rule's running-threshold cut-off) over the ranks of a process group (sae_cli/reducer.py).
        Default: none."""

    def firing_margin(self, x_BD: Tensor) -> Tensor | None:
        """Steered variants: [B, d_sae] margins m, latent i firing on token b iff m_bi > 0, such that
        `shift_threshold(d)` adds d to every margin. The L0 trim (l0_control.trim_to_target) reads them.
        None (the default): the variant has no trim."""
        return None

    @torch.no_grad()
    def shift_threshold(self, delta: float) -> None:
        """Add `delta` to every firing margin (see `firing_margin`)."""
        raise NotImplementedError(f"variant {self.name!r} has no firing threshold to shift")

    @torch.no_grad()
    def init_from_data(self, x_BD: Tensor) -> None:
        """Tied init (W_enc = W_dec), random unit decoder rows drawn from torch's global RNG (the trainer seeds it
        with --seed before each member, so a sweep member starts as its solo run); subclasses may set b_dec from
        the data."""
        w = torch.randn(self.W_dec_FD.shape)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec_FD.copy_(w)
        self.W_enc_FD.copy_(w)

    @torch.no_grad()
    def calibrate(self, x_ND: Tensor, batch_size: int) -> None:
        """End of training (the trainer calls it once, after the last step, before saving; LoopConfig.calibrate):
        set the inference rule's threshold from the final weights on the calibration tokens `x_ND`, read in blocks
        of the training `batch_size`. Default, for variants with a firing margin (the steered ones): shift every
        margin so that exactly n = round(target * N) of the N tokens' margins are positive, minus the midpoint of
        the n-th and (n+1)-th largest margin over all of them (sae_cli/calibration.py; the final trim's rule at
        rate 1, pooled over the tokens). Without a margin (TopK): nothing. The batch-level rules override it."""
        if not len(x_ND) or self.firing_margin(x_ND[:1]) is None:
            return  # no firing margin (TopK): nothing to calibrate
        n = round(self.cfg.l0_target * len(x_ND))
        if n <= 0 or n >= len(x_ND) * self.cfg.d_sae:
            return
        blocks = (self.firing_margin(x_BD) for x_BD in x_ND.split(max(1, batch_size)))
        top = pooled_top(blocks, n + 1)
        if top is not None:
            self.shift_threshold(-float(value_at_rank(top, n + 0.5)))

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component parallel to each decoder row (unit-norm decoders)."""
        if self.unit_norm_decoder and self.W_dec_FD.grad is not None:
            w, g = self.W_dec_FD, self.W_dec_FD.grad
            g -= (g * w).sum(dim=1, keepdim=True) * w / w.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec_FD /= self.W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def fold_scale(self, c: float) -> None:
        """The SAE was trained on c*x; rewrite it to take x. Encoder weights absorb c, decoder outputs divide by c
        (pre-activations, thresholds and latents are unchanged). Variants with more parameters extend this."""
        self.W_enc_FD *= c
        self.W_dec_FD /= c
        self.b_dec_D /= c
