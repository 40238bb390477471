"""End-to-end runs beyond one resid_post SAE: an mlp_out SAE through `sae train`, the objective as a sweep axis
(`sae sweep --objective local,e2e`), and `--init-from` (fine-tuning a trained SAE; the start computes exactly what
the saved SAE computes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_e2e import harvest, one_line_error, pq_rows
from typer.testing import CliRunner

from actcache.store import Store
from sae_cli.cli import app
from sae_cli.io import load_sae

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_llama_dir: Path, tiny_corpus: Path) -> Path:
    """resid_post and mlp_out of layers 0-1 of the 4-layer tiny Llama (resid_post 0 = resid_pre 1: the start of
    an mlp_out SAE at layer 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return harvest(tiny_llama_dir, tiny_corpus, tmp_path_factory.mktemp("e2e-runs") / "store", "0,1")
    finally:
        torch.set_num_threads(before)


def train(store: Path, out: Path, *extra) -> list[str]:
    return list(map(str, ["train", "topk", "--store", store, "--layer", 1, "--width", "4x", "--l0-target", 8,
                          "--batch-size", 64, "--out", out, "--device", "cpu", "--log-every", 1, *extra]))  # fmt: skip


def test_an_mlp_out_sae_trains_end_to_end(store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = runner.invoke(app, train(store, run, "--site", "mlp_out", "--objective", "e2e", "--tokens", 192))
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "cfg.json").read_text())["training"]
    assert summary["tail_starts"] == {"mlp_out/1": "acts/resid_post/0"}
    assert summary["blocks_per_step"] == 3  # blocks 1, 2, 3 (block 1 runs with the reconstruction in it)
    rows = pq_rows(run)
    assert rows and all(r["part_kl"] >= 0 and r["l0"] == pytest.approx(8.0) for r in rows)


def test_objective_is_a_sweep_axis(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    res = runner.invoke(app, list(map(str, [
        "sweep", "--store", store, "--layer", 1, "--variants", "topk,relu", "--l0-target", 8, "--width", "4x",
        "--objective", "local,e2e", "--tokens", 192, "--batch-size", 64, "--device", "cpu", "--out", out,
        "--no-model",
    ])))  # fmt: skip
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in (out / "members").iterdir())
    assert names == sorted(
        f"{v}-L1-resid_post-w256-l0_8{s}" for v in ("topk", "relu") for s in ("", "-e2e")
    ), names
    rows = pq_rows(out)  # every member trained on the same window batches; the e2e ones logged the KL
    for name in names:
        mine = [r for r in rows if r["member"] == name]
        assert mine and all((r.get("part_kl") is not None) == name.endswith("-e2e") for r in mine), name
    import pyarrow.parquet as pq

    table = pq.read_table(out / "summary.parquet").to_pylist()
    assert sorted((r["variant"], r["objective"]) for r in table) == [
        ("relu", "e2e"),
        ("relu", "local"),
        ("topk", "e2e"),
        ("topk", "local"),
    ]


def test_init_from_starts_where_the_saved_sae_is(store: Path, tmp_path: Path) -> None:
    first = tmp_path / "local"
    assert runner.invoke(app, train(store, first, "--tokens", 192)).exit_code == 0
    tuned = tmp_path / "tuned"
    res = runner.invoke(
        app, train(store, tuned, "--init-from", first, "--objective", "e2e", "--tokens", 64, "--lr", "1e-12")
    )
    assert res.exit_code == 0, res.output
    assert "starting from the SAE in" in res.output
    a, b = load_sae(first), load_sae(tuned)
    x = torch.from_numpy(Store.open(store).read_acts(1, "resid_post", 0, 512))
    # lr ~0: the fine-tuned SAE is the saved one, whatever the new run's input scale (unfolded, refolded)
    assert torch.allclose(a(x), b(x), rtol=1e-4, atol=1e-4 * float(x.abs().max()))
    cfg = json.loads((tuned / "cfg.json").read_text())
    assert cfg["sae"]["d_sae"] == 256 and cfg["training"]["init_from"] == str(first)


def test_init_from_refusals(store: Path, tmp_path: Path) -> None:
    first = tmp_path / "local"
    assert runner.invoke(app, train(store, first, "--tokens", 128)).exit_code == 0
    run = tmp_path / "run"
    one_line_error(runner.invoke(app, [*train(store, run, "--init-from", first), "--l0-target", "9"]),
                   "trained at L0 target 8", "--l0-target 8")  # fmt: skip
    bad = train(store, run, "--init-from", first)
    bad[1] = "relu"
    one_line_error(runner.invoke(app, bad), "is a topk SAE", "train topk")
    one_line_error(
        runner.invoke(app, train(store, run, "--init-from", tmp_path)), "--init-from", "not a trained SAE"
    )
    assert not run.exists()


def test_init_from_an_imported_gemma_scope_sae(store: Path, tmp_path: Path) -> None:
    """`sae import` -> `sae train --init-from`: an imported SAE whose L0 target is unknown (0) takes the run's."""
    import numpy as np

    g = np.random.default_rng(0)
    d, f = 64, 128
    params = {
        "W_enc": g.normal(size=(d, f)).astype(np.float32) / 8, "W_dec": g.normal(size=(f, d)).astype(np.float32) / 8,
        "b_enc": np.zeros(f, np.float32), "b_dec": np.zeros(d, np.float32), "threshold": np.full(f, 0.05, np.float32),
    }  # fmt: skip
    np.savez(tmp_path / "params.npz", **params)
    imported = tmp_path / "gs"
    res = runner.invoke(app, list(map(str, [
        "import", tmp_path / "params.npz", imported, "--format", "gemmascope", "--layer", 1, "--site", "resid_post",
    ])))  # fmt: skip
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    args = train(store, run, "--init-from", imported, "--tokens", 64, "--lr", "1e-12")
    args[1] = "jumprelu"
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    cfg = json.loads((run / "cfg.json").read_text())
    assert cfg["sae"]["d_sae"] == f and cfg["sae"]["l0_target"] == 8.0
    a, b = load_sae(imported).state_dict(), load_sae(run).state_dict()
    for name in (
        "W_enc_FD",
        "W_dec_FD",
        "b_enc_F",
        "b_dec_D",
    ):  # lr ~0: the weights start and stay as imported
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name
    # (the threshold moves: JumpReLU is steered, the final trim and the calibration shift it to the target)
