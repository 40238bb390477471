"""Parity of the sparse threshold training path (kernels.threshold_encode_decode, sae_cli/kernels/sparse_latents.py)
with its dense reference: forward and every gradient (x, W_enc, b_enc, theta, W_dec), fp32."""

from __future__ import annotations

import pytest
import torch

from sae_cli import kernels
from sae_cli.kernels import sparse_latents as SL

B, D, F_ = 64, 24, 96


def _inputs(seed: int, theta: bool, density: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    W_enc = torch.randn(F_, D, generator=g) / D**0.5
    W_dec = torch.randn(F_, D, generator=g) / D**0.5
    pre = x @ W_enc.T
    # a per-latent bias that puts each latent's (1 - density) quantile at 0: about density*B*F active pairs
    b_enc = -pre.quantile(1 - density, dim=0)
    th = None
    if theta:
        th = torch.full((F_,), 0.05)
        b_enc = b_enc + 0.05
    ps = [x, W_enc, b_enc, W_dec] + ([th] if theta else [])
    return [p.clone().requires_grad_(True) for p in ps]


def _run(fn, params, theta: bool, bw: float, weighted: bool):
    x, W_enc, b_enc, W_dec = params[:4]
    th = params[4] if theta else None
    weight = W_dec.norm(dim=1) if weighted else None
    x_hat, l0, l1, fired = fn(x, W_enc, b_enc, th, bw, W_dec, weight)
    g = torch.Generator().manual_seed(7)
    target = torch.randn(x_hat.shape, generator=g)
    loss = (x_hat - target).pow(2).sum() + 0.3 * l0.mean() if theta else (x_hat - target).pow(2).sum()
    if l1 is not None:
        loss = loss + 0.7 * l1
    grads = torch.autograd.grad(loss, params)
    return x_hat.detach(), l0.detach(), None if l1 is None else l1.detach(), fired, grads


@pytest.mark.parametrize("theta", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_sparse_matches_dense(theta: bool, weighted: bool) -> None:
    # bandwidth wide enough that many inactive pairs sit in theta's rectangle window
    bw = 0.2
    ref = _run(kernels.threshold_encode_decode_ref, _inputs(0, theta), theta, bw, weighted)
    params = _inputs(0, theta)
    with torch.no_grad():
        x, W_enc, b_enc = params[:3]
        mask = SL.support(x @ W_enc.T + b_enc, params[4] if theta else None, bw)
        assert 0 < mask.float().mean() <= kernels.CPU_SPARSE_ENCODE_MAX_DENSITY  # the sparse path is taken
        if theta:
            window = ((x @ W_enc.T + b_enc - params[4]) / bw).abs() < 0.5
            assert window.sum() > 50  # the theta gradient is exercised on many pairs
    out = _run(kernels.threshold_encode_decode, params, theta, bw, weighted)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], ref[1])
    if weighted:
        torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[3], ref[3])
    for a, b in zip(out[4], ref[4], strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("theta", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_dense_path_matches_reference(theta: bool, weighted: bool, monkeypatch) -> None:
    """Above the sparse density (half the latents fire, as at init) the fused dense pass (threshold_dense) gives
    the reference's outputs and gradients, theta's straight-through terms included."""
    bw = 0.2
    ref = _run(kernels.threshold_encode_decode_ref, _inputs(4, theta, density=0.5), theta, bw, weighted)
    calls = []
    real = kernels.ThresholdDense.apply
    monkeypatch.setattr(kernels.ThresholdDense, "apply", lambda *a: calls.append(1) or real(*a))
    params = _inputs(4, theta, density=0.5)
    if theta:
        with torch.no_grad():
            window = ((params[0] @ params[1].T + params[2] - params[4]) / bw).abs() < 0.5
            assert window.sum() > 100  # many pairs carry theta's gradient
    out = _run(kernels.threshold_encode_decode, params, theta, bw, weighted)
    assert calls == [1]  # the fused dense pass ran
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1], ref[1])
    assert torch.equal(out[3], ref[3])
    if weighted:
        torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=1e-5)
    for a, b in zip(out[4], ref[4], strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_rows_with_no_active_latent() -> None:
    params = _inputs(1, theta=True)
    with torch.no_grad():
        params[0][:5] = 0.0  # pre = b_enc: rows 0-4 fire only where b_enc > theta (few or none)
    ref = _run(
        kernels.threshold_encode_decode_ref,
        [p.detach().clone().requires_grad_(True) for p in params],
        True,
        0.001,
        False,
    )
    out = _run(kernels.threshold_encode_decode, params, True, 0.001, False)
    assert (out[1][:5] == ref[1][:5]).all()
    assert (ref[1] == 0).any()
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out[4], ref[4], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dense_fallback_above_threshold(monkeypatch) -> None:
    calls = []
    real = SL.ThresholdEncode.apply
    monkeypatch.setattr(SL.ThresholdEncode, "apply", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(kernels.ThresholdEncode, "apply", SL.ThresholdEncode.apply)
    _run(kernels.threshold_encode_decode, _inputs(2, False, density=0.5), False, 0.001, True)
    assert calls == []  # half the latents active: dense
    _run(kernels.threshold_encode_decode, _inputs(2, False, density=0.05), False, 0.001, True)
    assert calls == [1]
    monkeypatch.setenv("SAE_KERNELS", "eager")
    _run(kernels.threshold_encode_decode, _inputs(2, False, density=0.05), False, 0.001, True)
    assert calls == [1]  # eager: the reference


def test_coo_products_with_duplicate_latents() -> None:
    g = torch.Generator().manual_seed(3)
    rows = torch.tensor([0, 0, 1, 1, 1, 3])
    cols = torch.tensor([2, 2, 0, 5, 2, 5])  # latent 2 twice in row 0; row 2 empty
    vals = torch.randn(6, generator=g)
    W = torch.randn(6, 4, generator=g)
    X = torch.randn(4, 4, generator=g)
    dense = torch.zeros(4, 6).index_put_((rows, cols), vals, accumulate=True)
    pairs = SL.Pairs(rows, cols, 4, 6)
    torch.testing.assert_close(SL.coo_combine(pairs, vals, W), dense @ W)
    torch.testing.assert_close(SL.coo_row_dots(pairs, W, X), (W[cols] * X[rows]).sum(-1))
    torch.testing.assert_close(SL.coo_scatter(pairs, vals, X), dense.T @ X)
    # the latent-major order is computed once and shared by every scatter of the step
    order = pairs.by_col()
    assert pairs.by_col() is order
    assert order[1].tolist() == [1, 0, 0, 1, 1, 3]  # rows of latents 0, 2, 2, 2, 5, 5 in token order
    torch.testing.assert_close(SL.coo_scatter(pairs, 2 * vals, X), 2 * dense.T @ X)


@pytest.mark.parametrize("name", ["batchtopk", "jumprelu", "relu", "gated"])
def test_variant_step_matches_eager(name: str, monkeypatch) -> None:
    """A variant's training_loss on the sparse path (no dead latent) against SAE_KERNELS=eager (dense): loss,
    reconstruction, fired counts and every parameter gradient."""
    from synthetic import make_sae

    torch.manual_seed(0)
    sae = make_sae(name, 16, 256, 4)
    x = torch.randn(96, 16)
    sae.init_from_data(x)
    with torch.no_grad():  # a sparse regime for the steered rules: few latents above threshold
        pre = (x - sae.b_dec_D) @ sae.W_enc_FD.T if name == "gated" else x @ sae.W_enc_FD.T
        sae.b_enc_F.copy_(-pre.quantile(0.97, dim=0))
        if name == "jumprelu":
            sae.b_enc_F.add_(0.01)
            sae.theta_F.fill_(0.01)
    out, n_fast = _step_against_eager(sae, x, kernels.CooDecode, monkeypatch)
    assert n_fast > 0  # the sparse path ran


@pytest.mark.parametrize(
    ("B", "F", "k", "sparse"), [(256, 768, 32, False), (256, 768, 32, True), (64, 96, 8, True)]
)
def test_flat_topk_matches_topk(B: int, F: int, k: int, sparse: bool) -> None:
    g = torch.Generator().manual_seed(B + F)
    v = torch.relu(torch.randn(B, F, generator=g) + torch.randn(F, generator=g))  # per-column scales
    if sparse:
        v = v * (torch.rand(B, F, generator=g) < 0.01)  # fewer positives than n: ties at 0, the plain top-k
    n = k * B
    vals, idx = kernels.flat_topk(v.flatten(), n, row_len=F)
    ref_vals, _ = v.flatten().topk(n, sorted=False)
    assert idx.unique().numel() == n
    assert torch.equal(v.flatten()[idx], vals)
    assert torch.equal(vals.sort().values, ref_vals.sort().values)


@pytest.mark.parametrize("name", ["jumprelu", "relu", "gated"])
def test_variant_dense_step_matches_eager(name: str, monkeypatch) -> None:
    """At init about half the latents fire: the fused dense pass (threshold_dense) against SAE_KERNELS=eager:
    loss, reconstruction, fired counts and every parameter gradient."""
    from synthetic import make_sae

    torch.manual_seed(0)
    sae = make_sae(name, 16, 256, 4)
    x = torch.randn(96, 16)
    sae.init_from_data(x)
    with torch.no_grad():
        if name == "jumprelu":
            sae.theta_F.fill_(0.05)  # a window of width 0.05 around 0.05: many pairs carry theta's gradient
            sae.opts = type(sae.opts)(bandwidth=0.05)
        if name == "gated":  # magnitudes apart from the gates: exp(r_mag) != 1, b_mag != b_gate
            sae.r_mag_F.normal_(0.0, 0.5)
            sae.b_mag_F.normal_(0.0, 0.2)
    fused = kernels.GatedDense if name == "gated" else kernels.ThresholdDense
    out, n_fast = _step_against_eager(sae, x, fused, monkeypatch)
    assert n_fast == 1  # the fused dense pass ran
    assert out.l0 > 0.3 * 256  # dense: above the sparse path's density


def _step_against_eager(sae, x, fast_fn, monkeypatch):
    """One training step with the fast paths, counting calls of `fast_fn.apply`, and one under SAE_KERNELS=eager:
    loss, reconstruction, fired counts and every parameter gradient agree. Returns the fast step's LossOutput and
    how many times `fast_fn` ran."""
    from sae_cli.variants.base import StepState

    state = StepState(0, 1, 0.5, dead_F=torch.zeros(sae.cfg.d_sae, dtype=torch.bool))

    def run():
        sae.zero_grad(set_to_none=True)
        out = sae.training_loss(x, state)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}

    calls = []
    real = fast_fn.apply
    monkeypatch.setattr(fast_fn, "apply", lambda *a: calls.append(1) or real(*a))
    out, grads = run()
    n_fast = len(calls)
    monkeypatch.setenv("SAE_KERNELS", "eager")
    out_ref, grads_ref = run()
    assert len(calls) == n_fast  # eager: the reference only
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.x_hat_BD, out_ref.x_hat_BD, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.fired_F, out_ref.fired_F)
    assert grads.keys() == grads_ref.keys()
    for n, g in grads_ref.items():
        assert g.abs().max() > 0, n
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=n)
    return out, n_fast
