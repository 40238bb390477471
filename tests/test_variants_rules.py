"""Hand-checked rules of individual variants: straight-through gradients, where aux gradients go, the
allocations of the batch-level rules, the running threshold and the Zipf targets."""

from __future__ import annotations

import math

import pytest
import torch
from synthetic import make_sae, sparse_data

from sae_cli import kernels
from sae_cli.variants import _common as C
from sae_cli.variants.base import StepState

D_IN, D_SAE, K = 16, 64, 4


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def data():
    return sparse_data(D_IN, 96, 3, seed=2)


def test_jumprelu_straight_through_gradients_by_hand():
    # One token, identity encoder/decoder: pre = x = [1.0, 0.45, 0.35], theta = [0.5, 0.5, 0.3], eps = 0.2.
    # f = [1.0, 0, 0.35] (latents 0 and 2 fire). u = (pre - theta)/eps = [2.5, -0.25, 0.25]: K(u) = [0, 1, 1].
    sae = make_sae("jumprelu", 3, 3, 2, bandwidth=0.2)
    with torch.no_grad():
        sae.W_enc_FD.copy_(torch.eye(3))
        sae.W_dec_FD.copy_(torch.eye(3))
        sae.b_enc_F.zero_()
        sae.b_dec_D.copy_(torch.tensor([0.2, 0.0, -0.05]))
        sae.theta_F.copy_(torch.tensor([0.5, 0.5, 0.3]))
    x = torch.tensor([[1.0, 0.45, 0.35]])
    out = sae.training_loss(x, StepState(0, 1, sparsity_coef=0.1))
    # x_hat = f + b_dec = [1.2, 0, 0.30]; r = x_hat - x = [0.2, -0.45, -0.05]; mse = 0.04 + 0.2025 + 0.0025.
    assert float(out.parts["mse"]) == pytest.approx(0.245, abs=1e-6)
    assert float(out.parts["sparsity"]) == 2.0
    assert float(out.loss.detach()) == pytest.approx(0.245 + 0.1 * 2, abs=1e-6)
    out.loss.backward()
    # dL/df = 2r = [0.4, -0.9, -0.1]. df/dtheta = -(theta/eps) K(u) = [0, -2.5, -1.5];
    # d(lambda * L0)/dtheta = -(lambda/eps) K(u) = [0, -0.5, -0.5].
    # dL/dtheta = [0, (-0.9)(-2.5) - 0.5, (-0.1)(-1.5) - 0.5] = [0, 1.75, -0.35].
    torch.testing.assert_close(sae.theta_F.grad, torch.tensor([0.0, 1.75, -0.35]))
    # Gradient to the pre-activation passes only where f fires; the step passes none: dL/db_enc = [0.4, 0, -0.1].
    torch.testing.assert_close(sae.b_enc_F.grad, torch.tensor([0.4, 0.0, -0.1]))
    # dL/dW_dec[i] = f_i * 2r.
    r2 = torch.tensor([0.4, -0.9, -0.1])
    torch.testing.assert_close(sae.W_dec_FD.grad, torch.stack([r2, torch.zeros(3), 0.35 * r2]))


@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_auxk_gradient_reaches_dead_latents_only(name, data):
    sae = make_sae(name, D_IN, D_SAE, K, aux_coef=1.0)
    x = data.sample(128)
    sae.init_from_data(x)
    dead_F = torch.zeros(D_SAE, dtype=torch.bool)
    dead_F[::4] = True

    def grads(dead):
        sae.zero_grad(set_to_none=True)
        out = sae.training_loss(x, StepState(0, 1, 0.0, dead_F=dead))
        out.loss.backward()
        return out, sae.W_enc_FD.grad.clone(), sae.W_dec_FD.grad.clone(), sae.b_enc_F.grad.clone()

    _, enc0, dec0, benc0 = grads(None)
    out, enc1, dec1, benc1 = grads(dead_F)
    assert float(out.parts["aux"]) > 0
    aux_enc, aux_dec, aux_benc = enc1 - enc0, dec1 - dec0, benc1 - benc0
    assert torch.equal(aux_enc[~dead_F], torch.zeros_like(aux_enc[~dead_F]))
    assert torch.equal(aux_dec[~dead_F], torch.zeros_like(aux_dec[~dead_F]))
    assert torch.equal(aux_benc[~dead_F], torch.zeros_like(aux_benc[~dead_F]))
    assert (aux_enc[dead_F].norm(dim=1) > 0).float().mean() > 0.5
    assert (aux_dec[dead_F].norm(dim=1) > 0).float().mean() > 0.5


