"""Per-document L0 / FVU (sae_cli/by_document.py): hand-computed values, agreement with the whole-range metrics,
and the summary's counts."""

from __future__ import annotations

import pytest
import torch

from sae_cli.by_document import MIN_TOKENS, DocumentMetrics, describe
from sae_cli.metrics import ReconstructionMetrics, fvu


def test_hand_computed_l0_and_fvu_per_document() -> None:
    # Document 3: two tokens, 1 and 3 latents fire (L0 2); document 7: one token, 0 latents fire (L0 0).
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 5.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0], [5.0, 5.0]])
    acts = torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    m = DocumentMetrics(2)
    ReconstructionMetrics(2, 3, documents=m).update(x, x_hat, acts, doc_B=torch.tensor([3, 3, 7]))
    rows = m.rows()
    assert [r["doc"] for r in rows] == [3, 7] and [r["tokens"] for r in rows] == [2, 1]
    assert rows[0]["l0"] == 2.0 and rows[1]["l0"] == 0.0
    # document 3: error 1, variance about its mean (2, 0): 1 + 1 = 2 -> FVU 0.5; document 7: one token, no variance
    assert rows[0]["fvu"] == pytest.approx(0.5)
    assert rows[0]["rms_norm"] == pytest.approx(5**0.5) and rows[1]["rms_norm"] == pytest.approx(50**0.5)
    assert rows[1]["fvu"] != rows[1]["fvu"]  # NaN: undefined, never a made-up number


def test_documents_split_across_batches_match_the_whole_range_metrics() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 8, generator=g)
    x_hat = x + 0.3 * torch.randn(3000, 8, generator=g)
    acts = torch.relu(torch.randn(3000, 16, generator=g) - 0.5)
    doc = torch.repeat_interleave(torch.tensor([0, 1, 2]), torch.tensor([1500, 1100, 400]))
    whole = ReconstructionMetrics(8, 16)
    per_doc = DocumentMetrics(8)
    both = ReconstructionMetrics(8, 16, documents=per_doc)
    for sl in torch.arange(3000).split(700):  # batches straddle document boundaries
        whole.update(x[sl], x_hat[sl], acts[sl])
        both.update(x[sl], x_hat[sl], acts[sl], doc_B=doc[sl])
    out = per_doc.result(l0_target=4.0)
    rows = out["by_document"]
    assert sum(r["tokens"] for r in rows) == 3000
    mean_l0 = sum(r["l0"] * r["tokens"] for r in rows) / 3000
    assert mean_l0 == pytest.approx(whole.result()["l0"], rel=1e-12)
    for r in rows:
        sel = doc == r["doc"]
        assert r["fvu"] == pytest.approx(fvu(x[sel], x_hat[sel]), rel=1e-9)
        assert r["l0"] == pytest.approx(float((acts[sel] != 0).sum(1).double().mean()), rel=1e-12)
    summary = out["l0_by_document"]
    big = [r["l0"] for r in rows if r["tokens"] >= MIN_TOKENS]  # document 2 (400 tokens) is left out
    assert summary["documents"] == len(big) == 2
    assert summary["min"] == min(big) and summary["max"] == max(big)
    assert summary["within_5pct"] == sum(abs(v - 4.0) <= 0.2 for v in big)
    assert describe(summary, 4.0).startswith(f"{min(big):.2f} / ")


def test_describe_without_a_large_document() -> None:
    m = DocumentMetrics(2)
    ReconstructionMetrics(2, 3, documents=m).update(
        torch.ones(2, 2), torch.ones(2, 2), torch.ones(2, 3), doc_B=torch.tensor([0, 1])
    )
    summary = m.result(3.0)["l0_by_document"]
    assert summary["documents"] == 0 and "no document" in describe(summary, 3.0)


def test_the_by_doc_table_shows_the_largest_documents() -> None:
    from sae_cli.cli_eval import DOC_ROWS, document_table

    docs = [{"doc": i, "tokens": 10 + i, "l0": 4.0, "fvu": 0.1} for i in range(DOC_ROWS + 5)]
    table = document_table({"by_document": docs, "l0_target": 4.0})
    shown = [int(c) for c in table.columns[0]._cells]
    assert shown == list(range(5, DOC_ROWS + 5))  # the 5 smallest left out, store order kept
    assert "the 5 smallest of 45" in str(table.title)
