"""Reconstruction and sparsity metrics (docs/training.md, shared methods.md "Metrics"), streamed over batches.

- L0: mean number of non-zero latents per token (inference rule).
- FVU: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (explained variance = 1 - FVU); MSE: mean ||x - x_hat||^2
  per token (summed over d_in). Both also without massive-norm tokens: a token is massive when its norm
  exceeds `massive_ratio` (10) times the median token norm, the median taken from the first batch (>= a few
  thousand tokens gives it to within a few percent; massive tokens are ~0.03 % of tokens, methods.md).
- Worst tokens: the per-token FVU ||x - x_hat||^2 / ||x - mean||^2 (1 = no better than predicting the data mean
  for that token; the mean taken from the first batch, as the median), its largest value, how many tokens exceed
  1, and the `WORST` worst tokens with their norms (in units of the median norm); tokens an SAE passed through
  (its out-of-range rule, variants/base.py) are counted.
- Dead %: share of latents that never fire on the evaluated tokens; dense %: share firing on > 10 % of them.
- Shrinkage: the relative reconstruction bias gamma = argmin_g E||x_hat / g - x||^2 = E||x_hat||^2 / E<x_hat, x>
  (Rajamanoharan et al. 2024, arXiv 2404.16014 sec. 5; Wright & Sharkey 2024): 1 = unbiased, < 1 = the
  reconstruction is shrunk towards zero (L1 penalties do this).
- Feature density histogram: log10 firing frequency per latent (PNG, matplotlib Agg).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

DENSE_FREQ = 0.1
"""A latent firing on more than this share of tokens is dense."""
WORST = 5
"""Worst tokens listed by `ReconstructionMetrics.result`."""


def fvu(x_BD: Tensor, x_hat_BD: Tensor) -> float:
    """Fraction of variance unexplained of one batch: sum ||x - x_hat||^2 / sum ||x - mean_B(x)||^2."""
    x, x_hat = x_BD.double(), x_hat_BD.double()
    total = (x - x.mean(0)).pow(2).sum()
    return float((x - x_hat).pow(2).sum() / total.clamp_min(1e-30))


def token_sums(x_BD: Tensor, x_hat_BD: Tensor) -> Tensor:
    """[B, 4] per token: ||x||^2, ||x - x_hat||^2, ||x_hat||^2, <x_hat, x> (the sums `Moments` keeps)."""
    return torch.stack(
        [
            x_BD.pow(2).sum(1),
            (x_BD - x_hat_BD).pow(2).sum(1),
            x_hat_BD.pow(2).sum(1),
            (x_hat_BD * x_BD).sum(1),
        ],
        1,
    )


@dataclass
class Moments:
    """Running sums for FVU / MSE / shrinkage over one subset of tokens (float64)."""

    n: float
    sum_x_D: Tensor
    sum_sq: float
    sum_err: float
    sum_hat_sq: float
    sum_hat_dot: float

    @classmethod
    def zeros(cls, d: int, device: torch.device) -> Moments:
        return cls(0.0, torch.zeros(d, dtype=torch.float64, device=device), 0.0, 0.0, 0.0, 0.0)

    def add(self, x_BD: Tensor, x_hat_BD: Tensor) -> None:
        self.add_sums(x_BD.shape[0], x_BD.sum(0), *token_sums(x_BD, x_hat_BD).sum(0).tolist())

    def add_sums(
        self, n: float, sum_x_D: Tensor, sum_sq: float, sum_err: float, sum_hat_sq: float, sum_hat_dot: float
    ) -> None:
        """Sums already taken over some tokens (`token_sums` summed over them)."""
        self.n += n
        self.sum_x_D += sum_x_D
        self.sum_sq += sum_sq
        self.sum_err += sum_err
        self.sum_hat_sq += sum_hat_sq
        self.sum_hat_dot += sum_hat_dot

    def fvu(self) -> float:
        if self.n == 0:
            return math.nan
        # sum ||x - mean||^2 = sum ||x||^2 - n ||mean||^2
        total = self.sum_sq - float(self.sum_x_D.pow(2).sum()) / self.n
        return self.sum_err / total if total > 0 else math.nan

    def mse(self) -> float:
        return self.sum_err / self.n if self.n else math.nan

    def shrinkage(self) -> float:
        return self.sum_hat_sq / self.sum_hat_dot if self.sum_hat_dot > 0 else math.nan


class ReconstructionMetrics:
    """Accumulates every metric over batches: `update(x, x_hat, acts)` per batch, then `result()`."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        massive_ratio: float = 10.0,
        device: str | torch.device = "cpu",
        documents: Any = None,
    ):
        self.device = torch.device(device)
        self.massive_ratio = massive_ratio
        self.threshold: float | None = None
        self.all = Moments.zeros(d_in, self.device)
        self.typical = Moments.zeros(d_in, self.device)
        self.fires_F = torch.zeros(d_sae, dtype=torch.float64, device=self.device)
        self.active = 0.0
        self.mean_D: Tensor | None = None
        self.over_one = 0
        self.passed = 0
        self.worst: list[tuple[float, float, bool]] = []
        """(per-token FVU, norm, passed through) of the worst tokens so far, worst first."""
        self.documents = documents
        """Per-document sums (sae_cli/by_document.py's DocumentMetrics), fed by `update` when given `doc_B`."""

    @torch.no_grad()
    def update(
        self,
        x_BD: Tensor,
        x_hat_BD: Tensor,
        acts_BF: Tensor,
        passed_B: Tensor | None = None,
        doc_B: Tensor | None = None,
    ) -> None:
        """One batch: tokens, reconstructions, latents; `passed_B` (bool [B]): the tokens passed through;
        `doc_B` (int [B]): each token's document, for `documents`."""
        x, x_hat = x_BD.double(), x_hat_BD.double()
        norm_B = x.norm(dim=1)
        if self.threshold is None:
            self.threshold = self.massive_ratio * float(norm_B.median())
            self.mean_D = x.mean(0)
        self._worst_tokens(x, x_hat, norm_B, passed_B)
        typical_B = norm_B <= self.threshold
        self.all.add(x, x_hat)
        self.typical.add(x[typical_B], x_hat[typical_B])
        fired_BF = acts_BF != 0
        self.fires_F += fired_BF.sum(0).double()
        fired_B = fired_BF.sum(1).double()
        self.active += float(fired_B.sum())
        if self.documents is not None and doc_B is not None:
            self.documents.update(doc_B, x, x_hat, fired_B)

    def _worst_tokens(self, x: Tensor, x_hat: Tensor, norm_B: Tensor, passed_B: Tensor | None) -> None:
        assert self.mean_D is not None
        fvu_B = (x - x_hat).pow(2).sum(1) / (x - self.mean_D).pow(2).sum(1).clamp_min(1e-30)
        self.over_one += int((fvu_B > 1).sum())
        passed_B = (
            torch.zeros_like(fvu_B, dtype=torch.bool) if passed_B is None else passed_B.to(fvu_B.device)
        )
        self.passed += int(passed_B.sum())
        top = fvu_B.topk(min(WORST, len(fvu_B))).indices.tolist()
        rows = [(float(fvu_B[i]), float(norm_B[i]), bool(passed_B[i])) for i in top]
        self.worst = sorted(self.worst + rows, key=lambda r: -r[0])[:WORST]

    def worst_result(self) -> dict:
        median = self.threshold / self.massive_ratio if self.threshold else math.nan
        return {
            "fvu_token_max": self.worst[0][0] if self.worst else math.nan,
            "tokens_fvu_over_1": self.over_one,
            "passed_through": self.passed,
            "worst_tokens": [
                {"fvu": f, "norm": n, "norm_over_median": n / median, "passed_through": p}
                for f, n, p in self.worst
            ],
        }

    def freq_F(self) -> Tensor:
        """Firing frequency per latent on the tokens seen."""
        return (self.fires_F / max(self.all.n, 1.0)).cpu()

    def result(self) -> dict[str, float]:
        n = self.all.n
        freq_F = self.freq_F()
        return {
            "tokens": int(n),
            "l0": self.active / n if n else math.nan,
            "fvu": self.all.fvu(),
            "explained_variance": 1.0 - self.all.fvu(),
            "mse": self.all.mse(),
            "fvu_typical": self.typical.fvu(),
            "mse_typical": self.typical.mse(),
            "massive_tokens": int(n - self.typical.n),
            "massive_threshold_norm": self.threshold if self.threshold is not None else math.nan,
            "dead_pct": 100.0 * float((freq_F == 0).double().mean()),
            "dense_pct": 100.0 * float((freq_F > DENSE_FREQ).double().mean()),
            "shrinkage": self.all.shrinkage(),
            **self.worst_result(),
        }