def test_auxk_loss_value_by_hand():
    # Two tokens, residual e = [[1, 0], [0, 1]] (x = e, x_hat = 0); one dead latent with encoder row [1, 0] and
    # decoder row [1, 0]: e_hat = [[1, 0], [0, 0]]. sum ||e - e_hat||^2 = 1; sum ||e - mean(e)||^2 = 4 * 0.25 = 1.
    e = torch.eye(2)
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = C.aux_residual_loss(e, W, torch.zeros(2), W, torch.tensor([True, False]), e, k_aux=1)
    assert float(loss) == pytest.approx(1.0)
    loss_both = C.aux_residual_loss(e, W, torch.zeros(2), W, torch.tensor([True, True]), e, k_aux=1)
    assert float(loss_both) == pytest.approx(0.0)
    # the form that reuses a computed [B, F] pre-activation gives the same numbers, and 0 with nothing eligible
    pre = torch.relu(e @ W.T)
    for mask, want in (([True, False], 1.0), ([True, True], 0.0), ([False, False], 0.0)):
        got = C.aux_residual_loss_from_pre(pre, torch.tensor(mask), W, e, k_aux=1)
        assert float(got) == pytest.approx(want)


def test_aux_forms_agree_on_random_data(data):
    sae = make_sae("topk", D_IN, D_SAE, K)
    x = data.sample(64)
    sae.init_from_data(x)
    x_in = x - sae.b_dec_D
    pre = torch.relu(x_in @ sae.W_enc_FD.T + sae.b_enc_F)
    elig = torch.rand(D_SAE, generator=torch.Generator().manual_seed(0)) < 0.3
    res = x - sae(x)
    a = C.aux_residual_loss(x_in, sae.W_enc_FD, sae.b_enc_F, sae.W_dec_FD, elig, res, k_aux=8)
    b = C.aux_residual_loss_from_pre(pre, elig, sae.W_dec_FD, res, k_aux=8)
    torch.testing.assert_close(a, b)


def test_aux_loss_sparse_backward_matches_eager(monkeypatch):
    """AuxK through the TopK encoder kernel (sparse backward on CPU: k_aux is 6 % of the eligible rows) against
    SAE_KERNELS=eager: the loss and the gradients of x_in, W_enc, b_enc and W_dec."""
    g = torch.Generator().manual_seed(3)
    B, D, F = 64, 24, 512
    x_in = torch.randn(B, D, generator=g)
    W_enc, W_dec = torch.randn(F, D, generator=g) / D**0.5, torch.randn(F, D, generator=g) / D**0.5
    b_enc = torch.randn(F, generator=g) * 0.1
    elig = torch.rand(F, generator=g) < 0.5
    res = torch.randn(B, D, generator=g)
    assert kernels.kernel_path("topk_encode", "cpu", 16, int(elig.sum())) == "cpu-sparse"

    def run():
        ps = [t.clone().requires_grad_(True) for t in (x_in, W_enc, b_enc, W_dec)]
        loss = C.aux_residual_loss(ps[0], ps[1], ps[2], ps[3], elig, res, k_aux=16)
        return loss.detach(), torch.autograd.grad(loss, ps)

    loss, grads = run()
    monkeypatch.setenv("SAE_KERNELS", "eager")
    loss_ref, grads_ref = run()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_ref, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert (grads[1][~elig] == 0).all() and (grads[2][~elig] == 0).all()  # only eligible rows learn


def test_batchtopk_keeps_exactly_k_times_batch(data):
    sae = make_sae("batchtopk", D_IN, D_SAE, K)
    x = data.sample(100)
    sae.init_from_data(x)
    out = sae.training_loss(x, StepState(0, 1, 0.0))
    assert int(out.fired_F.sum()) == K * 100
    assert float(out.l0) == K
    # tokens get a variable number of latents (that is the point of BatchTopK)
    per_token = (sae.select(sae.pre_acts(x - sae.b_dec_D))[0] != 0).sum(-1)
    assert per_token.min() < K < per_token.max()


