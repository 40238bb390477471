"""A saved SAE: fold_scale round trip, JSON + safetensors only, clear errors for damaged folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_cli.io import SAEFileError, load_densities, load_sae, save_sae
from sae_cli.registry import get_variant, variant_names
from sae_cli.variants.base import SAEConfig, StepState


@pytest.mark.parametrize("variant", variant_names())
def test_fold_scale_round_trip_gives_the_same_outputs_on_raw_data(tmp_path: Path, variant: str) -> None:
    """An SAE trained on c*x, folded and saved, maps raw x to x_hat / c of the unfolded SAE on c*x."""
    torch.manual_seed(0)
    cfg = SAEConfig(variant, d_in=12, d_sae=48, l0_target=6)
    sae = get_variant(variant)(cfg)
    c = 0.37
    x_raw = torch.randn(64, 12) * 5 + 1
    sae.init_from_data(x_raw * c)
    with torch.no_grad():  # move every parameter off its init so the test sees all of them
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if hasattr(sae, "theta_F"):
            sae.theta_F.copy_(torch.rand_like(sae.theta_F) * 0.3)
        expected_raw = sae(x_raw * c) / c
        expected_l0 = (sae.encode(x_raw * c) != 0).sum()
    sae.fold_scale(c)
    save_sae(tmp_path / "sae", sae, {"input_scale_folded": c}, freq_F=torch.linspace(0, 1, 48))
    loaded = load_sae(tmp_path / "sae")
    with torch.no_grad():
        assert torch.allclose(loaded(x_raw), expected_raw, rtol=1e-4, atol=1e-4)
        assert (loaded.encode(x_raw) != 0).sum() == expected_l0
    assert torch.equal(load_densities(tmp_path / "sae"), torch.linspace(0, 1, 48))
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == [
        "cfg.json",
        "densities.safetensors",
        "sae.safetensors",
    ]


def test_damaged_or_foreign_folders_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(SAEFileError, match="is not a trained SAE"):
        load_sae(tmp_path)
    sae = get_variant("topk")(SAEConfig("topk", 4, 8, 2))
    torch.manual_seed(0)
    sae.init_from_data(torch.randn(16, 4))  # the weights start as torch.empty: memory that may hold NaN
    save_sae(tmp_path / "a", sae)
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    cfg["sae"]["d_sae"] = 16
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFileError, match="does not match its cfg.json"):
        load_sae(tmp_path / "a")
    cfg["sae"]["variant"] = "nope"
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFileError, match="unknown SAE variant 'nope'"):
        load_sae(tmp_path / "a")
    (tmp_path / "a" / "sae.safetensors").write_bytes(b"garbage")
    cfg["sae"]["variant"] = "topk"
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFileError, match="cannot read"):
        load_sae(tmp_path / "a")


def test_topk_free_decoder_norms_compute_the_unit_sae_they_are_saved_as(tmp_path: Path) -> None:
    """decoder_norm="free" (SAELens's rescale_acts_by_decoder_norm): the rule reads the decoder rows' directions,
    so it equals a unit-norm TopK SAE with the norms moved into the encoder; folding saves exactly that SAE."""
    torch.manual_seed(0)
    free = get_variant("topk")(SAEConfig("topk", 12, 48, 4, {"decoder_norm": "free"}))
    x = torch.randn(64, 12)
    free.init_from_data(x)
    assert torch.allclose(free.W_dec_FD.norm(dim=1), torch.full((48,), 0.1))  # SAELens's init norm
    with torch.no_grad():
        free.W_dec_FD.mul_(torch.rand(48, 1) * 3 + 0.2)  # unequal row norms
        free.b_enc_F.copy_(torch.randn(48) * 0.1)
    n_F = free.W_dec_FD.norm(dim=1)
    unit = get_variant("topk")(SAEConfig("topk", 12, 48, 4, {"decoder_norm": "unit"}))
    with torch.no_grad():
        unit.W_enc_FD.copy_(free.W_enc_FD * n_F[:, None])
        unit.b_enc_F.copy_(free.b_enc_F * n_F)
        unit.W_dec_FD.copy_(free.W_dec_FD / n_F[:, None])
        unit.b_dec_D.copy_(free.b_dec_D)
        torch.testing.assert_close(free.encode(x), unit.encode(x))
        torch.testing.assert_close(free(x), unit(x))
    # free rows: no projection of the gradient, no renormalisation after the step
    free.training_loss(x, StepState(0, 10, 0.0)).loss.backward()
    g = free.W_dec_FD.grad.clone()
    free.before_optimizer_step()
    assert torch.equal(free.W_dec_FD.grad, g)
    free.after_optimizer_step()
    assert torch.allclose(free.W_dec_FD.norm(dim=1), n_F)
    c = 0.37
    with torch.no_grad():
        expected = free(x) / c
    free.fold_scale(c)
    save_sae(tmp_path / "sae", free, {"input_scale_folded": c})
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.options["decoder_norm"] == "unit"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x / c), expected, rtol=1e-4, atol=1e-4)