def density_histogram(freq_F: Tensor | np.ndarray, bins: int = 50) -> dict:
    """Histogram of log10 firing frequency over latents that fired; dead latents are counted apart."""
    freq = np.asarray(freq_F, dtype=np.float64)
    alive = freq[freq > 0]
    counts, edges = np.histogram(np.log10(alive), bins=bins) if alive.size else (np.zeros(0), np.zeros(0))
    return {
        "log10_edges": edges.tolist(),
        "counts": counts.astype(int).tolist(),
        "dead": int((freq == 0).sum()),
    }


def save_density_png(freq_F: Tensor | np.ndarray, path: str | Path, title: str = "") -> None:
    """Feature density histogram (log10 firing frequency) as a PNG; dead latents named in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    hist = density_histogram(freq_F)
    fig = Figure(figsize=(6, 3.5), dpi=100)  # object API on its own Agg canvas: no pyplot, no global backend
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if hist["counts"]:
        edges = np.asarray(hist["log10_edges"])
        alive = sum(hist["counts"])
        ax.stairs(hist["counts"], edges, fill=True, alpha=0.8, label=f"{alive} alive, {hist['dead']} dead")
        ax.legend(loc="upper left")
    ax.axvline(math.log10(DENSE_FREQ), color="red", lw=0.8, ls="--", label="dense (10 %)")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    from .io import atomic_path

    with atomic_path(Path(path)) as tmp:  # a failed write leaves no temporary file and names `path`
        fig.savefig(tmp, format="png")
