"""The objective seam (sae_cli/objective.py) and the variant facts that live in the variant classes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_trainer import BTK, JUMP, KEY, TOPK, make_trainer, small_store

from sae_cli.objective import MSE, ObjectiveContext, Recon, reconstruction
from sae_cli.registry import get_variant, variant_names
from sae_cli.trainer import plan_member
from sae_cli.variants.base import SAEConfig, StepState
from sae_cli.variants.batchtopk import BatchTopKSAE

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread


class TwiceMSE:
    """2 x MSE under its own part name; records what it was given."""

    name = "twice"
    recon_part = "twice"

    def __init__(self) -> None:
        self.contexts: list[ObjectiveContext | None] = []

    def __call__(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor, context: ObjectiveContext | None) -> Recon:
        self.contexts.append(context)
        loss = 2 * (x_hat_BD - x_BD).pow(2).sum(-1).mean()
        return Recon(loss, {"twice": loss.detach()})


def test_the_trainer_minimises_the_objective_it_is_given(tmp_path: Path) -> None:
    store = small_store(tmp_path)
    trainer, sample = make_trainer(store, tmp_path / "run", [TOPK, JUMP, BTK], tokens=256 * 10, log_every=1)
    objective = TwiceMSE()
    trainer.stepper = dataclasses.replace(trainer.stepper, objective=objective)
    trainer.start(sample)
    assert objective.contexts == [None]  # the steered member's initial coefficient: no step
    trainer.run()
    steps = [c for c in objective.contexts if c is not None]
    assert len(steps) == 3 * 10
    first = steps[0]
    assert first.key == KEY and first.step == 0 and first.scale == trainer.members[0].scale
    assert first.batch.index.shape == (256,)  # the reader's batch: store indices -> windows and positions
    for row in trainer.rows:
        assert "part_twice" in row and "part_mse" not in row
        if row["member"] == "jump":  # loss = 2 MSE + lambda * L0 penalty
            assert row["loss"] == pytest.approx(
                row["part_twice"] + row["sparsity_coef"] * row["part_sparsity"]
            )


def test_the_objective_option_of_the_trainer(tmp_path: Path) -> None:
    """`Trainer(objective=...)` reaches the variants; the default is MSE."""
    from sae_cli.trainer import Trainer

    store = small_store(tmp_path)
    trainer, sample = make_trainer(store, tmp_path / "run", [TOPK], tokens=256 * 2)
    assert trainer.stepper.objective is MSE
    objective = TwiceMSE()
    other = Trainer(trainer.plans, trainer.loop, trainer.reader, tmp_path / "run2", 512, objective=objective)
    other.start(sample)
    other.run()
    assert len(objective.contexts) == 2


@pytest.mark.parametrize("name", ["topk", "matryoshka"])
def test_the_default_objective_is_the_mse(name: str) -> None:
    torch.manual_seed(0)
    sae = get_variant(name)(SAEConfig(name, 8, 32, 4.0))
    x = torch.randn(64, 8)
    sae.init_from_data(x)
    plain = sae.training_loss(x, StepState(0, 1, 0.0))
    explicit = sae.training_loss(x, StepState(0, 1, 0.0, objective=MSE))
    assert torch.equal(plain.loss, explicit.loss) and plain.parts.keys() == explicit.parts.keys()
    x_hat = plain.x_hat_BD.detach()
    assert torch.equal(reconstruction(None, x, x_hat).loss, (x_hat - x).pow(2).sum(-1).mean())


def test_matryoshka_asks_the_objective_for_every_prefix() -> None:
    sae = get_variant("matryoshka")(SAEConfig("matryoshka", 8, 32, 4.0, {"prefixes": (0.25, 0.5)}))
    sae.init_from_data(torch.randn(64, 8))
    objective = TwiceMSE()
    out = sae.training_loss(torch.randn(64, 8), StepState(0, 1, 0.0, objective=objective))
    assert len(objective.contexts) == 3  # prefixes 8, 16 and the full 32
    assert {"twice", "twice_prefix8", "twice_prefix16", "aux"} <= set(out.parts)


# ---- variant facts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", variant_names())
def test_class_attributes_are_the_defaults_of_an_instance(name: str) -> None:
    """`sae variants` reads the class: it must say what an SAE built with the default options does."""
    cls = get_variant(name)
    with torch.device("meta"):
        sae = cls(SAEConfig(name, 16, 64, 4.0))
    assert sae.unit_norm_decoder == cls.unit_norm_decoder
    assert len(cls.adam_betas) == 2


def test_topk_decoder_is_free_by_default_and_betas_come_from_the_variant(tmp_path: Path) -> None:
    assert get_variant("topk").unit_norm_decoder is False
    assert get_variant("topk")(SAEConfig("topk", 8, 32, 4.0, {"decoder_norm": "unit"})).unit_norm_decoder
    assert plan_member(JUMP, 16, tmp_path).betas == (0.0, 0.999)
    assert plan_member(TOPK, 16, tmp_path).betas == (0.9, 0.999)


def test_batchtopk_sparse_path_is_declared() -> None:
    assert BatchTopKSAE.sparse_path and get_variant("mutual-choice").sparse_path
    assert not get_variant("matryoshka").sparse_path and not get_variant("feature-choice").sparse_path
    with pytest.raises(TypeError, match="sparse_path"):

        class Silent(BatchTopKSAE):  # changes the rule without saying whether the fused pass computes it
            def select(self, pre_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return super().select(pre_BF)
