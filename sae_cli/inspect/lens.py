"""What a latent writes, read from weights alone: the output tokens its decoder row promotes and suppresses most
(through the model's final norm and unembedding: the direct logit effect of the row, no forward pass), its nearest
latents by decoder cosine, and the store's tokenizer to show token ids as text."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass
class Lens:
    """Per latent the k output tokens of highest and of lowest direct logit effect, and those effects."""

    promoted_ids_FK: Tensor
    promoted_FK: Tensor
    suppressed_ids_FK: Tensor
    suppressed_FK: Tensor


def final_norm_and_unembedding(model: nn.Module, spec: Any) -> tuple[nn.Module, Tensor]:
    """The store model's final norm module and unembedding matrix [vocab, d_model] (actcache.tail finds them for
    every architecture of the site table)."""
    from actcache.models import store_arch
    from actcache.tail import Tail

    tail = Tail(model, store_arch(spec), -1)
    return tail.norm, tail.lm_head.weight


def logit_lens(W_dec_FD: Tensor, norm: nn.Module, W_U_VD: Tensor, k: int = 10, chunk: int = 512) -> Lens:
    """The direct logit effect of each decoder row: norm(d) - norm(0) (the norm's gain and centring, not its bias;
    the norm's positive scale leaves the token order as it is) times the unembedding, top and bottom k tokens.
    `chunk` latents at a time ([chunk, vocab] logits at most)."""
    p = next(norm.parameters(), W_U_VD)
    zero_D = torch.zeros(1, W_dec_FD.shape[1], dtype=p.dtype, device=p.device)
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    with torch.no_grad():
        base_D = norm(zero_D)
        for i in range(0, len(W_dec_FD), chunk):
            h_CD = norm(W_dec_FD[i : i + chunk].to(p)) - base_D
            logits_CV = (h_CD @ W_U_VD.T.to(h_CD)).float()
            top = logits_CV.topk(k, dim=1)
            bottom = logits_CV.topk(k, dim=1, largest=False)
            parts.append((top.indices, top.values, bottom.indices, bottom.values))
    return Lens(*(torch.cat([p[j] for p in parts]).cpu() for j in range(4)))


def decoder_neighbours(W_dec_FD: Tensor, k: int = 8, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """([F, k] indices, [F, k] cosines) of each latent's nearest other latents by decoder-row cosine."""
    W = W_dec_FD.float()
    W = W / W.norm(dim=1, keepdim=True).clamp(min=1e-12)
    k = min(k, len(W) - 1)
    ids, cos = [], []
    with torch.no_grad():
        for i in range(0, len(W), chunk):
            sim_CF = W[i : i + chunk] @ W.T
            sim_CF[torch.arange(len(sim_CF)), torch.arange(i, i + len(sim_CF))] = -torch.inf
            top = sim_CF.topk(k, dim=1)
            ids.append(top.indices)
            cos.append(top.values)
    return torch.cat(ids).cpu(), torch.cat(cos).cpu()


def load_tokenizer(spec: Any) -> Any:
    """The store's tokenizer (its model's; actcache.models)."""
    from actcache.models import load_tokenizer as load
    from actcache.models import resolve_model

    return load(resolve_model(spec.model, spec.revision))


def token_texts(tokenizer: Any, ids: Iterable[int]) -> dict[int, str]:
    """id -> its text (each id decoded alone; `#id` without a tokenizer); -1 (no token) is left out."""
    wanted = sorted({int(i) for i in ids} - {-1})
    if tokenizer is None:
        return {i: f"#{i}" for i in wanted}
    texts = tokenizer.batch_decode([[i] for i in wanted], skip_special_tokens=False)
    return dict(zip(wanted, texts, strict=True))