def test_mutual_choice_allocation_is_batchtopk(data):
    mc = make_sae("mutual-choice", D_IN, D_SAE, K)
    bt = make_sae("batchtopk", D_IN, D_SAE, K)
    x = data.sample(64)
    mc.init_from_data(x)
    bt.load_state_dict(mc.state_dict())
    torch.testing.assert_close(
        mc.training_loss(x, StepState(0, 1, 0.0)).x_hat_BD, bt.training_loss(x, StepState(0, 1, 0.0)).x_hat_BD
    )


def test_feature_choice_no_dead_latents_and_m_tokens_each(data):
    sae = make_sae("feature-choice", D_IN, D_SAE, K)
    B = 200
    x = data.sample(B)
    sae.init_from_data(x)
    out = sae.training_loss(x, StepState(0, 1, 0.0))
    m = math.ceil(K * B / D_SAE)  # 13
    assert (out.fired_F > 0).all()
    assert int(out.fired_F.max()) == m
    assert int(out.fired_F.sum()) == pytest.approx(K * B, rel=0.1)


def test_running_threshold_is_bias_corrected_ema():
    est, n = torch.zeros(()), torch.zeros((), dtype=torch.int64)
    C.update_running(est, n, torch.tensor(2.0), decay=0.9)
    assert float(est) == pytest.approx(2.0)  # first value taken as is
    C.update_running(est, n, torch.tensor(4.0), decay=0.9)
    assert float(est) == pytest.approx((0.9 * 2.0 + 4.0) / 1.9)  # EMA weights 0.9, 1 normalised


def test_batchtopk_threshold_tracks_the_cutoff_after_a_step(data):
    sae = make_sae("batchtopk", D_IN, D_SAE, K)
    x = data.sample(64)
    sae.init_from_data(x)
    pre = sae.pre_acts(x - sae.b_dec_D).detach()
    cutoff = pre.flatten().topk(K * 64).values.min()
    sae.training_loss(x, StepState(0, 1, 0.0))
    sae.after_optimizer_step()
    assert float(sae.threshold) == pytest.approx(float(cutoff))
    assert int((sae.encode(x) != 0).sum()) == K * 64 - 1  # inference is strict: pre > theta


def test_calibrate_sets_the_pooled_cutoff_under_the_current_weights(data):
    """BatchTopK: theta = the midpoint between the (k*N)-th and (k*N+1)-th largest pre-activation of all N tokens
    (read in blocks of the batch size, which does not change it), so inference fires exactly k*N latents on them;
    one batch: inference keeps exactly its k*B training picks."""
    sae = make_sae("batchtopk", D_IN, D_SAE, K)
    x = data.sample(130)
    sae.init_from_data(x)
    pre = sae.pre_acts(x - sae.b_dec_D).detach()
    top = pre.flatten().topk(K * 130 + 1).values
    sae.calibrate(x, 50)
    assert float(sae.threshold) == pytest.approx(float(top[-2] + top[-1]) / 2)
    assert int((sae.encode(x) != 0).sum()) == K * 130
    pooled = sae.threshold.clone()
    sae.calibrate(x, 130)
    assert torch.equal(sae.threshold, pooled)
    sae.calibrate(x[:50], 50)
    torch.testing.assert_close(sae.encode(x[:50]), sae.select(pre[:50])[0])


@pytest.mark.parametrize("name", ["relu", "gated", "jumprelu"])
def test_steered_calibrate_shifts_the_margins_to_the_target_over_all_tokens(name, data):
    """Steered variants: the margins move by minus the midpoint of the n-th and (n+1)-th largest margin of all N
    tokens, n = round(target * N): the inference L0 over them is the target (n latents fire), whatever the block
    size they are read in."""
    target = 5.0
    sae = make_sae(name, D_IN, D_SAE, target)
    x = data.sample(130)
    sae.init_from_data(x)
    before = sae.firing_margin(x).detach()
    top = before.flatten().topk(round(target * 130) + 1).values
    sae.calibrate(x, 50)
    shift = -0.5 * float(top[-2] + top[-1])
    torch.testing.assert_close(sae.firing_margin(x), before + shift, rtol=0, atol=1e-5)
    assert int((sae.encode(x) != 0).sum()) == round(target * 130)


