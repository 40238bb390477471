"""Members resolved for a run: width, lr, Adam betas, sparsity handling, output folder; the checks of a plan
before anything is allocated; the input scale c."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..config import ConfigError, MemberConfig, resolve_width
from ..registry import get_variant
from ..variants.base import SAEConfig
from . import init_from
from .errors import TrainingError

Key = tuple[int, str]
# Default peak lr, every variant: the OpenAI/sparsify TopK heuristic 2e-4 / sqrt(d_sae / 2^14), times a short-run
# factor sqrt((1200 / steps) * r), r = clamp(batch / 256, 1, 4), clamped to [1, 2 sqrt(r)]: from 1024 tokens a step on,
# sqrt(4800 / steps) in [1, 4] (4 for <= 300 steps, 2 at 1200, the plain heuristic from 4800). On SmolLM2 layer 15 at
# 8x, 300 steps of 1024 (factor 4; 2 until 2026-12-04): TopK's held-out FVU 0.181 -> 0.153 on the demo store and
# 0.178 -> 0.150 on Python source at L0 32, dead latents 36-44 % -> 4-8 %; at 256 steps of 4096 0.163 -> 0.142
# (docs/training.md, "Defaults for short runs"). Batches of <= 256 tokens keep the first rule (min(2, sqrt(1200 /
# steps))). Gemma Scope's 7e-5 for JumpReLU is tuned for runs of billions of tokens. Adam's betas are a fact of the
# variant (`SAE.adam_betas`).
LR_BASE, LR_REF_WIDTH, LR_SHORT_RUN_STEPS, LR_REF_BATCH = 2e-4, 2**14, 1200, 256
LR_SHORT_RUN_MAX, LR_BATCH_RATIO_MAX = 2.0, 4.0
"""The short-run factor's ceiling at the reference batch (2), and the most the batch raises r (4: from 1024 tokens
on the factor depends on the steps only, and reaches 4)."""


@dataclass(frozen=True)
class MemberPlan:
    """One member, fully resolved (width in latents, lr, betas, sparsity handling, output folder)."""

    name: str
    key: Key
    sae_cfg: SAEConfig
    lr: float
    betas: tuple[float, float]
    steered: bool
    """True: lambda comes from the L0 controller; False: fixed_coef (warmed up) or unused."""
    fixed_coef: float
    out_dir: Path
    objective: str = "local"
    """The member's reconstruction objective (MemberConfig.objective)."""
    init_from: str = ""
    """A trained SAE's folder the member starts from (training/init_from.py); "" = a fresh init."""


def default_lr(variant: str, d_sae: int, steps: int | None = None, batch_size: int | None = None) -> float:
    """Peak lr from the width, raised for short runs when `steps` is given, the more so the larger the batch up to
    1024 tokens (`batch_size` tokens per step; None: a batch of 1024 or more) (see LR_BASE); the same rule for every
    variant today (`variant` is where a variant-specific rule would go)."""
    base = LR_BASE / math.sqrt(d_sae / LR_REF_WIDTH)
    if not steps:
        return base
    r = min(LR_BATCH_RATIO_MAX, max(1.0, batch_size / LR_REF_BATCH)) if batch_size else LR_BATCH_RATIO_MAX
    return base * min(LR_SHORT_RUN_MAX * math.sqrt(r), max(1.0, math.sqrt(LR_SHORT_RUN_STEPS / steps * r)))


def plan_member(
    cfg: MemberConfig, d_in: int, out_dir: str | Path, steps: int | None = None, batch_size: int | None = None
) -> MemberPlan:
    """Resolve a MemberConfig against the data width (d_in) and the run's length in steps of `batch_size` tokens
    (for the default lr); KeyError/ValueError name the bad input."""
    cls = get_variant(cfg.variant)
    if cfg.init_from:
        sae_cfg = init_from.source_config(cfg, d_in)
        d_sae = sae_cfg.d_sae
    else:
        d_sae = resolve_width(cfg.width, d_in)
        sae_cfg = SAEConfig(cfg.variant, d_in, d_sae, float(cfg.l0_target), dict(cfg.options))
    betas = cls.adam_betas
    steered = bool(cls.steered) and cfg.sparsity_coef is None
    suffix = "" if cfg.objective == "local" else f"-{cfg.objective}"
    name = cfg.name or f"{cfg.variant}-L{cfg.layer}-{cfg.site}-w{d_sae}-l0_{cfg.l0_target:g}{suffix}"
    return MemberPlan(
        name=name,
        key=(int(cfg.layer), cfg.site),
        sae_cfg=sae_cfg,
        lr=cfg.lr if cfg.lr is not None else default_lr(cfg.variant, d_sae, steps, batch_size),
        betas=(float(betas[0]), float(betas[1])),
        steered=steered,
        fixed_coef=float(cfg.sparsity_coef or 0.0),
        out_dir=Path(out_dir),
        objective=cfg.objective,
        init_from=str(cfg.init_from),
    )


def check_l0_targets(plans: list[MemberPlan]) -> None:
    """ConfigError when a member's L0 target is not below its width: the SAE cannot reach it (it would land far
    below it, with latents firing on every token)."""
    for p in plans:
        if p.sae_cfg.l0_target >= p.sae_cfg.d_sae:
            raise ConfigError(
                f"--l0-target {p.sae_cfg.l0_target:g} is not below the width ({p.sae_cfg.d_sae} latents at d_model "
                f"{p.sae_cfg.d_in}); lower the L0 target or widen the SAE"
            )


def check_variant_options(plans: list[MemberPlan]) -> None:
    """Let each variant validate its options by building it on the meta device: no memory is allocated, so a
    width that does not fit is left to check_memory's one-line refusal."""
    for p in plans:
        with torch.device("meta"):
            get_variant(p.sae_cfg.variant)(p.sae_cfg)


def input_scale(sample_BD: Tensor) -> float:
    """c with E||c x||^2 = 1 on the sample (Gemma Scope's unit mean squared norm)."""
    msn = float(sample_BD.double().pow(2).sum(-1).mean())
    if not math.isfinite(msn) or msn <= 0:
        raise TrainingError(f"cannot normalise: the mean squared norm of the sample is {msn}")
    return 1.0 / math.sqrt(msn)
