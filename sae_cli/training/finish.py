"""The end of a run: every SAE calibrated on the calibration tokens (batch-level rules set their inference
threshold from the final weights), the input scale folded into the weights, saved with its summary (cfg.json);
the metrics written. Only the main rank of a process group saves (the ranks hold the same weights)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import io
from ..registry import get_variant
from . import rows
from .member import ADAM_EPS

if TYPE_CHECKING:
    from ..trainer import Trainer
    from .member import Member


@dataclass(frozen=True)
class TrainResult:
    status: str
    """'done' or 'interrupted' (checkpoint written; rerun with --resume)."""
    step: int
    tokens: int
    out_dirs: list[Path]
    summaries: list[dict[str, Any]]


def norm_record(max_norm_ratio: float, x_ND: Tensor | None) -> dict[str, Any]:
    """What the SAE's record says of the token norms it was trained on: the outlier filter's ratio (0: none), and
    on the calibration tokens (raw units; the training range's tail or the normalisation sample, both read
    through the training filters) the median, 99.9th percentile and largest norm; with a filter, its cut-off
    ratio x median (the reader takes the median per group of chunks, so its cut-off varies by a few percent)."""
    rec: dict[str, Any] = {"max_norm_ratio": float(max_norm_ratio)}
    if x_ND is None or len(x_ND) == 0:
        return rec
    norm_N = x_ND.float().norm(dim=-1)
    median = float(norm_N.median())
    rec.update(
        norm_tokens=len(norm_N),
        norm_median=median,
        norm_p999=float(torch.quantile(norm_N, 0.999)) if len(norm_N) <= 1 << 24 else None,
        norm_max=float(norm_N.max()),
    )
    if max_norm_ratio > 0:
        rec["norm_cutoff"] = max_norm_ratio * median
    return rec


def summary(tr: Trainer, m: Member) -> dict[str, Any]:
    """What cfg.json records of the training of member `m`."""
    return {
        **tr.extra_summary,
        **norm_record(tr.loop.max_norm_ratio, tr.calibration.get(m.plan.key)),
        "name": m.plan.name,
        "layer": m.plan.key[0],
        "site": m.plan.key[1],
        "input_scale_folded": m.scale,
        "objective": m.plan.objective,
        **({"init_from": m.plan.init_from} if m.plan.init_from else {}),
        "tokens": tr.tokens,
        "steps": tr.step,
        "batch_size": tr.loop.batch_size,
        "lr": m.plan.lr,
        "adam_betas": list(m.plan.betas),
        "adam_eps": ADAM_EPS,
        "steered": m.plan.steered,
        "final_sparsity_coef": m.controller.coef if m.controller else m.plan.fixed_coef,
        "train_l0_ema": m.controller.l0_ema if m.controller else None,
        "dead_window_tokens": tr.window,
        "train_dead_pct": 100.0 * float((m.since_fired_F >= tr.window).float().mean()),
        "elapsed_s": tr.elapsed_s,
        "seed": tr.loop.seed,
    }


def save_member(tr: Trainer, m: Member, record: dict[str, Any]) -> None:
    """A copy of the member's SAE, calibrated, with the input scale folded in, saved to its folder."""
    sae = get_variant(m.plan.sae_cfg.variant)(m.plan.sae_cfg)
    sae.load_state_dict(m.sae.state_dict())
    sae = sae.to(tr.device)
    if tr.loop.calibrate and m.plan.key in tr.calibration:
        x_ND = tr.calibration[m.plan.key].to(tr.device).float() * m.scale
        sae.calibrate(x_ND, tr.loop.batch_size)
    sae = sae.cpu()
    sae.fold_scale(m.scale)
    if record.get("norm_cutoff") is not None:  # tokens past the filter's cut-off were never trained on
        sae.cfg = dataclasses.replace(sae.cfg, passthrough_norm=float(record["norm_cutoff"]))
    io.save_sae(m.plan.out_dir, sae, record, freq_F=m.freq_F.cpu())


def finish(tr: Trainer) -> TrainResult:
    summaries = []
    for m in tr.members:
        record = summary(tr, m)
        if tr.reducer.is_main:
            save_member(tr, m, record)
        summaries.append(record)
    if tr.reducer.is_main:
        rows.write_metrics(tr.run_dir, tr.rows)
    return TrainResult("done", tr.step, tr.tokens, [m.plan.out_dir for m in tr.members], summaries)