def test_feature_choice_calibrates_one_threshold_per_latent(data):
    """Default (calibrated_threshold=per-latent): the value at rank p + 1/2 of each column over all N tokens,
    p = k*N/d_sae. N = 192: p = m = 12, midway between the 12th and 13th largest, so inference keeps exactly the training rule's 12
    tokens per latent of that batch. N = 200: p = 12.5 (m = 13), the 13th largest itself, which the strict rule
    drops: 12 tokens per latent."""
    sae = make_sae("feature-choice", D_IN, D_SAE, K)
    x = data.sample(200)
    sae.init_from_data(x)
    pre = sae.pre_acts(x - sae.b_dec_D).detach()
    sae.calibrate(x[:192], 192)
    assert ((pre[:192] > 0).sum(0) > 12).sum() > D_SAE // 2
    torch.testing.assert_close(sae.encode(x[:192]), sae.select(pre[:192])[0])
    top = pre[:192].topk(13, dim=0).values
    torch.testing.assert_close(sae.threshold, (top[11] + top[12]) / 2)
    sae.calibrate(x, 200)
    torch.testing.assert_close(sae.threshold, pre.topk(13, dim=0).values[12])
    one_block = sae.threshold.clone()
    sae.calibrate(x, 64)  # pooled over blocks: the block size does not change the threshold
    assert torch.equal(sae.threshold, one_block)
    full = (pre > 0).sum(0) >= 13
    assert ((sae.encode(x) != 0).sum(0)[full] == 12).all()


def test_feature_choice_calibrates_one_global_threshold_when_told(data):
    """calibrated_threshold=global: BatchTopK's pooled cut-off in every entry, so the N tokens fire k*N latents."""
    sae = make_sae("feature-choice", D_IN, D_SAE, K, calibrated_threshold="global")
    x = data.sample(200)
    sae.init_from_data(x)
    pre = sae.pre_acts(x - sae.b_dec_D).detach()
    sae.calibrate(x, 64)
    top = pre.flatten().topk(K * 200 + 1).values
    torch.testing.assert_close(sae.threshold, ((top[-2] + top[-1]) / 2).expand(D_SAE))
    assert int((sae.encode(x) != 0).sum()) == K * 200
    with pytest.raises(ValueError, match="calibrated_threshold"):
        make_sae("feature-choice", D_IN, D_SAE, K, calibrated_threshold="per-token")


def test_zipf_targets_sum_to_the_budget_and_rank_by_frequency():
    freq = torch.tensor([0.0, 0.5, 0.1, 0.9, 0.01])
    t = C.zipf_targets(freq, budget=1.5)
    assert float(t.sum()) == pytest.approx(1.5)
    # ranks by frequency: latent 3 (r=1), 1, 2, 4, 0 (r=5); unclipped, t_r = 1.5 / H_5 / r
    h5 = sum(1 / r for r in range(1, 6))
    torch.testing.assert_close(t, 1.5 / h5 / torch.tensor([5.0, 2.0, 3.0, 1.0, 4.0]))
    # under-used: frequency below its target -> latents 0 (dead), 2 (0.1 < 0.22) and 4 (0.01 < 0.16)
    assert C.underused(freq, 1.5).tolist() == [True, False, True, False, True]
    # a large budget clips the top ranks at frequency 1 and still sums to the budget
    t = C.zipf_targets(torch.rand(50), budget=20.0)
    assert float(t.max()) == 1.0 and float(t.sum()) == pytest.approx(20.0, rel=1e-5)


def test_gated_aux_loss_does_not_train_the_decoder(data):
    sae = make_sae("gated", D_IN, D_SAE, K)
    x = data.sample(64)
    sae.init_from_data(x)
    sae.training_loss(x, StepState(0, 1, 0.0)).loss.backward()
    got = sae.W_dec_FD.grad.clone()
    sae.zero_grad()
    C.mse(sae(x), x).backward()  # the main reconstruction alone
    torch.testing.assert_close(got, sae.W_dec_FD.grad)


def test_gated_is_tied_jumprelu_like(data):
    # With r_mag = 0 and b_mag = b_gate the magnitude equals the gate: f = ReLU(pi_gate), exactly.
    sae = make_sae("gated", D_IN, D_SAE, K)
    x = data.sample(32)
    sae.init_from_data(x)
    with torch.no_grad():
        sae.b_enc_F.normal_()
        sae.b_mag_F.copy_(sae.b_enc_F)
    gate = (x - sae.b_dec_D) @ sae.W_enc_FD.T + sae.b_enc_F
    torch.testing.assert_close(sae.encode(x), torch.relu(gate))


