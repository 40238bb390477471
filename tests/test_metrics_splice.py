"""Splicing hooks on a tiny random Llama: identity changes nothing, zeros equal zero-ablation, BOS is kept,
and resid_post L and resid_pre L+1 are the same tensor."""

from __future__ import annotations

import pytest
import torch
from conftest import BOS_ID, tiny_model

from actcache.sites import ARCH_TABLE
from sae_cli.splice import Window, hook_site, splice_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def windows(n: int = 3, t: int = 16) -> list[Window]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 256, (n, t), generator=gen)
    ids[:, 0] = BOS_ID
    keep = ids == BOS_ID
    valid = torch.ones_like(keep)
    valid[-1, -3:] = False  # padding at the end of the last window
    keep |= ~valid
    return [Window(ids, keep, valid)]


def test_identity_changes_nothing_and_zeros_equal_zero_ablation(model) -> None:
    arch = ARCH_TABLE["llama"]
    same = splice_metrics(model, arch, 1, "resid_post", [lambda x: x], windows())[0]
    assert same["ce_spliced"] == pytest.approx(same["ce_clean"], abs=1e-6)
    assert same["kl_clean_spliced"] == pytest.approx(0.0, abs=1e-6)
    assert same["lm_tokens"] == 3 * 15 - 3  # every next-token target but the padded ones
    zero = splice_metrics(model, arch, 1, "mlp_out", [torch.zeros_like], windows())[0]
    assert zero["ce_spliced"] == pytest.approx(zero["ce_zero_ablation"], abs=1e-6)
    assert zero["ce_recovered"] == pytest.approx(0.0, abs=1e-5)
    half = splice_metrics(model, arch, 1, "resid_post", [lambda x: 0.5 * x], windows())[0]
    assert half["kl_clean_spliced"] > 1e-4


def test_bos_keeps_its_activation_and_resid_pre_is_the_previous_resid_post(model) -> None:
    arch = ARCH_TABLE["llama"]
    win = windows()[0]
    seen_inputs = []

    def record(x):
        seen_inputs.append(x.clone())
        return 2.0 * x

    with torch.no_grad(), hook_site(model, arch, 1, "resid_post", record, win.keep_WT) as seen:
        post = model(input_ids=win.token_ids_WT).logits
    assert seen_inputs[0].shape == (3 * 16, 64)  # the SAE sees [tokens, d]
    with torch.no_grad(), hook_site(model, arch, 2, "resid_pre", lambda x: 2.0 * x, win.keep_WT) as seen_pre:
        pre = model(input_ids=win.token_ids_WT).logits
    assert torch.allclose(post, pre, atol=1e-5)
    assert torch.equal(seen["x"], seen_pre["x"])
    # Doubling everything but the kept positions: position 0 (BOS) gives the clean logits.
    with torch.no_grad():
        clean = model(input_ids=win.token_ids_WT).logits
    assert torch.allclose(post[:, 0], clean[:, 0], atol=1e-6)
    assert not torch.allclose(post[:, 1], clean[:, 1], atol=1e-3)
