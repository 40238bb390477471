"""Schedules of a run, all functions of the step and the run's length (docs/training.md, "Optimiser and
schedules"): the lr multiplier (linear warm-up, flat, linear decay), the warm-up of a fixed sparsity coefficient,
the start of the final L0 trim, and the dead-latent window."""

from __future__ import annotations

import math

from ..config import LoopConfig


def total_steps(loop: LoopConfig, tokens: int) -> int:
    return max(1, math.ceil(tokens / loop.batch_size))


def lr_multiplier(step: int, n_steps: int, loop: LoopConfig) -> float:
    """Linear warm-up over min(warmup_steps, 5 % of steps), flat, linear decay to 0 over the last fraction."""
    warm = max(1, min(loop.warmup_steps, int(0.05 * n_steps)))
    if step < warm:
        return (step + 1) / warm
    decay_start = n_steps * (1.0 - loop.decay_fraction)
    if loop.decay_fraction > 0 and step >= decay_start:
        return max(0.0, (n_steps - step) / (n_steps - decay_start))
    return 1.0


def fixed_coef(coef: float, step: int, n_steps: int, loop: LoopConfig) -> float:
    """A fixed sparsity coefficient, warmed up linearly over `sparsity_warmup_fraction` of the steps."""
    frac = loop.sparsity_warmup_fraction
    warm = max(1, int(frac * n_steps)) if frac > 0 else 0
    return coef * (min(1.0, (step + 1) / warm) if warm else 1.0)


def trim_start(n_steps: int, loop: LoopConfig) -> int:
    """The first step of the final L0 trim of steered members (the last `l0_trim_fraction` of the steps)."""
    if not loop.l0_trim_fraction:
        return n_steps
    return math.ceil(n_steps * (1.0 - loop.l0_trim_fraction))


def dead_window(loop: LoopConfig, tokens: int) -> int:
    """Tokens without firing after which a latent counts as dead: 10M (OpenAI, sparsify) scaled down for short
    runs to a tenth of the run, but at least 8 batches."""
    if loop.dead_window_tokens:
        return loop.dead_window_tokens
    return int(min(10_000_000, max(tokens // 10, 8 * loop.batch_size)))


def logging_next(step: int, n_steps: int, loop: LoopConfig) -> bool:
    """Whether the step after `step` ends a log interval (the step's FVU goes into the row)."""
    return (step + 1) % loop.log_every == 0 or step + 1 >= n_steps
