"""Splice an SAE's reconstruction into the language model and measure what the model loses.

A forward hook on the module whose output is the site (actcache/sites.py: the block for resid_post, the
attention / MLP sub-module for attn_out / mlp_out) replaces that output with SAE(output); resid_pre uses a
forward pre-hook on the block that replaces its input. Positions flagged BOS (and padding) keep their original
activation: the SAE was trained without them, and the BOS residual is a fixed massive vector (methods.md).

Per window batch, three forward passes on the same token ids: clean, spliced, zero-ablated (the site's output
set to 0 at the same positions). Metrics over next-token predictions whose target is a real token (not
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

from actcache.sites import ArchSites, find_blocks, site_module

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


def _first(out: object) -> Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[index,return-value]


def _with_first(out: object, new: Tensor) -> object:
    return (new, *out[1:]) if isinstance(out, tuple) else new  # type: ignore[index]


@contextlib.contextmanager
def hook_site(
    model: nn.Module, arch: ArchSites, layer: int, site: str, replace: Replace, keep_WT: Tensor | None
) -> Iterator[dict[str, Tensor]]:
    """Within the block, the site's activation x becomes replace(x) except where keep_WT. Yields a dict that
    receives the ORIGINAL activation under "x" after each forward."""
    blocks = find_blocks(model, arch)
    block = blocks[layer]
    seen: dict[str, Tensor] = {}

    def swap(x_WTD: Tensor) -> Tensor:
        seen["x"] = x_WTD.detach()
        # SAEs take [tokens, d]; the model hands [windows, positions, d].
        new = replace(x_WTD.reshape(-1, x_WTD.shape[-1]).float()).reshape(x_WTD.shape).to(x_WTD.dtype)
        if keep_WT is not None:
            new = torch.where(keep_WT.to(x_WTD.device)[..., None], x_WTD, new)
        return new

    if site == "resid_pre":

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (swap(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": swap(kwargs["hidden_states"])}

        handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        module = site_module(block, arch, site)

        def hook(module: nn.Module, args: tuple, out: object) -> object:
            return _with_first(out, swap(_first(out)))

        handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


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
    sae_fn: Replace,
    windows: Iterable[Window],
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """delta LM loss, CE recovered, KL(clean || spliced) and the store-match error over `windows`."""
    device = next(model.parameters()).device
    s = _Sums()
    for win in windows:
        ids = win.token_ids_WT.to(device).long()
        mask = win.valid_WT.to(device).long()
        keep = win.keep_WT.to(device)
        target_ok_WT = (win.valid_WT & ~win.keep_WT)[:, 1:].to(device)
        with hook_site(model, arch, layer, site, lambda x: x, keep) as seen:
            logits_clean = model(input_ids=ids, attention_mask=mask).logits.float()
        logp_clean = F.log_softmax(logits_clean[:, :-1], dim=-1)
        del logits_clean
        if win.stored_WTD is not None and "x" in seen:
            live, stored = seen["x"].float(), win.stored_WTD.to(device).float()
            sel = ~keep & win.valid_WT.to(device)
            s.match_err += float((live - stored)[sel].pow(2).sum())
            s.match_norm += float(stored[sel].pow(2).sum())
        with hook_site(model, arch, layer, site, sae_fn, keep):
            logp_spliced = F.log_softmax(
                model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1
            )
        with hook_site(model, arch, layer, site, torch.zeros_like, keep):
            logp_zero = F.log_softmax(
                model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1
            )
        tgt = ids[:, 1:, None]
        sel = target_ok_WT
        s.ce_clean -= float(logp_clean.gather(-1, tgt).squeeze(-1)[sel].sum())
        s.ce_spliced -= float(logp_spliced.gather(-1, tgt).squeeze(-1)[sel].sum())
        s.ce_zero -= float(logp_zero.gather(-1, tgt).squeeze(-1)[sel].sum())
        kl_WT = (logp_clean.exp() * (logp_clean - logp_spliced)).sum(-1)
        s.kl += float(kl_WT[sel].sum())
        s.n += int(sel.sum())
        if progress:
            progress(int(ids.numel()))
    return _result(s)


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
