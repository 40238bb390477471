"""A bounded best-N buffer per latent, merged a batch at a time with tensor operations only (no Python loop over
latents): the top-activating contexts of `sae inspect` (key = the activation) and its uniform sample of firings
(key = a random number: the N largest random keys of a latent's firings are a uniform sample of them without
replacement, a reservoir sample).

Each latent's row holds its entries sorted by key, best first; an unfilled slot has key -inf and token -1. A
candidate enters only if its key beats the row's N-th key (`threshold`); of equal keys the one pushed first
(the earlier token) stays ahead, so the result equals sorting every (key, token) of the latent by key
descending, then token ascending, and keeping the first N.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Candidates:
    """Firings offered to a buffer: C entries, in token order."""

    latent_C: Tensor
    """int64 latent of each entry."""
    key_C: Tensor
    """float32 ranking key (activation, or a random number)."""
    token_C: Tensor
    """int64 global store index of the token."""
    value_C: Tensor
    """float32 activation of the latent on the token."""

    def take(self, mask_C: Tensor) -> Candidates:
        return Candidates(
            self.latent_C[mask_C], self.key_C[mask_C], self.token_C[mask_C], self.value_C[mask_C]
        )


class TopBuffer:
    """The N best entries of each of `n_latents` latents, each with a payload row of `span` float32 values (the
    latent's activations on the tokens around the firing) and `span` int32 token ids."""

    def __init__(self, n_latents: int, n: int, span: int, device: str | torch.device = "cpu") -> None:
        self.n = n
        self.key_FN = torch.full((n_latents, n), -torch.inf, device=device)
        self.token_FN = torch.full((n_latents, n), -1, dtype=torch.int64, device=device)
        self.value_FN = torch.zeros(n_latents, n, device=device)
        self.span_FNS = torch.zeros(n_latents, n, span, device=device)
        self.ids_FNS = torch.full((n_latents, n, span), -1, dtype=torch.int32, device=device)

    def threshold(self) -> Tensor:
        """[F] the key a new entry must exceed (-inf while a row has a free slot)."""
        return self.key_FN[:, -1]

    def offer(self, cand: Candidates, payload: Callable[[Candidates], tuple[Tensor, Tensor]]) -> None:
        """Merge the candidates that beat their latent's threshold. `payload(kept: Candidates)` returns their
        (span activations [C', S] float32, span token ids [C', S] int32), computed only for those kept."""
        if self.n == 0 or cand.latent_C.numel() == 0:
            return
        cand = cand.take(cand.key_C > self.threshold()[cand.latent_C])
        if cand.latent_C.numel() == 0:
            return
        span_CS, ids_CS = payload(cand)
        rows_T = torch.unique(cand.latent_C)  # sorted
        t, n = len(rows_T), self.n
        # Old entries first (earlier tokens), then the candidates in token order: a stable sort keeps that order
        # among equal keys.
        dev = rows_T.device
        row_E = torch.cat(
            [torch.arange(t, device=dev).repeat_interleave(n), torch.searchsorted(rows_T, cand.latent_C)]
        )
        key_E = torch.cat([self.key_FN[rows_T].flatten(), cand.key_C])
        order = torch.sort(key_E, descending=True, stable=True).indices
        order = order[torch.sort(row_E[order], stable=True).indices]
        row_sorted = row_E[order]
        counts_T = torch.bincount(row_sorted, minlength=t)
        rank_E = torch.arange(len(order), device=dev) - (torch.cumsum(counts_T, 0) - counts_T)[row_sorted]
        keep = rank_E < n  # every touched row keeps exactly n entries (its n old ones were offered too)
        src, dst_row, dst_col = order[keep], rows_T[row_sorted[keep]], rank_E[keep]
        self._scatter(src, dst_row, dst_col, rows_T, cand, span_CS, ids_CS)

    def _scatter(
        self, src: Tensor, dst_row: Tensor, dst_col: Tensor, rows_T: Tensor, cand: Candidates, span_CS: Tensor,
        ids_CS: Tensor,
    ) -> None:  # fmt: skip
        """Write entry src[i] (old entries of rows_T first, then candidates) into slot (dst_row[i], dst_col[i])."""
        for name, new in (
            ("key_FN", cand.key_C), ("token_FN", cand.token_C), ("value_FN", cand.value_C),
            ("span_FNS", span_CS), ("ids_FNS", ids_CS),
        ):  # fmt: skip
            buf = getattr(self, name)
            old = buf[rows_T].flatten(0, 1)
            buf[dst_row, dst_col] = torch.cat([old, new.to(buf.dtype)])[src]

    def state(self, prefix: str) -> dict[str, Tensor]:
        """The buffer's tensors, named for a safetensors file."""
        return {
            f"{prefix}.{k}": getattr(self, k)
            for k in ("key_FN", "token_FN", "value_FN", "span_FNS", "ids_FNS")
        }

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], prefix: str) -> TopBuffer:
        key = tensors[f"{prefix}.key_FN"]
        buf = cls(key.shape[0], key.shape[1], tensors[f"{prefix}.span_FNS"].shape[2])
        for k in ("key_FN", "token_FN", "value_FN", "span_FNS", "ids_FNS"):
            setattr(buf, k, tensors[f"{prefix}.{k}"])
        return buf
