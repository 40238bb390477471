"""The end-to-end objective (Braun et al. 2024, arXiv 2405.12241): the KL divergence between the LM's next-token
distribution with and without the SAE's reconstruction spliced in, computed from the cache: only the blocks after
the SAE's layer run (`actcache.tail.Tail`), from the stored residual stream.

- `chunked_kl`: KL(p_clean || p_spliced) summed over the vocabulary, over chunks of positions, so the logits of a
  whole batch never sit in memory. Each chunk's gradient with respect to its final hidden states is computed in
  the chunk's forward (the softmax minus the clean distribution, back through the LM head) and kept ([n, d], not
  [n, vocab]); the backward multiplies it by the incoming gradient. Same numbers as a checkpointed chunk, one
  head pass fewer per chunk (nothing is recomputed at backward).
- `WindowTokens` / `E2EBatch`: the window reader's batches of whole windows as the trainer sees a batch: the
  tokens the SAE trains on (neither BOS nor padding) as `acts[key]` [N, d], and the windows themselves.
- `E2EObjective`: the `Objective` (sae_cli/objective.py) with recon part "kl".
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from actcache.store import FLAG_BOS, FLAG_PAD

from .objective import ObjectiveContext, Recon
from .variants import _common as C

Key = tuple[int, str]
Head = Callable[[Tensor], Tensor]

KL_CHUNK_BYTES = 64 << 20
"""fp32 logits of one chunk of positions (the chunk's peak is about five such tensors: logits and log-probs of
both passes and the gradient)."""


def kl_chunk_positions(vocab: int) -> int:
    """Positions per KL chunk: KL_CHUNK_BYTES of fp32 logits, at least 16."""
    return max(16, KL_CHUNK_BYTES // (4 * max(1, vocab)))


def kl_peak_bytes(vocab: int) -> int:
    """The KL's transient peak: about five [chunk, vocab] fp32 tensors (the run plan states it)."""
    return 5 * 4 * vocab * kl_chunk_positions(vocab)


def _kl_sum(logp_ref_nV: Tensor, logp_nV: Tensor) -> Tensor:
    return (logp_ref_nV.exp() * (logp_ref_nV - logp_nV)).sum()


class _ChunkKL(torch.autograd.Function):
    """KL(p_ref || p) summed over one chunk's positions and vocabulary; p = softmax(head(h)), p_ref =
    softmax(ref_head(ref)). The gradient with respect to h is computed in the forward and saved ([n, d])."""

    @staticmethod
    def forward(ctx: Any, h_nD: Tensor, ref_nD: Tensor, head: Head, ref_head: Head) -> Tensor:  # type: ignore[override]
        with torch.no_grad():
            logp_ref = F.log_softmax(ref_head(ref_nD).float(), dim=-1)
        with torch.enable_grad():
            h = h_nD.detach().requires_grad_(True)
            kl = _kl_sum(logp_ref, F.log_softmax(head(h).float(), dim=-1))
            (grad_nD,) = torch.autograd.grad(kl, h)
        ctx.save_for_backward(grad_nD)
        return kl.detach()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        (grad_nD,) = ctx.saved_tensors
        return grad_out * grad_nD, None, None, None


def chunked_kl(h_ND: Tensor, ref_ND: Tensor, head: Head, ref_head: Head, chunk: int) -> Tensor:
    """sum over positions of KL(softmax(ref_head(ref)) || softmax(head(h))), `chunk` positions at a time;
    differentiable with respect to `h_ND` (the clean side gets no gradient)."""
    grad = torch.is_grad_enabled() and h_ND.requires_grad
    total = h_ND.new_zeros((), dtype=torch.float32)
    for lo in range(0, h_ND.shape[0], chunk):
        h, ref = h_ND[lo : lo + chunk], ref_ND[lo : lo + chunk]
        if grad:
            total = total + _ChunkKL.apply(h, ref, head, ref_head)
        else:
            with torch.no_grad():
                logp_ref = F.log_softmax(ref_head(ref).float(), dim=-1)
                total = total + _kl_sum(logp_ref, F.log_softmax(head(h).float(), dim=-1))
    return total


