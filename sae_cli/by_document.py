"""Per-document L0 and FVU of one SAE over the tokens it is evaluated on (`sae eval`, eval.json "by_document").

A threshold-based SAE (JumpReLU, Gated, ReLU; BatchTopK and the choice variants at inference) fires as many
latents as a text calls on: its L0 is on target on the text it was calibrated on and moves with the text
(docs/benchmarks.md, "Alive latents on 98k held-out tokens": documents of one store at 31.7-37.8 under a
threshold calibrated to 32); TopK fires exactly k on every token. Grouping the metrics by the store's `doc_ids`
shows that spread, and whether a text that fires more latents is also one the SAE reconstructs worse.

FVU per document is relative to that document's own mean (sum ||x - x_hat||^2 / sum ||x - mean_doc||^2). The
summary counts only documents with at least `MIN_TOKENS` evaluated tokens: fewer give a noisy L0."""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from torch import Tensor

from .metrics import Moments, token_sums

MIN_TOKENS = 1024
"""Documents with fewer evaluated tokens are listed but left out of the min / median / max summary."""


class DocumentMetrics:
    """`update(doc_B, x, x_hat, fired_B)` per batch (ReconstructionMetrics does it when given `doc_B`, from the
    tensors it already has), then `result()`: one row per document, in document order."""

    def __init__(self, d_in: int, device: str | torch.device = "cpu"):
        self.d_in = d_in
        self.device = torch.device(device)
        self.moments: dict[int, Moments] = {}
        self.active: dict[int, float] = {}

    @torch.no_grad()
    def update(self, doc_B: Tensor, x_BD: Tensor, x_hat_BD: Tensor, fired_B: Tensor) -> None:
        """One batch: each token's document, its activation and reconstruction (float64), how many latents fired."""
        docs, inv_B = doc_B.to(x_BD.device).unique(return_inverse=True)
        k = len(docs)
        sum_x_KD = torch.zeros(k, x_BD.shape[1], dtype=x_BD.dtype, device=x_BD.device).index_add_(
            0, inv_B, x_BD
        )
        per_token_B5 = torch.cat([token_sums(x_BD, x_hat_BD), fired_B.to(x_BD).unsqueeze(1)], 1)
        sums_K5 = torch.zeros(k, 5, dtype=x_BD.dtype, device=x_BD.device).index_add_(0, inv_B, per_token_B5)
        n_K = torch.bincount(inv_B, minlength=k).tolist()
        for i, (doc, row) in enumerate(zip(docs.tolist(), sums_K5.tolist(), strict=True)):
            m = self.moments.setdefault(doc, Moments.zeros(self.d_in, self.device))
            m.add_sums(n_K[i], sum_x_KD[i].to(self.device), *row[:4])
            self.active[doc] = self.active.get(doc, 0.0) + row[4]

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "doc": doc,
                "tokens": int(m.n),
                "l0": self.active[doc] / m.n,
                "fvu": m.fvu(),
                "rms_norm": math.sqrt(m.sum_sq / m.n),
            }
            for doc, m in sorted(self.moments.items())
        ]

    def result(self, l0_target: float = 0.0) -> dict[str, Any]:
        """{"by_document": rows, "l0_by_document": summary over documents of >= MIN_TOKENS tokens}. The summary's
        `within_5pct` counts those documents whose L0 is within 5 % of `l0_target` (when one is given)."""
        rows = self.rows()
        l0s = [r["l0"] for r in rows if r["tokens"] >= MIN_TOKENS]
        summary: dict[str, Any] = {"documents": len(l0s), "min_tokens": MIN_TOKENS}
        if l0s:
            summary.update(min=min(l0s), median=statistics.median(l0s), max=max(l0s))
            if l0_target > 0:
                summary["within_5pct"] = sum(abs(v - l0_target) <= 0.05 * l0_target for v in l0s)
        return {"by_document": rows, "l0_by_document": summary}


def describe(summary: dict[str, Any], l0_target: float = 0.0) -> str:
    """One line for `sae eval`'s table: "31.7 / 34.0 / 37.8 (3 documents of >= 1,024 tokens; 1 within 5 %)"."""
    if not summary.get("documents"):
        return f"- (no document of >= {summary.get('min_tokens', MIN_TOKENS):,} tokens)"
    text = f"{summary['min']:.2f} / {summary['median']:.2f} / {summary['max']:.2f} ({summary['documents']} "
    text += f"document{'s' if summary['documents'] != 1 else ''} of >= {summary['min_tokens']:,} tokens"
    if l0_target > 0 and "within_5pct" in summary:
        text += f"; {summary['within_5pct']} within 5 % of {l0_target:g}"
    return text + ")"
