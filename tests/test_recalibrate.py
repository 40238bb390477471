"""`sae calibrate` (sae_cli/recalibrate.py): the L0 lands on its target on the calibration tokens, only the
thresholds change, `sae eval --other-store` then skips those tokens, and every bad input is a one-line error that
writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_reliability_sae import TRAIN, invoke, one_line_error

from actcache.store import make_synthetic_store
from sae_cli import data, io

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Store s0 (training), s1 (another 'text': other content, its activations scaled by 1.5 so that the training
    threshold fires more there), a BatchTopK, a JumpReLU and a TopK run on s0."""
    root = tmp_path_factory.mktemp("recal")
    make_synthetic_store(root / "s0", tokens=4096, d_model=16, context=64, seed=0)
    make_synthetic_store(root / "s1", tokens=4096, d_model=16, context=64, seed=1, scale=1.5)
    out = {"s0": root / "s0", "s1": root / "s1"}
    for variant in ("batchtopk", "jumprelu", "topk"):
        res = invoke("train", variant, "--store", out["s0"], *TRAIN, "--out", root / variant)
        assert res.exit_code == 0, res.output
        out[variant] = root / variant
    return out


def l0_on(run: Path, store: Path, lo: int, hi: int) -> float:
    sae = io.load_sae(run)
    x = torch.cat(list(data.eval_batches(data.open_store(store), (0, "resid_post"), (lo, hi), 512, True)))
    with torch.no_grad():
        return float((sae.encode(x) != 0).sum(-1).double().mean())


@pytest.mark.parametrize("variant", ["batchtopk", "jumprelu"])
def test_calibrating_on_another_store_lands_the_l0_there(setup, tmp_path: Path, variant: str) -> None:
    out = tmp_path / "out"
    run = setup[variant]
    res = invoke("eval", run, "--store", setup["s1"], "--other-store", "--no-model", "--device", "cpu")
    assert res.exit_code == 0 and "off its target on this text" in res.output, res.output  # the hint
    res = invoke("calibrate", run, "--store", setup["s1"], "--other-store", "--tokens", 1000, "--out", out)
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "cfg.json").read_text())["training"]["recalibrated"]
    assert rec["range"] == [0, 1024] and rec["other_store"] is True  # whole windows of 64
    # The pooled rule: exactly round(4 * N) latents fire over the N calibration tokens (BOS dropped).
    assert rec["l0_after"] == pytest.approx(round(4 * rec["tokens"]) / rec["tokens"], abs=1e-9)
    assert l0_on(out, setup["s1"], 0, 1024) == pytest.approx(rec["l0_after"], abs=1e-9)
    assert abs(rec["l0_before"] - 4) > abs(rec["l0_after"] - 4)
    # Only the thresholds changed.
    old, new = io.load_sae(run).state_dict(), io.load_sae(out).state_dict()
    changed = [k for k in old if not torch.equal(old[k], new[k])]
    assert len(changed) == 1, changed
    # The evaluation on that store starts after the calibration tokens; the source run is untouched.
    res = invoke("eval", out, "--store", setup["s1"], "--other-store", "--no-model", "--device", "cpu")
    assert res.exit_code == 0, res.output
    ev = json.loads((out / "eval.json").read_text())
    assert ev["eval_range"] == [1024, 4096] and abs(ev["l0"] - 4) < abs(
        l0_on(run, setup["s1"], 1024, 4096) - 4
    )
    assert "recalibrated" not in json.loads((run / "cfg.json").read_text())["training"]


def test_calibrating_in_place_on_the_run_s_own_tokens(setup, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(setup["jumprelu"], run)
    (run / "eval.json").write_text("{}")
    res = invoke("calibrate", run, "--store", setup["s0"])
    assert res.exit_code == 0, res.output
    training = json.loads((run / "cfg.json").read_text())["training"]
    rec = training["recalibrated"]
    assert rec["range"] == training["calibration_range"] and rec["other_store"] is False
    assert rec["l0_after"] == pytest.approx(round(4 * rec["tokens"]) / rec["tokens"], abs=1e-9)
    assert not (run / "eval.json").exists()  # it described the old thresholds
    # Another process holding the folder's write lock (a training run): refused, the SAE unchanged.
    before = (run / "sae.safetensors").read_bytes()
    with io.run_lock(run):
        one_line_error(invoke("calibrate", run, "--store", setup["s0"]), "lock", "wait for that training run")
    assert (run / "sae.safetensors").read_bytes() == before


@pytest.mark.parametrize("variant", ["batchtopk", "jumprelu", "topk"])
def test_another_l0_target(setup, tmp_path: Path, variant: str) -> None:
    """--l0-target 2: TopK takes k = 2 (every token fires 2), the others calibrate to 2 on the tokens."""
    out = tmp_path / "out"
    args = ("calibrate", setup[variant], "--store", setup["s1"], "--other-store", "--tokens", 1000)
    res = invoke(*args, "--l0-target", 2, "--out", out)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "cfg.json").read_text())
    rec = cfg["training"]["recalibrated"]
    assert cfg["sae"]["l0_target"] == 2 and rec["l0_target_before"] == 4 and rec["l0_target"] == 2
    assert rec["l0_after"] == pytest.approx(round(2 * rec["tokens"]) / rec["tokens"], abs=1e-9)
    if variant == "topk":  # exactly k on every token, also after the calibration tokens
        assert l0_on(out, setup["s1"], 1024, 4096) == 2.0
        old, new = io.load_sae(setup[variant]).state_dict(), io.load_sae(out).state_dict()
        assert all(torch.equal(old[k], new[k]) for k in old)  # the weights as they were
    for bad in (0, 16 * 4):  # d_sae = 4x16
        one_line_error(invoke(*args, "--l0-target", bad, "--out", tmp_path / "bad"), "--l0-target must be in")
    assert not (tmp_path / "bad").exists()


def test_bad_inputs_are_one_line_errors_and_write_nothing(setup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    one_line_error(
        invoke("calibrate", setup["topk"], "--store", setup["s1"], "--other-store"), "no threshold"
    )
    one_line_error(
        invoke("calibrate", setup["jumprelu"], "--store", setup["s0"], "--other-store", "--out", out),
        "is the store this SAE was trained on",
    )
    one_line_error(
        invoke("calibrate", setup["jumprelu"], "--store", setup["s1"], "--out", out), "--other-store"
    )
    one_line_error(
        invoke("calibrate", setup["jumprelu"], "--store", setup["s1"], "--other-store", "--tokens", 0),
        "--tokens",
    )
    assert not out.exists()
    out.mkdir()
    one_line_error(
        invoke("calibrate", setup["jumprelu"], "--store", setup["s1"], "--other-store", "--out", out),
        "--overwrite",
    )
    assert list(out.iterdir()) == []
    # All of a store calibrated on: nothing left to evaluate there.
    res = invoke(
        "calibrate",
        setup["jumprelu"],
        "--store",
        setup["s1"],
        "--other-store",
        "--tokens",
        4096,
        "--out",
        out,
        "--overwrite",
    )
    assert res.exit_code == 0, res.output
    one_line_error(invoke("eval", out, "--store", setup["s1"], "--other-store", "--no-model"), "every token")


def test_the_cli_default_is_the_library_s() -> None:
    from sae_cli import cli_calibrate, recalibrate

    assert cli_calibrate.DEFAULT_TOKENS == recalibrate.DEFAULT_TOKENS == 16384