# ---- batches of whole windows, as the trainer sees a batch --------------------------------------------------
@dataclass
class E2EBatch:
    """A batch of whole windows. `acts`, `token_ids` and `index` hold the tokens the SAE trains on (neither BOS
    nor padding), in the row-major order of `train_WC`: what the trainer reads and counts."""

    acts: dict[Key, Tensor]
    """Member key -> [N, d] raw activations of the trained tokens."""
    token_ids: Tensor
    index: Tensor | None
    windows: Any
    """The window reader's batch: acts {key: [W, C, d]} (every key the run reads), token_ids, flags [W, C]."""
    train_WC: Tensor
    """Bool: positions whose activation the reconstruction replaces (neither BOS nor padding)."""
    valid_WC: Tensor
    """Bool: real tokens (not padding)."""

    @property
    def target_WC1(self) -> Tensor:
        """Bool [W, C-1]: the predictions the KL averages over: position t whose next token t+1 is a trained
        token (as `sae eval`'s KL: not padding, not a BOS that starts a new document)."""
        return self.train_WC[:, 1:]

    @classmethod
    def of(cls, wb: Any, keys: Sequence[Key]) -> E2EBatch:
        flags = wb.flags.long()
        train = (flags & (FLAG_BOS | FLAG_PAD)) == 0
        index = getattr(wb, "index", None)
        return cls(
            acts={k: wb.acts[k][train] for k in keys},
            token_ids=wb.token_ids[train],
            index=index[train] if index is not None else None,
            windows=wb,
            train_WC=train,
            valid_WC=(flags & FLAG_PAD) == 0,
        )


class WindowTokens:
    """A window reader (actcache.reader.WindowReader) as the trainer's reader: `E2EBatch`es; the position (its
    state_dict) is the window reader's."""

    def __init__(self, windows: Any, keys: Sequence[Key]) -> None:
        self.windows, self.keys = windows, list(keys)

    def __iter__(self) -> Iterator[E2EBatch]:
        for wb in self.windows:
            yield E2EBatch.of(wb, self.keys)

    def state_dict(self) -> dict:
        return self.windows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.windows.load_state_dict(state)

    @property
    def wait_seconds(self) -> float:
        return float(getattr(self.windows, "wait_seconds", float("nan")))