def test_relu_penalty_weighted_by_decoder_norms():
    sae = make_sae("relu", 2, 2, 1)
    with torch.no_grad():
        sae.W_enc_FD.copy_(torch.eye(2))
        sae.W_dec_FD.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))
        sae.b_enc_F.zero_()
        sae.b_dec_D.zero_()
    x = torch.tensor([[1.0, 3.0]])
    out = sae.training_loss(x, StepState(0, 1, 0.1))
    # f = [1, 3]; penalty = 1 * 2 + 3 * 0.5 = 3.5; x_hat = [2, 1.5]; mse = 1 + 2.25
    assert float(out.parts["sparsity"]) == pytest.approx(3.5)
    assert float(out.loss.detach()) == pytest.approx(3.25 + 0.35)


def test_matryoshka_loss_is_mean_of_prefix_losses(data):
    sae = make_sae("matryoshka", D_IN, D_SAE, K, prefixes=[8, 0.5])
    assert sae.sizes == [8, 32, 64]
    x = data.sample(64)
    sae.init_from_data(x)
    out = sae.training_loss(x, StepState(0, 1, 0.0))
    acts = sae.select(sae.pre_acts(x - sae.b_dec_D))[0]
    want = [C.mse(acts[:, :m] @ sae.W_dec_FD[:m] + sae.b_dec_D, x) for m in (8, 32, 64)]
    torch.testing.assert_close(out.loss.detach(), sum(want).detach() / 3)
    torch.testing.assert_close(out.parts["mse_prefix8"], want[0].detach())


def test_jumprelu_target_threshold_init_starts_at_the_l0_target():
    """theta_init_rule="target": each latent fires on l0_target / d_sae of the init sample, so the L0 on that
    sample is the target (up to ties); the fixed rule (theta 0.001) starts near d_sae / 2."""
    torch.manual_seed(0)
    x_ND = torch.randn(512, D_IN) / math.sqrt(D_IN)  # E||x||^2 = 1, as the trainer scales it
    torch.manual_seed(1)
    target = make_sae("jumprelu", D_IN, D_SAE, K, theta_init_rule="target")
    target.init_from_data(x_ND)
    torch.manual_seed(1)
    fixed = make_sae("jumprelu", D_IN, D_SAE, K)
    fixed.init_from_data(x_ND)
    assert torch.equal(target.W_enc_FD, fixed.W_enc_FD)
    l0_target = float((target.encode(x_ND) > 0).sum(1).float().mean())
    l0_fixed = float((fixed.encode(x_ND) > 0).sum(1).float().mean())
    # r = 512 * 4 / 64 = 32 tokens per latent at or above the threshold, strictly above: 31 of 512 each
    assert l0_target == pytest.approx(D_SAE * 31 / 512, abs=1e-6)
    assert 0.4 * D_SAE < l0_fixed < 0.6 * D_SAE
    with pytest.raises(ValueError, match="theta_init_rule"):
        make_sae("jumprelu", D_IN, D_SAE, K, theta_init_rule="auto")


def test_jumprelu_target_threshold_init_in_chunks_equals_the_whole_sample(monkeypatch) -> None:
    """The quantile is taken over row chunks (memory (r + chunk) x d_sae): chunks of 7 rows, smaller than r = 32,
    give the thresholds that one top-r over the whole sample gives."""
    from sae_cli.variants import jumprelu

    torch.manual_seed(0)
    x_ND = torch.randn(512, D_IN) / math.sqrt(D_IN)
    torch.manual_seed(1)
    whole = make_sae("jumprelu", D_IN, D_SAE, K, theta_init_rule="target")
    whole.init_from_data(x_ND)
    monkeypatch.setattr(jumprelu, "THETA_INIT_CHUNK", 7)
    torch.manual_seed(1)
    chunked = make_sae("jumprelu", D_IN, D_SAE, K, theta_init_rule="target")
    chunked.init_from_data(x_ND)
    torch.testing.assert_close(chunked.theta_F, whole.theta_F, rtol=0, atol=0)
    want = whole.pre_acts(x_ND).topk(32, dim=0).values[-1].clamp(min=whole.opts.theta_init)
    torch.testing.assert_close(whole.theta_F, want, rtol=0, atol=0)
