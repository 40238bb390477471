"""AuxK for the steered variants (JumpReLU, Gated; option aux_coef): the term reaches only the dead latents."""

from __future__ import annotations

import pytest
import torch

from sae_cli.variants.base import StepState
from tests.synthetic import make_sae


@pytest.mark.parametrize("name", ["jumprelu", "gated"])
def test_auxk_moves_only_the_dead_latents_encoder_rows(name: str) -> None:
    torch.manual_seed(0)
    x_BD = torch.randn(64, 16) + 0.3
    dead_F = torch.zeros(64, dtype=torch.bool)
    dead_F[::3] = True
    grads, losses = {}, {}
    for coef in (0.0, 0.5):
        torch.manual_seed(1)
        sae = make_sae(name, 16, 64, 4, aux_coef=coef, k_aux=8)
        sae.init_from_data(x_BD)
        out = sae.training_loss(x_BD, StepState(0, 10, 0.01, dead_F=dead_F))
        out.loss.backward()
        grads[coef], losses[coef] = sae.W_enc_FD.grad.clone(), out
    key = "aux" if name == "jumprelu" else "auxk"
    aux = losses[0.5].parts[key]
    assert float(aux) > 0.1  # the residual's FVU by 8 dead latents: well above 0, at most ~1
    assert float((losses[0.5].loss - losses[0.0].loss).detach()) == pytest.approx(0.5 * float(aux), rel=1e-5)
    diff_F = (grads[0.5] - grads[0.0]).norm(dim=1)
    assert float(diff_F[~dead_F].max()) == 0.0  # alive latents: untouched by the term
    assert int((diff_F[dead_F] > 0).sum()) >= 8  # dead latents picked by some token get gradient
    assert key not in losses[0.0].parts or float(losses[0.0].parts[key]) == 0.0


def test_auxk_is_off_by_default_and_checked() -> None:
    assert make_sae("jumprelu", 16, 64, 4).opts.aux_coef == 0.0
    assert make_sae("gated", 16, 64, 4).opts.aux_coef == 0.0
    with pytest.raises(ValueError, match="aux_coef"):
        make_sae("gated", 16, 64, 4, aux_coef=-1.0)
