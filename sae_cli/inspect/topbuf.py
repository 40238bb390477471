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


def descending_bits(key: Tensor) -> Tensor:
    """int64 in [0, 2**32) that sorts ascending as the float32 `key` sorts descending (-inf last)."""
    bits = key.float().contiguous().view(torch.int32).long()
    monotone = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # ascending with the float, in [-2**31, 2**31)
    return 2**31 - 1 - monotone


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
        (span activations [C', S] float32, span token ids [C', S] int32), computed only for the candidates that
        enter the buffer."""
        if self.n == 0 or cand.latent_C.numel() == 0:
            return
        cand = cand.take(cand.key_C > self.threshold()[cand.latent_C])
        if cand.latent_C.numel() == 0:
            return
        dev, n = cand.latent_C.device, self.n
        touched_F = torch.zeros(len(self.key_FN), dtype=torch.bool, device=dev)
        touched_F[cand.latent_C] = True
        rows_T = touched_F.nonzero().flatten()
        t = len(rows_T)
        # Old entries of the touched rows first (earlier tokens), then the candidates in token order; one stable
        # sort by (row, key descending) keeps that order among equal keys.
        row_E = torch.cat(
            [
                torch.arange(t, device=dev).repeat_interleave(n),
                (torch.cumsum(touched_F, 0) - 1)[cand.latent_C],
            ]
        )
        key_E = torch.cat([self.key_FN[rows_T].flatten(), cand.key_C])
        order = torch.sort(row_E * 2**32 + descending_bits(key_E), stable=True).indices
        row_sorted = row_E[order]
        counts_T = torch.bincount(row_sorted, minlength=t)
        rank_E = torch.arange(len(order), device=dev) - (torch.cumsum(counts_T, 0) - counts_T)[row_sorted]
        keep = rank_E < n  # every touched row keeps exactly n entries (its n old ones were offered too)
        self._scatter(order[keep], rows_T[row_sorted[keep]], rank_E[keep], rows_T, cand, payload)

    def _scatter(
        self, src: Tensor, dst_row: Tensor, dst_col: Tensor, rows_T: Tensor, cand: Candidates,
        payload: Callable[[Candidates], tuple[Tensor, Tensor]],
    ) -> None:  # fmt: skip
        """Write entry src[i] (the old entries of rows_T, then the candidates) into slot (dst_row[i], dst_col[i]).
        Only the old firings that change slot move (empty slots sort last and a row's filled slots only grow, so
        nothing else changes); the payload is computed for only the candidates that enter, in token order (the
        gather of their spans then walks the batch's rows in order)."""
        n_old = len(rows_T) * self.n
        new = src >= n_old
        old_row, old_col = rows_T[src[~new] // self.n], src[~new] % self.n
        to_row, to_col = dst_row[~new], dst_col[~new]
        move = (self.token_FN[old_row, old_col] >= 0) & ((old_row != to_row) | (old_col != to_col))
        old_row, old_col, to_row, to_col = old_row[move], old_col[move], to_row[move], to_col[move]
        cand_idx, perm = torch.sort(src[new] - n_old)
        entering = cand.take(cand_idx)
        span_CS, ids_CS = payload(entering)
        new_row, new_col = dst_row[new][perm], dst_col[new][perm]
        for name, fresh in (
            ("key_FN", entering.key_C), ("token_FN", entering.token_C), ("value_FN", entering.value_C),
            ("span_FNS", span_CS), ("ids_FNS", ids_CS),
        ):  # fmt: skip
            buf = getattr(self, name)
            buf[to_row, to_col] = buf[old_row, old_col]  # the right side is gathered before the write
            buf[new_row, new_col] = fresh.to(buf.dtype)

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
