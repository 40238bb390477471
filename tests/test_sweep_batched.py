"""sae_cli/batched.py against the loop over members: the same losses, L0s, firing counts and gradients."""

from __future__ import annotations

import pytest
import torch

from sae_cli.batched import jumprelu_group_loss, stack_params, topk_group_loss
from sae_cli.registry import get_variant
from sae_cli.variants.base import SAEConfig, StepState

pytestmark = pytest.mark.usefixtures("one_thread")


def members(variant: str, l0s: list[float], d: int = 12, f: int = 48, seed: int = 0, **options):
    x_BD = torch.randn(64, d, generator=torch.Generator().manual_seed(seed))
    saes = []
    for i, l0 in enumerate(l0s):
        sae = get_variant(variant)(SAEConfig(variant, d, f, l0, options))
        sae.init_from_data(x_BD)
        with torch.no_grad():  # distinct members: perturb each one's weights differently
            g = torch.Generator().manual_seed(100 + i)
            for p in sae.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            if variant == "jumprelu":
                sae.theta_F.copy_(0.05 + 0.1 * torch.rand(f, generator=g))
        saes.append(sae)
    return saes, x_BD


def loop_grads(saes, x_BD, states):
    outs = []
    for sae, state in zip(saes, states, strict=True):
        sae.zero_grad(set_to_none=True)
        out = sae.training_loss(x_BD, state)
        out.loss.backward()
        outs.append(out)
    return outs


@pytest.mark.parametrize("with_dead", [False, True])
def test_topk_group_matches_the_loop(with_dead: bool) -> None:
    saes, x_BD = members("topk", [3, 7, 5], decoder_norm="unit")  # the batched step: unit-norm TopK only
    dead_MF = torch.zeros(3, 48, dtype=torch.bool)
    if with_dead:  # AuxK on: a different dead set per member
        for m in range(3):
            dead_MF[m, m * 10 : m * 10 + 12] = True
    states = [StepState(0, 10, 0.0, dead_F=dead_MF[m]) for m in range(3)]
    outs = loop_grads(saes, x_BD, states)
    p = stack_params(saes)
    group = topk_group_loss(p, x_BD, [s.k for s in saes], dead_MF, k_aux=saes[0].k_aux)
    group.loss.backward()
    for m, (sae, out) in enumerate(zip(saes, outs, strict=True)):
        assert group.loss_M[m].item() == pytest.approx(out.loss.item(), rel=1e-5)
        assert group.l0_M[m].item() == pytest.approx(out.l0.item())
        assert torch.equal(group.fired_MF[m], out.fired_F.long())
        torch.testing.assert_close(group.x_hat_MBD[m], out.x_hat_BD, rtol=1e-5, atol=1e-5)
        for name, param in sae.named_parameters():
            torch.testing.assert_close(p[name].grad[m], param.grad, rtol=1e-4, atol=1e-5, msg=name)
    if with_dead:
        assert any(float(s.W_enc_FD.grad[dead_MF[m]].abs().sum()) > 0 for m, s in enumerate(saes))


def test_jumprelu_group_matches_the_loop() -> None:
    saes, x_BD = members("jumprelu", [4, 9], bandwidth=0.1)  # wide: theta gets gradient
    coefs = [0.3, 0.05]
    outs = loop_grads(saes, x_BD, [StepState(0, 10, c) for c in coefs])
    p = stack_params(saes)
    group = jumprelu_group_loss(p, x_BD, torch.tensor(coefs), bandwidth=saes[0].opts.bandwidth)
    group.loss.backward()
    for m, (sae, out) in enumerate(zip(saes, outs, strict=True)):
        assert group.loss_M[m].item() == pytest.approx(out.loss.item(), rel=1e-5)
        assert group.l0_M[m].item() == pytest.approx(out.l0.item())
        assert 0 < out.l0.item() < 48
        assert torch.equal(group.fired_MF[m], out.fired_F.long())
        for name, param in sae.named_parameters():
            torch.testing.assert_close(p[name].grad[m], param.grad, rtol=1e-4, atol=1e-6, msg=name)
        assert float(p["theta_F"].grad[m].abs().sum()) > 0  # the straight-through estimator reached theta
    with pytest.raises(ValueError, match="equal shapes"):
        stack_params([saes[0], members("jumprelu", [4], f=24)[0][0]])
