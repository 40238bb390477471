"""Steering the sparsity coefficient lambda of a `steered` variant (ReLU, Gated, JumpReLU) to an L0 target.

A PI controller on log lambda (multiplicative control: lambda spans orders of magnitude between variants,
widths and data, and the L0 responds roughly to log lambda):

    e_t        = log(L0_ema_t / target)            error; L0_ema an EMA of the measured L0 of the batch
    I_t        = I_{t-1} + k_i * e_t                integral term (log lambda that holds the target)
    lambda_t   = exp(I_t + k_p * e_t)               proportional term damps the lag of the SAE's response

For the variants that are steered, the training rule's L0 equals the inference rule's (same threshold /
gate), so the batch L0 of `LossOutput.l0` is the quantity to steer. The gains scale with the run length, so a
300-step CPU demo and a 100k-step run both settle within the first ~third of the steps, before the final
learning-rate decay freezes the SAE (measurements: docs/training.md). lambda starts small and the integral
ramps it up, which doubles as the sparsity-coefficient warm-up of steered members.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from . import kernels
from .reducer import LOCAL

if TYPE_CHECKING:
    from torch import Tensor

    from .reducer import Reducer
    from .variants.base import SAE


@dataclass(frozen=True)
class ControllerConfig:
    """Gains and limits of the L0 controller."""

    target: float
    """Target L0 (mean active latents per token)."""
    init_coef: float
    """Initial lambda; small, so the integral term ramps it up (the warm-up of steered members). The trainer
    sets it so that the sparsity term is INIT_RATIO of the MSE at initialisation (`initial_coef`)."""
    k_i: float
    """Integral gain: change of log lambda per step per unit of log error."""
    horizon: float
    """Steps ahead the error is predicted from its trend (anti-windup)."""
    ema: float = 0.9
    """EMA decay of the measured L0 (batch-to-batch noise)."""
    deadband: float = 0.03
    """|log error| below this counts as on target (no sign, so noise does not count as a crossing)."""
    gain_decay: float = 0.7
    """Factor on both gains at each crossing of the target."""
    min_gain: float = 0.25
    """Floor of that factor."""
    min_coef: float = 1e-9
    max_coef: float = 1e6

    @classmethod
    def for_run(
        cls, target: float, total_steps: int, init_coef: float = 1e-4, gain: float = 1.0
    ) -> ControllerConfig:
        """Gains for a run of `total_steps`: k_i = gain * 15 / steps within gain * [0.005, 0.05], horizon 50 steps
        (an SAE answers a change of lambda within ~20-100 steps; tuned on ReLU, Gated and JumpReLU,
        docs/training.md). `gain` is the variant's `l0_gain`."""
        k_i = gain * min(0.05, max(0.005, 15.0 / max(total_steps, 1)))
        return cls(target=float(target), init_coef=float(init_coef), k_i=k_i, horizon=50.0)


TRIM_RATE = 0.5
"""Fraction of the exact batch trim applied per step (`trim_to_target`)."""

INIT_RATIO = 0.01
"""lambda_0 * sparsity term / MSE at initialisation: small enough that the first steps learn to reconstruct,
large enough that the integral needs only a few e-folds to reach the lambda that holds the target."""


def initial_coef(mse: float, sparsity: float, fallback: float = 1e-4) -> float:
    """lambda_0 from the variant's loss parts on the first batch: scale-free across variants (an L0 penalty
    and an L1 penalty differ by orders of magnitude) and data."""
    if math.isfinite(mse) and math.isfinite(sparsity) and mse > 0 and sparsity > 0:
        return INIT_RATIO * mse / sparsity
    return fallback


class L0Controller:
    """Call `update(l0)` once per step with the batch's measured L0; read `coef` for the next step."""

    def __init__(self, cfg: ControllerConfig) -> None:
        self.cfg = cfg
        self.log_coef = math.log(cfg.init_coef)
        self.l0_ema: float | None = None
        self.err = 0.0
        self.slope = 0.0
        self.gain = 1.0
        self.sign = 0
        self.coef = cfg.init_coef
        self.trim_shift = 0.0
        """Sum of the final trim's threshold shifts so far (the trainer adds them; `trim_to_target`)."""

    def update(self, l0: float) -> float:
        cfg = self.cfg
        if not math.isfinite(l0):
            return self.coef
        first = self.l0_ema is None
        self.l0_ema = l0 if first else cfg.ema * self.l0_ema + (1 - cfg.ema) * l0
        # +1 in both keeps the log finite when the SAE goes fully silent (L0 = 0) early on.
        err = math.log((self.l0_ema + 1.0) / (cfg.target + 1.0))
        if first:
            self.err = err
        sign = (err > cfg.deadband) - (err < -cfg.deadband)
        if sign and self.sign and sign != self.sign:
            # The L0 crossed the target: each crossing (overshoot, or a limit cycle on a fast, high-gain
            # plant such as ReLU's L1) lowers the loop gain, down to min_gain.
            self.gain = max(cfg.min_gain, self.gain * cfg.gain_decay)
        self.sign = sign or self.sign
        # Anti-windup for slow plants (JumpReLU thresholds move at the learning rate): integrate the error
        # predicted `horizon` steps ahead from the current trend, but never against the present error, so a
        # falling L0 that will reach the target soon holds lambda instead of raising it further. The clip to
        # [-1, 1] bounds the rate: lambda moves by at most a factor e^(k_i) per step.
        self.slope = 0.9 * self.slope + 0.1 * (err - self.err)
        ahead = max(min(0.0, err), min(max(0.0, err), err + cfg.horizon * self.slope))
        step = self.gain * cfg.k_i * max(-1.0, min(1.0, ahead))
        self.err = err
        self.log_coef = min(math.log(cfg.max_coef), max(math.log(cfg.min_coef), self.log_coef + step))
        self.coef = math.exp(self.log_coef)
        return self.coef

    def state_dict(self) -> dict:
        return {
            "log_coef": self.log_coef,
            "l0_ema": self.l0_ema,
            "err": self.err,
            "slope": self.slope,
            "gain": self.gain,
            "sign": self.sign,
            "coef": self.coef,
            "trim_shift": self.trim_shift,
        }

    def load_state_dict(self, state: dict) -> None:
        self.log_coef = float(state["log_coef"])
        self.l0_ema = None if state["l0_ema"] is None else float(state["l0_ema"])
        self.err, self.slope = float(state["err"]), float(state["slope"])
        self.gain, self.sign = float(state["gain"]), int(state["sign"])
        self.coef = float(state["coef"])
        self.trim_shift = float(state.get("trim_shift", 0.0))


