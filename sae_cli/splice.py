"""Splice an SAE's reconstruction into the language model and measure what the model loses.

A forward hook on the module whose output is the site (actcache/sites.py: the block for resid_post, the
attention / MLP sub-module for attn_out / mlp_out) replaces that output with SAE(output); resid_pre uses a
forward pre-hook on the block that replaces its input. Positions flagged BOS (and padding) keep their original
activation: the SAE was trained without them, and the BOS residual is a fixed massive vector (methods.md).

Per window batch, three forward passes on the same token ids: clean, spliced, zero-ablated (the site's output
set to 0 at the same positions); several SAEs of one site share the clean and zero-ablated passes. Metrics over next-token predictions whose target is a real token (not
padding, not a BOS that starts a new document):
- delta LM loss = CE_spliced - CE_clean;
- CE recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean) (1 = as good as clean, 0 = as bad as zero);
- KL(p_clean || p_spliced), mean over the same positions (nats).
The clean pass also checks that the live activations match the store's (relative error), which catches a
model/site mismatch before it shows up as a bad CE.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actcache import sites
from actcache.sites import ArchSites, find_blocks

Replace = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Window:
    """A batch of whole context windows from the store."""

    token_ids_WT: Tensor
    keep_WT: Tensor
    """Bool: positions whose original activation is kept (BOS, padding)."""
    valid_WT: Tensor
    """Bool: real tokens (not padding); the attention mask."""
    stored_WTD: Tensor | None = None
    """The store's activations at the site, for the match check (optional)."""


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """The model's parameters do not require gradients inside (a forward records no graph edge to them); their
    flags are restored on exit (a backward after it still reaches only what was not frozen)."""
    thawed = [p for p in model.parameters() if p.requires_grad]
    for p in thawed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)


