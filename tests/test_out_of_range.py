"""Tokens outside the training norm range (docs/variants.md, "Tokens outside the training range"): a run that
drops massive-norm tokens (--max-norm-ratio) records what it dropped in the SAE's own cfg.json, and every
variant's saved SAE reconstructs such a token no worse than predicting the data mean (its out-of-range rule
passes it through); `ReconstructionMetrics` reports the worst tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae_cli import io
from sae_cli.config import MemberConfig
from sae_cli.metrics import ReconstructionMetrics
from sae_cli.registry import variant_names
from tests.test_trainer import KEY, make_trainer, one_thread, sparse_acts, write_store

__all__ = ["one_thread"]  # the autouse fixture, imported so that it applies here too

MASSIVE_EVERY, MASSIVE_SCALE, RATIO = 97, 40.0, 5.0


def massive_store(tmp_path: Path, n: int = 8192, d: int = 16):
    """sparse_acts with every 97th token scaled by 40 (a massive-activation token, ~40x the median norm)."""
    x_ND = sparse_acts(n, d, 128, 4, seed=3)
    massive_N = torch.zeros(n, dtype=torch.bool)
    massive_N[5::MASSIVE_EVERY] = True
    x_ND[massive_N] *= MASSIVE_SCALE
    return write_store(tmp_path / "store", {KEY: x_ND}, chunk_tokens=512), x_ND, massive_N


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """One run, a member of every registered variant, trained with --max-norm-ratio 5 (64 steps of 256)."""
    tmp_path = tmp_path_factory.mktemp("oor")
    store, x_ND, massive_N = massive_store(tmp_path)
    members = [
        MemberConfig(variant=v, layer=0, site="resid_post", width="8x", l0_target=4, name=v)
        for v in variant_names()
    ]
    trainer, sample = make_trainer(store, tmp_path / "run", members, 256 * 64, max_norm_ratio=RATIO)
    trainer.start(sample)
    assert trainer.run().status == "done"
    assert not (sample[KEY].norm(dim=-1) > 10 * sample[KEY].norm(dim=-1).median()).any()  # filter applied
    return tmp_path / "run", x_ND, massive_N, trainer


def test_the_saved_sae_records_the_norm_filter_it_was_trained_with(trained) -> None:
    run, x_ND, massive_N, trainer = trained
    calib_N = trainer.calibration[KEY].float().norm(dim=-1)
    for name in variant_names():
        cfg = io.read_cfg(run / name)
        rec = cfg["training"]
        assert rec["max_norm_ratio"] == RATIO
        assert rec["norm_median"] == pytest.approx(float(calib_N.median()), rel=1e-6)
        assert rec["norm_max"] == pytest.approx(float(calib_N.max()), rel=1e-6)
        assert rec["norm_cutoff"] == pytest.approx(RATIO * rec["norm_median"], rel=1e-9)
        assert rec["norm_max"] <= rec["norm_cutoff"] * 1.2  # no massive token in the calibration tokens
        # the out-of-range rule is the filter's cut-off, in the SAE's own config (raw units)
        assert cfg["sae"]["passthrough_norm"] == pytest.approx(rec["norm_cutoff"], rel=1e-9)
        assert io.load_sae(run / name).cfg.passthrough_norm == pytest.approx(rec["norm_cutoff"], rel=1e-9)


@pytest.mark.parametrize("name", variant_names())
def test_every_variant_is_no_worse_than_the_mean_on_massive_tokens(trained, name: str) -> None:
    """Per-token error on the (never trained on) massive tokens <= that of predicting the data mean; the rule
    passes them (and only tokens past the cut-off) through."""
    run, x_ND, massive_N, _ = trained
    sae = io.load_sae(run / name)
    mean_D = x_ND.mean(0)
    with torch.no_grad():
        acts_BF, x_hat_BD = sae.reconstruct(x_ND)
        forward_BD = sae(x_ND)
    err_N = (x_ND - x_hat_BD).pow(2).sum(-1)
    base_N = (x_ND - mean_D).pow(2).sum(-1)
    assert bool((err_N[massive_N] <= base_N[massive_N]).all())
    passed_N = sae.passed_through(x_ND)
    assert passed_N is not None and torch.equal(
        passed_N[massive_N], torch.ones(int(massive_N.sum()), dtype=torch.bool)
    )
    assert int(passed_N[~massive_N].sum()) == 0  # typical tokens all go through the SAE
    assert torch.equal(x_hat_BD[massive_N], x_ND[massive_N]) and int((acts_BF[massive_N] != 0).sum()) == 0
    torch.testing.assert_close(forward_BD, x_hat_BD)  # the splice's path applies the rule too
    # typical tokens go through the SAE, which (64 steps) already beats the mean on them
    assert float(err_N[~massive_N].sum() / base_N[~massive_N].sum()) < 1.0, name


def test_threshold_rules_blow_up_on_massive_tokens_without_the_rule(trained) -> None:
    """Why the rule exists: without it, JumpReLU's and BatchTopK's thresholds fire many latents on a token 40x the
    norm they were trained on and reconstruct it worse than the mean; TopK fires k and stays bounded."""
    run, x_ND, massive_N, _ = trained
    base_M = (x_ND[massive_N] - x_ND.mean(0)).pow(2).sum(-1)
    ratios = {}
    for name in ("jumprelu", "batchtopk", "topk"):
        sae = io.load_sae(run / name)
        with torch.no_grad():
            acts_MF, x_hat_MD = sae.reconstruct(x_ND[massive_N], passthrough=False)
        ratios[name] = float(((x_ND[massive_N] - x_hat_MD).pow(2).sum(-1) / base_M).max())
        if name == "topk":
            assert int((acts_MF != 0).sum(-1).max()) <= 4
    assert ratios["jumprelu"] > 1 and ratios["batchtopk"] > 1, ratios
    assert ratios["topk"] < ratios["jumprelu"], ratios


def test_metrics_report_the_worst_tokens_by_hand() -> None:
    """Per-token FVU against the first batch's mean: tokens (0,0),(2,0),(0,2),(2,2) have mean (1,1) and
    ||x - mean||^2 = 2 each; reconstruction errors 0, 1, 4 (the third token, worse than the mean) and 0 (passed
    through)."""
    m = ReconstructionMetrics(2, 3)
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    x_hat = x + torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    acts = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 0]])
    m.update(x, x_hat, acts, torch.tensor([False, False, False, True]))
    r = m.result()
    assert r["fvu_token_max"] == pytest.approx(2.0)
    assert r["tokens_fvu_over_1"] == 1 and r["passed_through"] == 1
    worst = r["worst_tokens"]
    assert [w["fvu"] for w in worst[:2]] == pytest.approx([2.0, 0.5])
    assert worst[0]["norm"] == pytest.approx(2.0) and worst[0]["passed_through"] is False
    # the median norm of the batch is (2 + 2) / 2 = 2 (norms 0, 2, 2, 2.83)
    assert worst[0]["norm_over_median"] == pytest.approx(1.0)
    assert [w["fvu"] for w in worst if w["passed_through"]] == [0.0]


@pytest.mark.slow
def test_train_and_sweep_record_the_filter_with_the_token_ranges_and_eval_reports_worst_tokens(
    tmp_path: Path,
) -> None:
    """Through the CLI's run path: `sae train` and `sae sweep` with --max-norm-ratio write it, the norms and the
    token ranges into cfg.json; `sae eval` (held-out range with massive tokens) counts them as passed through,
    and with --no-passthrough reports some of them worse than the mean."""
    import json

    from typer.testing import CliRunner

    from sae_cli.cli import app

    store, x_ND, massive_N = massive_store(tmp_path, n=4096)
    common = [
        "--store",
        str(store.path),
        "--layer",
        "0",
        "--l0-target",
        "4",
        "--width",
        "4x",
        "--tokens",
        "1024",
    ]
    common += ["--batch-size", "256", "--eval-tokens", "1024", "--device", "cpu", "--max-norm-ratio", "5"]
    runner = CliRunner()
    res = runner.invoke(app, ["train", "jumprelu", *common, "--out", str(tmp_path / "solo")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app, ["sweep", "--variants", "jumprelu", *common, "--no-eval", "--out", str(tmp_path / "sw")]
    )
    assert res.exit_code == 0, res.output
    member = next((tmp_path / "sw" / "members").iterdir())
    for folder in (tmp_path / "solo", member):
        cfg = json.loads((folder / "cfg.json").read_text())
        rec = cfg["training"]
        assert (
            rec["max_norm_ratio"] == 5.0
            and rec["train_range"] == [0, 3072]
            and rec["eval_range"] == [3072, 4096]
        )
        assert cfg["sae"]["passthrough_norm"] == pytest.approx(5 * rec["norm_median"])
    n_massive = int(massive_N[3072:].sum())  # BOS positions (every 64th) are not massive: 5 + 97 j never is
    res = runner.invoke(app, ["eval", str(tmp_path / "solo"), "--no-model", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    on = json.loads((tmp_path / "solo" / "eval.json").read_text())
    assert on["passed_through"] == n_massive and on["massive_tokens"] == n_massive
    assert "worse than the mean" in res.output
    res = runner.invoke(
        app, ["eval", str(tmp_path / "solo"), "--no-model", "--device", "cpu", "--no-passthrough"]
    )
    off = json.loads((tmp_path / "solo" / "eval.json").read_text())
    assert off["passed_through"] == 0 and off["passthrough_norm"] is None
    # the typical tokens are reconstructed alike (the tokens near the mean, with no feature active, have a per-token
    # FVU above 1 in both); without the rule some massive tokens are worse than the mean too (2 of 11 here)
    assert on["tokens_fvu_over_1"] < off["tokens_fvu_over_1"] <= on["tokens_fvu_over_1"] + n_massive
    assert off["fvu"] > 10 * on["fvu"] and off["fvu_typical"] == pytest.approx(on["fvu_typical"], rel=1e-9)