class Trim(NamedTuple):
    shift: float
    """The shift applied to every firing margin."""
    l0_untrimmed: float
    """The batch's L0 (before this shift) had the trims so far (`applied`) not been made."""


@torch.no_grad()
def trim_to_target(
    sae: SAE,
    x_BD: Tensor,
    target: float,
    rate: float = 1.0,
    applied: float = 0.0,
    reducer: Reducer | None = None,
) -> Trim | None:
    """Shift the SAE's firing threshold by `rate` times the shift that makes exactly round(target * B) (token,
    latent) pairs of this batch fire (the threshold halfway between the n-th and (n+1)-th largest firing margins).
    None: the variant has no trim, or the target is out of range. rate 1 is exact on this batch; the trainer uses
    TRIM_RATE < 1, an average over ~1/rate batches, so the final threshold does not carry the sampling noise of
    the last batch's L0. `applied` is the sum of the shifts made so far; the L0 without them is what the
    controller steers lambda on while the trim runs. `reducer` (sae_cli/reducer.py; None: one process): the exact
    shift and the untrimmed L0 are averaged over the ranks (the ranks whose batch has an exact shift), so every
    rank shifts its (identical) thresholds alike.

    Why: lambda moves the L0 through the SAE's weights, slowly and, for ReLU's L1, not reversibly (latents pushed
    below zero get no gradient back). The controller brings the L0 near the target; over the final steps (the
    learning-rate decay) this trim closes the rest at once, while the weights still adapt to it and lambda keeps
    moving towards the value that needs no trim (docs/training.md, "Steering the L0")."""
    margin_BF = sae.firing_margin(x_BD)
    if margin_BF is None:
        return None
    exact = exact_shift(margin_BF, target)
    l0_untrimmed = float((margin_BF.detach().float() > applied).sum()) / x_BD.shape[0]
    # Over the ranks of a process group: the mean of the exact shifts (of the ranks that have one) and of the
    # untrimmed L0s. float64 host scalars, so one process (the identity reducer) keeps every bit.
    stats = torch.tensor([exact or 0.0, exact is not None, l0_untrimmed], dtype=torch.float64)
    reducer = reducer or LOCAL
    total, ranks, l0_sum = reducer.sum_(stats).tolist()
    if ranks == 0:
        return None
    delta = total / ranks * rate
    sae.shift_threshold(delta)
    return Trim(delta, l0_sum / reducer.world_size)


@torch.no_grad()
def exact_shift(margin_BF: Tensor, target: float) -> float | None:
    """The shift d that makes exactly n = round(target * B) of the margins m + d positive: minus the midpoint of the
    n-th and (n+1)-th largest margins. None when n is 0 or covers every pair."""
    flat = margin_BF.detach().float().flatten()
    n = round(target * margin_BF.shape[0])
    if n <= 0 or n >= flat.numel():
        return None
    nth, next_ = nth_and_next_largest(flat, n, margin_BF.shape[-1])
    return -0.5 * float(nth + next_)


def nth_and_next_largest(flat: Tensor, n: int, row_len: int = 1) -> tuple[Tensor, Tensor]:
    """The n-th largest entry of a 1-D tensor and the largest entry below it (the n-th itself when none is below):
    one selection (kthvalue counts from the smallest: the n-th largest is the (N - n + 1)-th smallest) and one
    masked max, both over `kernels.top_candidates` (the entries above a sampled cut) when there is such a list:
    455 -> 29 ms for n = 131,072 of 18.9M on the 2-core CPU. `row_len`: the row length of a flattened matrix
    (the sample then sees every column)."""
    idx = kernels.top_candidates(flat, n + 1, row_len)
    cand = flat if idx is None else flat[idx]
    nth = cand.kthvalue(cand.numel() - n + 1).values
    below = _max_below(cand, nth)
    if idx is not None and torch.isinf(below):  # every candidate ties with the n-th: look below the cut
        below = _max_below(flat, nth)
    return nth, torch.where(torch.isinf(below), nth, below)


def _max_below(v: Tensor, t: Tensor) -> Tensor:
    return torch.where(v < t, v, torch.full_like(v, float("-inf"))).max()
