"""The splice with gradients (the seam of end-to-end SAE training) and the one site hook (actcache.sites.hook_site)
shared by the harvest and the splice, on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BOS_ID, tiny_model
from torch import nn

from actcache.sites import ARCH_TABLE, SITES, find_blocks, hook_site
from sae_cli.splice import Window, spliced_logits

pytestmark = pytest.mark.usefixtures("one_thread")
ARCH = ARCH_TABLE["llama"]


class TinySAE(nn.Module):
    def __init__(self, d: int = 64, f: int = 96) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.W_enc = nn.Parameter(torch.randn(d, f, generator=gen) / d**0.5)
        self.b_enc = nn.Parameter(torch.zeros(f))
        self.W_dec = nn.Parameter(torch.randn(f, d, generator=gen) / f**0.5)
        self.b_dec = nn.Parameter(torch.zeros(d))

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return torch.relu((x_ND - self.b_dec) @ self.W_enc + self.b_enc) @ self.W_dec + self.b_dec


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def window() -> Window:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 256, (2, 12), generator=gen)
    ids[:, 0] = BOS_ID
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[-1, -2:] = False
    return Window(ids, (ids == BOS_ID) | ~valid, valid)


@pytest.mark.parametrize("site", SITES)
def test_a_loss_through_the_splice_reaches_the_sae_and_not_the_model(model, site) -> None:
    win, sae = window(), TinySAE()
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        clean = model(input_ids=win.token_ids_WT, attention_mask=win.valid_WT.long()).logits
        no_grad = spliced_logits(model, ARCH, 1, site, sae, win, grad=False)
    assert not no_grad.requires_grad
    # grad=True lifts an enclosing no_grad (the metrics code runs under one) and freezes the model meanwhile.
    with torch.no_grad():
        logits = spliced_logits(model, ARCH, 1, site, sae, win, grad=True)
    assert logits.requires_grad
    assert torch.equal(logits.detach(), no_grad)  # the same forward, numbers unchanged
    sel = (win.valid_WT & ~win.keep_WT)[:, 1:]
    kl = F.kl_div(
        F.log_softmax(logits[:, :-1][sel], -1), F.log_softmax(clean[:, :-1][sel], -1), log_target=True,
        reduction="batchmean",
    )  # fmt: skip
    kl.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the flags are restored


def test_a_few_steps_through_the_splice_lower_the_kl(model) -> None:
    win, sae = window(), TinySAE()
    with torch.no_grad():
        clean = F.log_softmax(model(input_ids=win.token_ids_WT).logits, -1)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logp = F.log_softmax(spliced_logits(model, ARCH, 1, "resid_post", sae, win), -1)
        loss = (clean.exp() * (clean - logp)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("site", SITES)
def test_hook_site_observes_or_replaces_one_site(model, site) -> None:
    ids = window().token_ids_WT
    block = find_blocks(model, ARCH)[1]
    seen: list[torch.Tensor] = []
    handle = hook_site(block, ARCH, site, lambda x: seen.append(x.clone()), replace=False)
    try:
        with torch.no_grad():
            clean = model(input_ids=ids).logits
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].shape == (2, 12, 64)
    handle = hook_site(block, ARCH, site, lambda x: x, replace=True)
    try:
        with torch.no_grad():
            same = model(input_ids=ids).logits
    finally:
        handle.remove()
    assert torch.equal(same, clean)  # replacing by itself keeps the forward (tuple outputs kept whole)
    handle = hook_site(block, ARCH, site, torch.zeros_like, replace=True)
    try:
        with torch.no_grad():
            zeroed = model(input_ids=ids).logits
    finally:
        handle.remove()
    assert not torch.allclose(zeroed, clean)


def test_resid_post_of_a_block_is_resid_pre_of_the_next(model) -> None:
    blocks, ids, seen = find_blocks(model, ARCH), window().token_ids_WT, {}
    handles = [
        hook_site(blocks[0], ARCH, "resid_post", lambda x: seen.setdefault("post", x.clone()), replace=False),
        hook_site(blocks[1], ARCH, "resid_pre", lambda x: seen.setdefault("pre", x.clone()), replace=False),
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    assert torch.equal(seen["post"], seen["pre"])