# ---- where the reconstruction goes in ------------------------------------------------------------------------
class SiteTail:
    """The frozen model's tail for an SAE at `key` (layer L, site), fed from a stored array:
    - resid_post L: the tail after block L, from resid_post L; the reconstruction replaces the trained positions;
    - resid_pre L: the tail after block L-1 (every block from L), from resid_pre L, replaced the same way;
    - mlp_out / attn_out L: the tail after block L-1, from resid_pre L (or resid_post L-1): block L runs, and the
      reconstruction replaces the site's output at the trained positions (one persistent hook on the site, with
      a per-thread replacement: the members of a CPU sweep step on threads).
    `tail`: an `actcache.tail.Tail` (or anything with final_hidden / head / head_only / n_layers) built for the
    start layer (`start_layer`)."""

    def __init__(self, tail: Any, key: Key, start: Key | None = None, arch: Any = None) -> None:
        self.tail, self.key = tail, key
        self.start: Key = start if start is not None else key
        """The stored array the tail starts from (the window reader reads it)."""
        self.in_block = key[1] in ("mlp_out", "attn_out")
        self._local = threading.local()
        if self.in_block:
            from actcache.sites import hook_site

            block = tail.blocks[key[0]]
            self._handle = hook_site(block, arch, key[1], self._swap, replace=True)

    @staticmethod
    def start_layer(key: Key) -> int:
        return key[0] if key[1] == "resid_post" else key[0] - 1

    @property
    def n_layers(self) -> int:
        return int(self.tail.n_layers)

    def head(self, h: Tensor) -> Tensor:
        return self.tail.head(h)

    def head_only(self, resid: Tensor) -> Tensor:
        return self.tail.head_only(resid)

    def _swap(self, x: Tensor) -> Tensor:
        swap = getattr(self._local, "swap", None)
        if swap is None:
            return x
        train_WC, rows_ND = swap
        out = x.clone()
        out[train_WC] = rows_ND.to(out.dtype)
        return out

    def clean(self, start_WCD: Tensor, keep: Sequence[int] = ()) -> tuple[Tensor, dict[int, Tensor]]:
        """The clean tail from the stored start array (no replacement)."""
        return self.tail.final_hidden(start_WCD, keep=keep)

    def spliced(
        self, start_WCD: Tensor, train_WC: Tensor, rows_ND: Tensor, keep: Sequence[int] = ()
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """The tail with `rows_ND` (the reconstruction, model units) in place of the site's activation at the
        positions `train_WC`; differentiable with respect to `rows_ND`."""
        if not self.in_block:
            spliced = start_WCD.clone()
            spliced[train_WC] = rows_ND.to(spliced.dtype)
            return self.tail.final_hidden(spliced, keep=keep)
        self._local.swap = (train_WC, rows_ND)
        try:
            return self.tail.final_hidden(start_WCD, keep=keep)
        finally:
            self._local.swap = None


# ---- the objective ----------------------------------------------------------------------------------------
@dataclass
class _Clean:
    """What the clean model gives a batch (shared by every member of the layer)."""

    ref_ND: Tensor
    """At the predicted positions: the final hidden states (ref_head = head) or the last layer's stored
    residual (ref_head = head_only)."""
    ref_head: Head
    targets: dict[int, Tensor]
    """Downstream layer -> clean resid_post [W, C, d] (e2e+ds)."""


class E2EObjective:
    """KL(p_clean || p_spliced) averaged over the predicted positions (`E2EBatch.target_WC1`), times
    `kl_coef`, plus, for e2e+ds, `ds_coef / len(ds_layers)` times the MSE (mean over real tokens and d, in the
    model's units) between the spliced and the clean resid_post at each of `ds_layers`. Parts: "kl", "mse" (the
    local MSE, for the logs) and, with downstream layers, "ds_mse" (their unweighted mean).

    `tails`: member key -> `SiteTail` (the frozen model's tail for an SAE at that key). The clean distribution
    and the downstream targets
    of a batch are computed once and shared by the members (a small cache keyed by the batch, thread-safe: a CPU
    sweep's members run on threads, a few steps apart)."""

    name = "e2e"
    recon_part = "kl"
    CACHE = 8

    def __init__(
        self,
        tails: dict[Key, SiteTail],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        kl_coef: float = 1.0,
        ds_layers: Sequence[int] = (),
        ds_coef: float = 2.5,
        vocab: int | None = None,
    ) -> None:
        self.tails, self.device, self.dtype = tails, torch.device(device), dtype
        self.kl_coef, self.ds_layers, self.ds_coef = float(kl_coef), tuple(ds_layers), float(ds_coef)
        self.chunk = kl_chunk_positions(vocab) if vocab else 256
        if self.ds_layers:
            self.name = "e2e+ds"
        self._cache: OrderedDict[tuple[int, Key], tuple[Any, _Clean]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, x_BD: Tensor, x_hat_BD: Tensor, context: ObjectiveContext | None) -> Recon:
        mse = C.mse(x_hat_BD, x_BD)
        if context is None:  # no step (the controller's initial coefficient): the local approximation
            return Recon(mse, {"kl": mse.detach()})
        batch: E2EBatch = context.batch
        site = self.tails[context.key]
        clean = self.clean(batch, context.key)
        start = batch.windows.acts[site.start].to(self.device, self.dtype)
        train = batch.train_WC.to(self.device)
        h_WCD, kept = site.spliced(start, train, x_hat_BD / context.scale, keep=self.ds_layers)
        target = batch.target_WC1.to(self.device)
        n = int(target.sum())
        kl = chunked_kl(h_WCD[:, :-1][target], clean.ref_ND, site.head, clean.ref_head, self.chunk)
        kl = kl / n if n else kl + 0.0 * x_hat_BD.sum()  # no prediction to score: zero, still a graph
        loss = self.kl_coef * kl
        parts = {"kl": kl.detach(), "mse": mse.detach()}
        if self.ds_layers:
            valid = batch.valid_WC.to(self.device)
            ds = [
                (kept[ly].float() - clean.targets[ly].float())[valid].pow(2).mean() for ly in self.ds_layers
            ]
            loss = loss + self.ds_coef / len(ds) * sum(ds)
            parts["ds_mse"] = (sum(ds) / len(ds)).detach()
        return Recon(loss, parts)

    def clean(self, batch: E2EBatch, key: Key) -> _Clean:
        """The batch's clean side for an SAE at `key` (cached per batch and key)."""
        cache_key = (id(batch), key)
        with self._lock:
            hit = self._cache.get(cache_key)
            if hit is not None and hit[0] is batch:
                return hit[1]
            clean = self._compute_clean(batch, key)
            self._cache[cache_key] = (batch, clean)
            while len(self._cache) > self.CACHE:
                self._cache.popitem(last=False)
            return clean

    @torch.no_grad()
    def _compute_clean(self, batch: E2EBatch, key: Key) -> _Clean:
        """From the store where it holds what is needed (the last layer's resid_post: final norm + head only;
        downstream targets), else from one no-grad tail pass of the stored start array."""
        site, stored = self.tails[key], batch.windows.acts
        target = batch.target_WC1.to(self.device)
        targets = {
            ly: stored[(ly, "resid_post")].to(self.device, self.dtype)
            for ly in self.ds_layers
            if (ly, "resid_post") in stored
        }
        missing = tuple(ly for ly in self.ds_layers if ly not in targets)
        last_key = (site.n_layers - 1, "resid_post")
        if last_key in stored and not missing:
            ref = stored[last_key].to(self.device, self.dtype)[:, :-1][target]
            return _Clean(ref, site.head_only, targets)
        h_WCD, kept = site.clean(stored[site.start].to(self.device, self.dtype), keep=missing)
        targets.update({ly: kept[ly] for ly in missing})
        return _Clean(h_WCD[:, :-1][target], site.head, targets)
