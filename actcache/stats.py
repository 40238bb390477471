"""Running per-array statistics for input normalisation: mean vector, mean squared norm, count.

The SAE trainer scales its inputs so that E||x||^2 = d_model (Conerly et al. 2024, "Update on how we train
SAEs"); the harvest accumulates these statistics chunk by chunk while it writes, so nobody has to re-read a
billion-token store to get them. Updates are merged with Chan et al.'s pairwise formula in float64, so the result
of many chunked updates equals the statistics of the concatenation (up to float64 rounding).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _as_float64(x: Any) -> np.ndarray:
    """A [N, d] float64 numpy view of a numpy array or a torch tensor (any float dtype, any device)."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().double().numpy()
    x_ND = np.asarray(x, dtype=np.float64)
    if x_ND.ndim != 2:
        raise ValueError(f"RunningStats.update expects [tokens, d_model], got shape {x_ND.shape}")
    return x_ND


@dataclass
class RunningStats:
    """Mean vector, mean squared norm and count of the rows seen so far (float64 accumulators)."""

    d_model: int
    """Width of the rows."""
    count: int = 0
    """Number of rows merged in."""
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    """[d_model] float64 running mean of the rows."""
    mean_sq_norm: float = 0.0
    """Running mean of ||x||^2 over the rows."""

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = np.zeros(self.d_model, dtype=np.float64)
        self.mean = np.asarray(self.mean, dtype=np.float64)

    def update(self, x: Any, keep: Any = None) -> RunningStats:
        """Merge the rows of x ([N, d_model] numpy or torch); `keep` ([N] bool) selects rows (e.g. not BOS)."""
        x_ND = _as_float64(x)
        if x_ND.shape[1] != self.d_model:
            raise ValueError(f"RunningStats.update: d_model {x_ND.shape[1]} != {self.d_model}")
        if keep is not None:
            keep_N = keep.detach().cpu().numpy() if hasattr(keep, "detach") else np.asarray(keep)
            x_ND = x_ND[keep_N.astype(bool)]
        n = x_ND.shape[0]
        if n == 0:
            return self
        batch = RunningStats(
            self.d_model,
            count=n,
            mean=x_ND.mean(axis=0),
            mean_sq_norm=float(np.einsum("nd,nd->", x_ND, x_ND) / n),
        )
        return self.merge(batch)

    def merge(self, other: RunningStats) -> RunningStats:
        """Merge another RunningStats in place (Chan et al. 1979 pairwise update) and return self."""
        if other.d_model != self.d_model:
            raise ValueError(f"RunningStats.merge: d_model {other.d_model} != {self.d_model}")
        if other.count == 0:
            return self
        total = self.count + other.count
        w_other = other.count / total
        self.mean = self.mean + (other.mean - self.mean) * w_other
        self.mean_sq_norm = self.mean_sq_norm + (other.mean_sq_norm - self.mean_sq_norm) * w_other
        self.count = total
        return self

    def copy(self) -> RunningStats:
        return RunningStats(self.d_model, self.count, self.mean.copy(), self.mean_sq_norm)

    def to_json(self) -> dict[str, Any]:
        """JSON form; the mean is stored as base64 of little-endian float64 (exact and ~2x smaller than text)."""
        return {
            "count": int(self.count),
            "mean_sq_norm": float(self.mean_sq_norm),
            "d_model": int(self.d_model),
            "mean_f64le_b64": base64.b64encode(self.mean.astype("<f8").tobytes()).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunningStats:
        mean = np.frombuffer(base64.b64decode(data["mean_f64le_b64"]), dtype="<f8").astype(np.float64)
        return cls(int(data["d_model"]), int(data["count"]), mean, float(data["mean_sq_norm"]))
