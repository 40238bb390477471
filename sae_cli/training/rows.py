"""Metric rows: what a step adds to a member's log sums, the row of each log interval (means since the last
row), the Progress events the callback sees, and the metrics file (parquet, written atomically)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import io

if TYPE_CHECKING:
    from ..reducer import Reducer
    from .member import Member

METRICS_FILE = "metrics.parquet"


@dataclass(frozen=True)
class Progress:
    """What the callback sees: after every log interval, checkpoint and at the end."""

    event: str
    """'log', 'checkpoint', 'done' or 'interrupted'."""
    step: int
    total_steps: int
    tokens: int
    total_tokens: int
    tokens_per_s: float
    rows: list[dict[str, Any]]
    """One row per member: name, loss, parts, l0, fvu, dead_pct, lr, sparsity_coef."""


def accumulate(
    sums: dict[str, float], loss: float, l0: float, parts: dict[str, float], grad_norm: float
) -> None:
    """Add one step's host numbers (already reduced over the ranks) to a member's log sums."""
    sums["loss"] = sums.get("loss", 0.0) + loss
    sums["grad_norm_max"] = max(sums.get("grad_norm_max", 0.0), grad_norm)
    sums["l0"] = sums.get("l0", 0.0) + l0
    sums["l0_last"] = l0
    for k, v in parts.items():
        sums[f"part_{k}"] = sums.get(f"part_{k}", 0.0) + v


def batch_fvu(x_BD: Tensor, x_hat_BD: Tensor, reducer: Reducer) -> float:
    """The batch's fraction of variance unexplained; numerator and denominator summed over the ranks."""
    with torch.no_grad():
        x, x_hat = x_BD.float(), x_hat_BD.detach().float()
        total = (x - x.mean(0)).pow(2).sum()
        sums = reducer.sum_(torch.stack([(x - x_hat).pow(2).sum(), total]))
        return float(sums[0] / sums[1].clamp_min(1e-30))


def log_rows(
    members: list[Member],
    *,
    step: int,
    tokens: int,
    window: int,
    tokens_per_s: float,
    elapsed_s: float,
    data_wait_s: float,
) -> list[dict[str, Any]]:
    """One row per member with the means of its sums since the last row; the sums start over."""
    rows = []
    for m in members:
        n = max(m.n_sums, 1)
        dead_pct = 100.0 * float((m.since_fired_F >= window).float().mean())
        row = {
            "step": step,
            "tokens": tokens,
            "member": m.plan.name,
            "loss": m.sums.get("loss", math.nan) / n,
            "l0": m.sums.get("l0", math.nan) / n,
            "fvu": m.sums["fvu"] / m.sums["n_fvu"] if m.sums.get("n_fvu") else math.nan,
            "dead_pct": dead_pct,
            "grad_norm_max": m.sums.get("grad_norm_max", math.nan),
            "lr": m.sums.get("lr", math.nan),
            "sparsity_coef": m.sums.get("sparsity_coef", math.nan),
            "tokens_per_s": tokens_per_s,
            "elapsed_s": elapsed_s,
            "data_wait_s": data_wait_s,
        }
        row.update({k: v / n for k, v in m.sums.items() if k.startswith("part_")})
        rows.append(row)
        m.sums, m.n_sums = {}, 0
    return rows


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        return
    columns = list(dict.fromkeys(k for r in rows for k in r))  # every member's parts (e.g. local and e2e)
    with io.atomic_path(run_dir / METRICS_FILE) as tmp:
        pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]), tmp)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
