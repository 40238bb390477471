"""From a finished pass to what a reader sees of each latent: plain records (numbers, token texts, contexts) that
the HTML site (html.py) and the terminal view (the CLI) both render."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .lens import Lens
from .scan import LatentScan, hist_edges
from .topbuf import TopBuffer


@dataclass
class Inspected:
    """One SAE's pass and everything read from its weights and the store's tokenizer."""

    title: str
    """A line naming the SAE, its store and token range."""
    scan: LatentScan
    texts: dict[int, str]
    """Token id -> text, for every id the records show."""
    lens: Lens | None
    """The logit lens (None: the store's model was not loaded)."""
    neighbours: tuple[Tensor, Tensor]
    """([F, k] latent ids, [F, k] decoder cosines)."""


def ids_shown(scan: LatentScan, lens: Lens | None) -> Tensor:
    """Every token id a record may show (the contexts' and the lens'), for one batch decode."""
    parts = [scan.top.ids_FNS.flatten(), scan.sample.ids_FNS.flatten()]
    if lens is not None:
        parts += [lens.promoted_ids_FK.flatten(), lens.suppressed_ids_FK.flatten()]
    return torch.unique(torch.cat([p.long() for p in parts]))


def context(buf: TopBuffer, f: int, j: int, texts: dict[int, str], before: int) -> dict[str, Any]:
    """Entry j of latent f: its store token index, activation, and the (text, activation) of every token of its
    span inside the context window; `focus`: the firing token's position in that list."""
    ids, acts = buf.ids_FNS[f, j].tolist(), buf.span_FNS[f, j].tolist()
    tokens = [(texts.get(i, f"#{i}"), a) for i, a in zip(ids, acts, strict=True) if i >= 0]
    first = next(k for k, i in enumerate(ids) if i >= 0)
    return {
        "token": int(buf.token_FN[f, j]),
        "value": float(buf.value_FN[f, j]),
        "tokens": tokens,
        "focus": before - first,
    }


def filled(buf: TopBuffer, f: int) -> int:
    return int((buf.token_FN[f] >= 0).sum())


def bands(scan: LatentScan, f: int, texts: dict[int, str], n_bands: int = 3, per_band: int = 3) -> list[dict]:
    """The sampled firings of latent f sorted by activation and cut into `n_bands` quantile bands (lowest first),
    up to `per_band` contexts spread over each."""
    n = filled(scan.sample, f)
    if n == 0:
        return []
    order = torch.argsort(scan.sample.value_FN[f, :n]).tolist()
    out = []
    for b in range(n_bands):
        lo, hi = b * n // n_bands, (b + 1) * n // n_bands
        if hi <= lo:
            continue
        picks = sorted({lo + (hi - lo - 1) * i // max(1, per_band - 1) for i in range(per_band)})
        ctxs = [context(scan.sample, f, order[p], texts, scan.cfg.before) for p in picks if p < hi]
        out.append({
            "label": f"quantile {100 * b // n_bands}-{100 * (b + 1) // n_bands} %",
            "lo": ctxs[0]["value"], "hi": ctxs[-1]["value"], "contexts": ctxs,
        })  # fmt: skip
    return out


def histogram(scan: LatentScan, f: int) -> list[tuple[float, float, int]]:
    """(lower edge, upper edge, count) of the occupied span of latent f's log2 histogram bins."""
    counts = scan.hist_FH[f]
    nz = torch.nonzero(counts).flatten()
    if len(nz) == 0:
        return []
    edges = hist_edges().tolist()
    return [(edges[i], edges[i + 1], int(counts[i])) for i in range(int(nz[0]), int(nz[-1]) + 1)]


def latent_record(x: Inspected, f: int, k_tokens: int = 10) -> dict[str, Any]:
    """Everything shown of latent f."""
    s = x.scan
    n_top = filled(s.top, f)
    rec: dict[str, Any] = {
        "id": f,
        "count": int(s.count_F[f]),
        "freq": float(s.freq_F()[f]),
        "mean": float(s.mean_F()[f]),
        "max": float(s.top.value_FN[f, 0]) if n_top else 0.0,
        "hist": histogram(s, f),
        "top": [context(s.top, f, j, x.texts, s.cfg.before) for j in range(n_top)],
        "bands": bands(s, f, x.texts),
        "neighbours": list(zip(x.neighbours[0][f].tolist(), x.neighbours[1][f].tolist(), strict=True)),
        "promoted": [],
        "suppressed": [],
    }
    if x.lens is not None:
        for name, ids, vals in (
            ("promoted", x.lens.promoted_ids_FK, x.lens.promoted_FK),
            ("suppressed", x.lens.suppressed_ids_FK, x.lens.suppressed_FK),
        ):
            pairs = zip(ids[f, :k_tokens].tolist(), vals[f, :k_tokens].tolist(), strict=True)
            rec[name] = [(x.texts.get(i, f"#{i}"), v) for i, v in pairs]
    return rec


def index_row(rec: dict[str, Any], n: int = 5) -> dict[str, Any]:
    """The index's line of a latent: its numbers, the distinct firing tokens of its top contexts, and the tokens
    its decoder promotes most."""
    seen: list[str] = []
    for c in rec["top"]:
        text = c["tokens"][c["focus"]][0]
        if text not in seen:
            seen.append(text)
    return {
        "id": rec["id"],
        "freq": rec["freq"],
        "mean": rec["mean"],
        "max": rec["max"],
        "fires_on": seen[:n],
        "promotes": [t for t, _ in rec["promoted"][:n]],
    }
