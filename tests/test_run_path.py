"""The one run path (sae_cli/run.py): `sae train` and `sae sweep` share it; variant options from the command line
(`--option KEY=VALUE`) reach the members of both, the same syntax as the TOML table `options`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import sparse_acts, write_store
from typer.testing import CliRunner

from sae_cli import run as run_mod
from sae_cli import sweep as sw
from sae_cli.cli import app
from sae_cli.config import ConfigError, LoopConfig, TrainConfig, parse_options

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
COMMON = ("--tokens", 256 * 4, "--batch-size", 256, "--eval-tokens", 512, "--device", "cpu", "--seed", 1)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run-path-store")
    write_store(root / "store", {(0, "resid_post"): sparse_acts(2048, 16, 64, 4, seed=5)}, chunk_tokens=512)
    return root / "store"


def test_parse_options_reads_toml_values_and_keeps_text() -> None:
    assert parse_options(["k_aux=4", "aux_coef=0.5", "flag=true", "decoder_norm=unit", 'b="a b"']) == {
        "k_aux": 4,
        "aux_coef": 0.5,
        "flag": True,
        "decoder_norm": "unit",
        "b": "a b",
    }
    assert parse_options(None) == {}
    for bad in ("k_aux", "=3", "k_aux="):
        with pytest.raises(ConfigError, match="use KEY=VALUE"):
            parse_options([bad])


def test_train_option_equals_the_toml_table(store: Path, tmp_path: Path) -> None:
    """`--option decoder_norm=unit` and `[options] decoder_norm = "unit"` train the same SAE; the option is saved."""
    args = ("train", "topk", "--store", store, "--layer", 0, "--width", "4x", "--l0-target", 4, *COMMON)
    res = invoke(*args, "--option", "decoder_norm=unit", "--option", "k_aux=8", "--out", tmp_path / "flag")
    assert res.exit_code == 0, res.output
    toml = tmp_path / "cfg.toml"
    toml.write_text('[options]\ndecoder_norm = "unit"\nk_aux = 8\n')
    res = invoke(*args, "--config", toml, "--out", tmp_path / "toml")
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "flag" / "train_config.json").read_text())["config"]
    assert saved["options"] == {"decoder_norm": "unit", "k_aux": 8}
    a, b = load_file(tmp_path / "flag" / "sae.safetensors"), load_file(tmp_path / "toml" / "sae.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    res = invoke(*args, "--option", "nope=1", "--out", tmp_path / "bad")
    assert res.exit_code == 2 and "bad option for SAE variant 'topk'" in res.output
    assert not (tmp_path / "bad").exists()


def test_sweep_options_reach_their_members_and_a_solo_run_equals_the_member(
    store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    res = invoke(
        "sweep", "--store", store, "--layer", 0, "--variants", "topk,jumprelu", "--l0-target", 4, "--width", "4x",
        "--option", "topk.decoder_norm=unit", "--option", "b_dec_init=mean", "--no-model", "--out", out, *COMMON,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["config"]["options"] == {"topk.decoder_norm": "unit", "b_dec_init": "mean"}
    cfgs = {p.name: json.loads((p / "cfg.json").read_text()) for p in (out / "members").iterdir()}
    opts = {name.split("-")[0]: c["sae"]["options"] for name, c in cfgs.items()}
    assert opts == {
        "topk": {"b_dec_init": "mean", "decoder_norm": "unit"},
        "jumprelu": {"b_dec_init": "mean"},
    }
    solo = tmp_path / "solo"
    res = invoke(
        "train", "topk", "--store", store, "--layer", 0, "--width", "4x", "--l0-target", 4, "--option",
        "decoder_norm=unit", "--option", "b_dec_init=mean", "--out", solo, *COMMON,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    member = next(p for p in (out / "members").iterdir() if p.name.startswith("topk"))
    a, b = load_file(solo / "sae.safetensors"), load_file(member / "sae.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # An option scoped to a variant the sweep does not train is refused before anything is written.
    res = invoke(
        "sweep", "--store", store, "--layer", 0, "--option", "gated.x=1", "--out", tmp_path / "x", *COMMON
    )
    assert res.exit_code == 2 and "'gated' is not one of the sweep's variants" in res.output
    assert not (tmp_path / "x").exists()
    # A sweep.json written before options existed resumes with none.
    assert sw.SweepConfig.from_dict({k: v for k, v in meta["config"].items() if k != "options"}).options == {}


def test_a_solo_run_and_a_sweep_of_one_are_prepared_by_the_same_path(store: Path, tmp_path: Path) -> None:
    """The same store, member and loop through run.prepare_run with either folder: the same ranges, loop and
    plan (but for the folder), the store opened once per run."""
    loop = LoopConfig(batch_size=256, tokens=1024, eval_tokens=512, seed=1)
    member = sw.SweepConfig(str(store), loop=loop).members()[0]
    solo = run_mod.prepare_run(
        run_mod.SoloRun(TrainConfig(store=str(store), member=member, loop=loop), tmp_path / "a")
    )
    swept = sw.prepare_sweep(sw.SweepConfig(str(store), loop=loop), tmp_path / "b")
    assert solo.ranges == swept.ranges and solo.loop == swept.loop
    (p,), (q,) = solo.plans, swept.plans
    assert (p.name, p.sae_cfg, p.lr, p.betas) == (q.name, q.sae_cfg, q.lr, q.betas)
    assert p.out_dir == tmp_path / "a" and q.out_dir == tmp_path / "b" / "members" / q.name
    assert solo.trainer.reader.store is solo.store and swept.reader.store is swept.store
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # prepared in memory only
