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


@dataclass(frozen=True)
class ControllerConfig:
    """Gains and limits of the L0 controller."""

    target: float
    """Target L0 (mean active latents per token)."""
    init_coef: float
    """Initial lambda; small, so the integral term ramps it up (the warm-up of steered members)."""
    k_i: float
    """Integral gain: change of log lambda per step per unit of log error."""
    k_p: float
    """Proportional gain on the log error."""
    ema: float = 0.9
    """EMA decay of the measured L0 (batch-to-batch noise)."""
    min_coef: float = 1e-9
    max_coef: float = 1e6

    @classmethod
    def for_run(cls, target: float, total_steps: int, init_coef: float = 1e-4) -> ControllerConfig:
        """Gains scaled to the run: log lambda may move by ~e-fold per (total_steps / 40) steps at a 2x error,
        clipped to [0.002, 0.1] per step; k_p = 10 steps' worth of integral."""
        k_i = min(0.1, max(0.002, 40.0 / max(total_steps, 1) / math.log(2)))
        return cls(target=float(target), init_coef=float(init_coef), k_i=k_i, k_p=min(1.0, 10 * k_i))


class L0Controller:
    """Call `update(l0)` once per step with the batch's measured L0; read `coef` for the next step."""

    def __init__(self, cfg: ControllerConfig) -> None:
        self.cfg = cfg
        self.integral = math.log(cfg.init_coef)
        self.l0_ema: float | None = None
        self.coef = cfg.init_coef

    def update(self, l0: float) -> float:
        cfg = self.cfg
        if not math.isfinite(l0):
            return self.coef
        self.l0_ema = l0 if self.l0_ema is None else cfg.ema * self.l0_ema + (1 - cfg.ema) * l0
        # +1 in both keeps the log finite when the SAE goes fully silent (L0 = 0) early on.
        err = math.log((self.l0_ema + 1.0) / (cfg.target + 1.0))
        lo, hi = math.log(cfg.min_coef), math.log(cfg.max_coef)
        self.integral = min(hi, max(lo, self.integral + cfg.k_i * err))  # clamped: no wind-up
        self.coef = math.exp(min(hi, max(lo, self.integral + cfg.k_p * err)))
        return self.coef

    def state_dict(self) -> dict:
        return {"integral": self.integral, "l0_ema": self.l0_ema, "coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.integral = float(state["integral"])
        self.l0_ema = None if state["l0_ema"] is None else float(state["l0_ema"])
        self.coef = float(state["coef"])
