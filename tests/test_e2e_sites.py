"""End-to-end SAEs at resid_pre, mlp_out and attn_out (sae_cli/e2e.py `SiteTail`): the tail starts from the
residual stream before block L, block L runs with the reconstruction in place of the site's output, and the
result is the whole model's forward with that replacement; blocks 0..L-1 never run; gradients reach the
reconstruction only."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import N_LAYERS, VOCAB
from test_tail import CONTEXT, count_block_calls, make_model

from actcache.sites import ARCH_TABLE, find_blocks, hook_site
from actcache.tail import Tail
from sae_cli.e2e import SiteTail

pytestmark = pytest.mark.usefixtures("one_thread_module")

ARCHS = ("llama", "gemma2", "gpt2", "gpt_neox")
SITES = ("resid_pre", "mlp_out", "attn_out")
LAYER = 1


def run_full(model, arch, ids, site: str, replace=None):
    """(logits, the site's activation at LAYER, resid_pre LAYER) of the whole model; `replace(x)` -> the
    activation the model goes on with at the site."""
    block = find_blocks(model, arch)[LAYER]
    seen: dict[str, torch.Tensor] = {}

    def at_site(x):
        seen["site"] = x.detach().clone()
        return replace(x) if replace is not None else x

    def at_pre(x):
        seen["pre"] = x.detach().clone()

    handles = [hook_site(block, arch, "resid_pre", at_pre, replace=False)]
    handles.append(hook_site(block, arch, site, at_site, replace=True))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen["site"], seen["pre"]


@pytest.fixture(scope="module", params=ARCHS)
def case(request):
    model = make_model(request.param)
    ids = torch.randint(4, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(3))
    return request.param, model, ARCH_TABLE[request.param], ids


@pytest.mark.parametrize("site", SITES)
def test_the_spliced_tail_is_the_full_model_with_the_site_replaced(case, site: str) -> None:
    name, model, arch, ids = case
    key = (LAYER, site)
    full, act, pre = run_full(model, arch, ids, site)
    tail = SiteTail(Tail(model, arch, SiteTail.start_layer(key)), key, (LAYER, "resid_pre"), arch)
    train = torch.ones(ids.shape, dtype=torch.bool)
    train[:, 0] = False  # BOS keeps its stored activation
    calls, handles = count_block_calls(model, arch)
    try:
        with torch.no_grad():
            same = tail.head(tail.spliced(pre, train, act[train])[0])  # the identity reconstruction
            clean = tail.head(tail.clean(pre)[0])
    finally:
        for hd in handles:
            hd.remove()
    assert (same - full).abs().max().item() <= 1e-4, (name, site)
    assert (clean - full).abs().max().item() <= 1e-4, (name, site)
    assert calls[:LAYER] == [0] * LAYER and calls[LAYER:] == [2] * (N_LAYERS - LAYER)
    # a perturbed reconstruction: the full model with the same rows in place of the site's output
    g = torch.Generator().manual_seed(4)
    rows = act[train] + 0.5 * torch.randn(act[train].shape, generator=g)

    def put(x):
        out = x.clone()
        out[train] = rows
        return out

    want, _, _ = run_full(model, arch, ids, site, replace=put)
    got = tail.head(tail.spliced(pre, train, rows)[0])
    assert (got - want).abs().max().item() <= 1e-4, (name, site)
    assert (got - full).abs().max().item() > 1e-3  # the replacement matters
    # after the splice the hook is idle: the clean tail is the full model again
    with torch.no_grad():
        assert (tail.head(tail.clean(pre)[0]) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("site", ("mlp_out", "attn_out"))
def test_gradients_reach_the_reconstruction_only(case, site: str) -> None:
    name, model, arch, ids = case
    key = (LAYER, site)
    _, act, pre = run_full(model, arch, ids, site)
    tail = SiteTail(Tail(model, arch, LAYER - 1), key, (LAYER, "resid_pre"), arch)
    train = torch.ones(ids.shape, dtype=torch.bool)
    rows = act[train].clone().requires_grad_(True)
    h, _ = tail.spliced(pre, train, rows)
    torch.log_softmax(tail.head(h), -1)[..., 7].mean().backward()
    assert rows.grad is not None and rows.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_the_replacement_is_per_thread() -> None:
    """Members of a CPU sweep step on threads: one thread's replacement never reaches another's forward."""
    model, arch = make_model("llama"), ARCH_TABLE["llama"]
    ids = torch.randint(4, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(5))
    full, act, pre = run_full(model, arch, ids, "mlp_out")
    tail = SiteTail(Tail(model, arch, 0), (1, "mlp_out"), (1, "resid_pre"), arch)
    train = torch.ones(ids.shape, dtype=torch.bool)
    entered, release = threading.Event(), threading.Event()
    original = tail.tail.final_hidden

    def slow(resid, keep=()):  # hold thread A inside its spliced forward while B runs a clean one
        entered.set()
        release.wait(5)
        return original(resid, keep)

    out: dict[str, torch.Tensor] = {}

    def spliced_a():
        tail.tail.final_hidden = slow
        with torch.no_grad():
            out["a"] = tail.head(tail.spliced(pre, train, torch.zeros_like(act[train]))[0])

    t = threading.Thread(target=spliced_a)
    t.start()
    entered.wait(5)
    tail.tail.final_hidden = original
    with torch.no_grad():
        out["b"] = tail.head(original(pre)[0])  # B: no replacement of its own
    release.set()
    t.join()
    assert (out["b"] - full).abs().max().item() <= 1e-4
    assert (out["a"] - full).abs().max().item() > 1e-3


@pytest.mark.parametrize("site", ("resid_post", "mlp_out"))
def test_the_e2e_loss_of_an_identity_sae_is_zero(case, site: str) -> None:
    """For every family of the fixture: the objective with the stored activation as the reconstruction gives
    KL 0, and a step's gradient reaches the reconstruction and never the model."""
    from actcache.store import FLAG_BOS
    from sae_cli.e2e import E2EBatch, E2EObjective
    from sae_cli.objective import ObjectiveContext

    name, model, arch, ids = case
    key = (LAYER, site)
    _, act, pre = run_full(model, arch, ids, site)

    class WB:
        pass

    wb = WB()
    wb.token_ids, wb.index = ids, None
    wb.flags = torch.zeros(ids.shape, dtype=torch.uint8)
    wb.flags[:, 0] = FLAG_BOS
    wb.acts = {key: act, (LAYER, "resid_pre"): pre}
    start = key if site == "resid_post" else (LAYER, "resid_pre")
    tail = SiteTail(Tail(model, arch, SiteTail.start_layer(key)), key, start, arch)
    objective = E2EObjective({key: tail}, vocab=VOCAB)
    batch = E2EBatch.of(wb, [key])
    scale = 0.5
    x_hat = (batch.acts[key] * scale).requires_grad_(True)
    recon = objective(batch.acts[key] * scale, x_hat, ObjectiveContext(key, scale, batch, 0))
    assert abs(float(recon.parts["kl"])) <= 1e-6, name
    recon.loss.backward()
    assert x_hat.grad is not None, name
    assert all(p.grad is None for p in model.parameters())
    noisy = batch.acts[key] * scale + 0.3 * torch.randn_like(x_hat)
    assert float(objective(x_hat.detach(), noisy, ObjectiveContext(key, scale, batch, 1)).parts["kl"]) > 1e-4
