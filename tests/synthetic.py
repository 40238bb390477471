"""Synthetic sparse data with known features in superposition, and a minimal trainer-like loop that drives an
SAE through the base hooks exactly as sae_cli/trainer.py does (init_from_data, training_loss, backward,
before_optimizer_step, Adam step, after_optimizer_step). Shared by tests/test_variants*.py and
tests/test_ground_truth*.py; no test lives here."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae_cli.registry import get_variant
from sae_cli.variants.base import SAE, SAEConfig, StepState


@dataclass(frozen=True)
class SparseData:
    features_FD: Tensor
    """The true unit feature directions [n_features, d]."""
    scale: float
    """The factor applied so that E||x||^2 = 1 (the trainer's normalisation)."""
    generator: torch.Generator
    k_active: int
    p_F: Tensor
    """Per-feature firing probability (sums to k_active)."""

    def sample(self, n: int) -> Tensor:
        """[n, d] tokens: each a positive combination of the features that fire on it (Bernoulli(p_F))."""
        fire_NF = torch.rand(n, self.p_F.numel(), generator=self.generator) < self.p_F
        mag_NF = 0.5 + torch.rand(n, self.p_F.numel(), generator=self.generator)
        return (fire_NF * mag_NF) @ self.features_FD * self.scale


def sparse_data(d: int, n_features: int, k_active: float, seed: int = 0, zipf: float = 0.0) -> SparseData:
    """Random unit features in R^d; feature i fires with probability proportional to (i+1)^-zipf, the
    probabilities summing to k_active (the mean number of true features per token)."""
    # Offset the seed: SAE.init_from_data draws its decoder with randn under seed 0, and the same draw here
    # would hand the SAE the true features at init.
    gen = torch.Generator().manual_seed(1_000_003 + seed)
    feats_FD = torch.randn(n_features, d, generator=gen)
    feats_FD /= feats_FD.norm(dim=1, keepdim=True)
    w_F = torch.arange(1, n_features + 1, dtype=torch.float32).pow(-zipf)
    p_F = (w_F / w_F.sum() * k_active).clamp(max=1.0)
    data = SparseData(feats_FD, 1.0, gen, int(k_active), p_F)
    probe = data.sample(4096)
    return SparseData(feats_FD, float(probe.pow(2).sum(-1).mean().rsqrt()), gen, int(k_active), p_F)


def make_sae(name: str, d_in: int, d_sae: int, l0_target: float, **options) -> SAE:
    cfg = SAEConfig(variant=name, d_in=d_in, d_sae=d_sae, l0_target=l0_target, options=options)
    return get_variant(name)(cfg)


@dataclass
class FitResult:
    losses: list[float]
    l0s: list[float]
    freq_F: Tensor


def fit(
    sae: SAE,
    data: SparseData,
    steps: int,
    batch: int = 256,
    lr: float = 1e-3,
    sparsity_coef: float = 0.0,
    dead_window_tokens: int = 2048,
    betas: tuple[float, float] = (0.9, 0.999),
    init: bool = True,
    decay_frac: float = 0.0,
    coef_warmup_frac: float = 0.0,
    calibrate_tokens: int = 0,
) -> FitResult:
    """Adam on fresh batches, the learning rate decaying linearly to 0 over the last `decay_frac` of the steps
    (as the trainer's schedule), the sparsity coefficient rising linearly over the first `coef_warmup_frac`; tracks dead latents (not fired in the last `dead_window_tokens` tokens) and an
    EMA firing frequency, as the trainer does, and passes them in StepState. `calibrate_tokens` > 0: end with
    `sae.calibrate` on that many fresh tokens, as the trainer ends on its sample."""
    if init:
        sae.init_from_data(data.sample(batch))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=betas)
    decay_steps = max(1, round(decay_frac * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (steps - i) / decay_steps))
    F = sae.cfg.d_sae
    since_fired_F = torch.zeros(F)
    freq_F = torch.zeros(F)
    res = FitResult([], [], freq_F)
    for step in range(steps):
        x_BD = data.sample(batch)
        coef = sparsity_coef * min(1.0, (step + 1) / max(1.0, coef_warmup_frac * steps))
        state = StepState(step, steps, coef, since_fired_F >= dead_window_tokens, freq_F.clone())
        out = sae.training_loss(x_BD, state)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sched.step()
        sae.after_optimizer_step()
        fired_F = out.fired_F.float()
        since_fired_F = torch.where(fired_F > 0, torch.zeros_like(since_fired_F), since_fired_F + batch)
        if step == 0:
            freq_F.copy_(fired_F / batch)
        else:
            freq_F.mul_(0.9).add_(0.1 * fired_F / batch)
        res.losses.append(float(out.loss.detach()))
        res.l0s.append(float(out.l0))
    if calibrate_tokens:
        sae.calibrate(data.sample(calibrate_tokens), batch)
    return res