@contextlib.contextmanager
def hook_site(
    model: nn.Module,
    arch: ArchSites,
    layer: int,
    site: str,
    replace: Replace,
    keep_WT: Tensor | None,
    *,
    grad: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """Within the block, the site's activation x becomes replace(x) except where keep_WT. Yields a dict that
    receives the ORIGINAL activation under "x" after each forward.

    ``grad``: forwards inside run with gradients enabled and the model frozen (`frozen`), so a loss on the logits
    backpropagates into whatever ``replace`` holds (an SAE's parameters) and never into the model's weights (the
    end-to-end objective). It cannot lift an enclosing ``torch.inference_mode``."""
    block = find_blocks(model, arch)[layer]
    seen: dict[str, Tensor] = {}

    def swap(x_WTD: Tensor) -> Tensor:
        seen["x"] = x_WTD.detach()
        # SAEs take [tokens, d]; the model hands [windows, positions, d].
        new = replace(x_WTD.reshape(-1, x_WTD.shape[-1]).float()).reshape(x_WTD.shape).to(x_WTD.dtype)
        if keep_WT is not None:
            new = torch.where(keep_WT.to(x_WTD.device)[..., None], x_WTD, new)
        return new

    handle = sites.hook_site(block, arch, site, swap, replace=True)
    try:
        if grad:
            with frozen(model), torch.enable_grad():
                yield seen
        else:
            yield seen
    finally:
        handle.remove()


def spliced_logits(
    model: nn.Module,
    arch: ArchSites,
    layer: int,
    site: str,
    replace: Replace,
    win: Window,
    *,
    grad: bool = True,
) -> Tensor:
    """The model's logits [windows, positions, vocab] on `win` with `replace` (an SAE) spliced in at the site
    (BOS and padding keep their activation). ``grad`` (default): the logits carry gradients to the SAE's
    parameters and none to the model's weights (`hook_site`)."""
    device = next(model.parameters()).device
    ids, mask = win.token_ids_WT.to(device).long(), win.valid_WT.to(device).long()
    with hook_site(model, arch, layer, site, replace, win.keep_WT.to(device), grad=grad):
        return model(input_ids=ids, attention_mask=mask).logits


@dataclass
class _Sums:
    ce_clean: float = 0.0
    ce_spliced: float = 0.0
    ce_zero: float = 0.0
    kl: float = 0.0
    n: int = 0
    match_err: float = 0.0
    match_norm: float = 0.0


@torch.no_grad()
def splice_metrics(
    model: nn.Module,
    arch: ArchSites,
    layer: int,
    site: str,
    sae_fns: list[Replace],
    windows: Iterable[Window],
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """delta LM loss, CE recovered, KL(clean || spliced) and the store-match error over `windows`, one dict per
    SAE in `sae_fns` (all of the same site). The clean and the zero-ablated passes run once per window batch and
    serve every SAE (2 + n passes instead of 3 n; a sweep's evaluation); each SAE's numbers are exactly those it
    gets alone (the same passes, summed in the same order)."""
    device = next(model.parameters()).device
    sums = [_Sums() for _ in sae_fns]
    for win in windows:
        _add_window(model, arch, layer, site, sae_fns, win, device, sums)
        if progress:
            progress(int(win.token_ids_WT.numel()))
    return [_result(s) for s in sums]


def _add_window(
    model: nn.Module,
    arch: ArchSites,
    layer: int,
    site: str,
    sae_fns: list[Replace],
    win: Window,
    device: torch.device,
    sums: list[_Sums],
) -> None:
    """One window batch: the clean and zero-ablated passes once, a spliced pass per SAE, into `sums`."""
    ids = win.token_ids_WT.to(device).long()
    mask = win.valid_WT.to(device).long()
    keep = win.keep_WT.to(device)
    sel = (win.valid_WT & ~win.keep_WT)[:, 1:].to(device)
    tgt = ids[:, 1:, None]

    def logp(replace: Replace) -> tuple[Tensor, dict[str, Tensor]]:
        with hook_site(model, arch, layer, site, replace, keep) as seen:
            logits = model(input_ids=ids, attention_mask=mask).logits
        return F.log_softmax(logits[:, :-1].float(), dim=-1), seen

    def ce(logp_WTV: Tensor) -> float:
        return -float(logp_WTV.gather(-1, tgt).squeeze(-1)[sel].sum())

    logp_clean, seen = logp(lambda x: x)
    ce_clean, ce_zero = ce(logp_clean), ce(logp(torch.zeros_like)[0])
    match_err = match_norm = 0.0
    if win.stored_WTD is not None and "x" in seen:
        live, stored = seen["x"].float(), win.stored_WTD.to(device).float()
        on = ~keep & win.valid_WT.to(device)
        match_err, match_norm = float((live - stored)[on].pow(2).sum()), float(stored[on].pow(2).sum())
    p_clean = logp_clean.exp()
    n = int(sel.sum())
    for s, sae_fn in zip(sums, sae_fns, strict=True):
        logp_spliced = logp(sae_fn)[0]
        s.ce_clean += ce_clean
        s.ce_zero += ce_zero
        s.ce_spliced += ce(logp_spliced)
        s.kl += float((p_clean * (logp_clean - logp_spliced)).sum(-1)[sel].sum())
        s.n += n
        s.match_err += match_err
        s.match_norm += match_norm


def _result(s: _Sums) -> dict[str, float]:
    if s.n == 0:
        return {}
    ce_clean, ce_spliced, ce_zero = s.ce_clean / s.n, s.ce_spliced / s.n, s.ce_zero / s.n
    gap = ce_zero - ce_clean
    return {
        "lm_tokens": s.n,
        "ce_clean": ce_clean,
        "ce_spliced": ce_spliced,
        "ce_zero_ablation": ce_zero,
        "delta_lm_loss": ce_spliced - ce_clean,
        "ce_recovered": (ce_zero - ce_spliced) / gap if gap > 0 else math.nan,
        "kl_clean_spliced": s.kl / s.n,
        "site_match_rel_err": math.sqrt(s.match_err / s.match_norm) if s.match_norm > 0 else math.nan,
    }
