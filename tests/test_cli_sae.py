"""`sae train` + `sae eval` end to end (typer CliRunner) on a store harvested from a tiny random Llama, and every
bad-input error: one line, exit code 2, nothing lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_corpus
from typer.testing import CliRunner

from actcache.harvest import HarvestConfig, plan_harvest, run_harvest
from actcache.models import load_model
from sae_cli.cli import app
from sae_cli.registry import variant_names

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def harvested(tmp_path_factory, tiny_llama_dir: Path) -> Path:
    """Layers 1-2, resid_pre + resid_post + mlp_out of a tiny Llama over ~3k tokens (context 32, fp32)."""
    root = tmp_path_factory.mktemp("cli-store")
    corpus = write_corpus(root / "corpus", n_docs=20, words_per_doc=150)
    plan = plan_harvest(
        HarvestConfig(
            model=str(tiny_llama_dir), dataset=str(corpus), layers="1,2", sites="resid_pre,resid_post,mlp_out",
            context=32, dtype="fp32", device="cpu", batch_size=8, tokens=3072,
        )
    )  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_harvest(plan, root / "store", model=load_model(plan.source, "cpu", torch.float32))
    finally:
        torch.set_num_threads(before)
    return root / "store"


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("site", ["resid_post", "resid_pre", "mlp_out"])
def test_train_then_eval_with_splicing(harvested: Path, tmp_path: Path, site: str) -> None:
    run = tmp_path / "run"
    res = invoke(
        "train", "topk", "--store", harvested, "--layer", 1, "--site", site, "--width", "4x", "--l0-target", 8,
        "--tokens", 20000, "--batch-size", 256, "--out", run, "--device", "cpu",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = json.loads((run / "cfg.json").read_text())
    assert cfg["sae"]["d_sae"] == 256 and cfg["training"]["site"] == site
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["config"]["variant"] == "topk" and saved["resolved"]["tokens"] == 20000
    res = invoke("eval", run, "--store", harvested, "--device", "cpu")
    assert res.exit_code == 0, res.output
    ev = json.loads((run / "eval.json").read_text())
    # The hooks sit exactly at the stored site: the live activations of the clean pass equal the store's.
    assert ev["site_match_rel_err"] < 1e-5
    assert ev["l0"] <= 8 and ev["fvu"] < 0.5
    # A random tiny model: the CE values sit near ln(256); their order carries no meaning (see test_metrics_splice).
    assert ev["kl_clean_spliced"] > 0 and ev["delta_lm_loss"] == pytest.approx(
        ev["ce_spliced"] - ev["ce_clean"]
    )
    assert ev["ce_zero_ablation"] != ev["ce_clean"]
    held = ev["eval_range"][1] - ev["eval_range"][0]
    assert held == cfg["training"]["eval_range"][1] - cfg["training"]["eval_range"][0] and held % 32 == 0
    assert ev["lm_tokens"] > 0.9 * held * 31 / 32  # next-token targets: not the BOS, not padding
    assert (run / "density.png").is_file() and "CE recovered" in res.output
    docs = ev["by_document"]  # TopK fires at most k on every token of every document
    assert sum(d["tokens"] for d in docs) == ev["tokens"] and all(d["l0"] <= 8 for d in docs)
    assert sum(d["l0"] * d["tokens"] for d in docs) / ev["tokens"] == pytest.approx(ev["l0"])
    if (
        site == "resid_post"
    ):  # --lm-tokens cuts the LM metrics to whole windows; reconstruction keeps them all
        res = invoke("eval", run, "--store", harvested, "--device", "cpu", "--lm-tokens", 40)
        assert res.exit_code == 0, res.output
        short = json.loads((run / "eval.json").read_text())
        assert short["tokens"] == ev["tokens"] and short["fvu"] == pytest.approx(ev["fvu"])
        assert short["lm_tokens"] <= 2 * 31 < ev["lm_tokens"]  # 2 windows of 32 tokens at most
        res = invoke("eval", run, "--store", harvested, "--device", "cpu", "--no-model", "--by-doc")
        assert res.exit_code == 0 and "by document" in res.output, res.output
        assert len(docs) > 1 and all(f"{d['tokens']:,}" in res.output for d in docs)


def test_toml_config_resume_and_overwrite(harvested: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        f'store = "{harvested}"\nvariant = "jumprelu"\nlayer = 2\nsite = "resid_post"\nwidth = 128\n'
        'l0_target = 10\ntokens = 5120\nbatch_size = 256\ndevice = "cpu"\ncheckpoint_every = 1024\n'
    )
    run = tmp_path / "run"
    res = invoke("train", "--config", cfg, "--out", run)
    assert res.exit_code == 0, res.output
    saved = json.loads((run / "train_config.json").read_text())["config"]
    assert saved["variant"] == "jumprelu" and saved["width"] == "128" and saved["checkpoint_every"] == 1024
    one_line_error(invoke("train", "--config", cfg, "--out", run), "already holds a run", "--overwrite")
    # A resume of another variant or shape is refused; the run stays as it was.
    before = (run / "sae.safetensors").read_bytes()
    one_line_error(
        invoke("train", "topk", "--config", cfg, "--out", run, "--resume"), "another variant or shape"
    )
    one_line_error(
        invoke("train", "--config", cfg, "--out", run, "--resume", "--width", "256"), "d_sae 128 -> 256"
    )
    assert (run / "sae.safetensors").read_bytes() == before
    # --resume with more tokens continues from the checkpoint.
    res = invoke("train", "--out", run, "--resume", "--tokens", 6144)
    assert res.exit_code == 0, res.output
    assert json.loads((run / "cfg.json").read_text())["training"]["steps"] == 24
    res = invoke("train", "--config", cfg, "--out", run, "--overwrite", "--tokens", 1024)
    assert res.exit_code == 0, res.output
    assert json.loads((run / "cfg.json").read_text())["training"]["steps"] == 4


def test_bad_inputs_are_one_line_errors(harvested: Path, tmp_path: Path) -> None:
    base = ["train", "topk", "--store", harvested, "--l0-target", 8, "--device", "cpu"]
    run = tmp_path / "run"
    one_line_error(
        invoke(*base, "--layer", 7, "--out", run), "no activations for layer 7", "layers [1, 2]", "mlp_out"
    )
    one_line_error(invoke(*base, "--layer", 1, "--site", "attn_out", "--out", run), "site 'attn_out'")
    one_line_error(
        invoke("train", "nope", "--store", harvested, "--out", run), "unknown SAE variant 'nope'", "topk"
    )
    one_line_error(invoke(*base, "--layer", 1, "--width", "3y", "--out", run), "bad width '3y'")
    one_line_error(
        invoke(*base, "--layer", 1, "--width", "20000000", "--out", run), "lower --width or --batch-size"
    )
    one_line_error(
        invoke(*base, "--layer", 1, "--out", tmp_path / "nothing", "--resume"), "nothing to resume"
    )
    one_line_error(invoke("train", "topk", "--store", tmp_path / "nope", "--out", run), "does not exist")
    bad = tmp_path / "bad.toml"
    bad.write_text("lerning_rate = 3\n")
    one_line_error(invoke(*base, "--config", bad, "--out", run), "unknown config key 'lerning_rate'")
    bad.write_text("batch_size = 'big'\n")
    one_line_error(invoke(*base, "--config", bad, "--out", run), "batch_size", "int")
    notrun = tmp_path / "precious"
    notrun.mkdir()
    (notrun / "data.txt").write_text("keep me")
    one_line_error(invoke(*base, "--layer", 1, "--out", notrun, "--overwrite"), "is not an sae run")
    assert (notrun / "data.txt").read_text() == "keep me"
    assert not run.exists()
    one_line_error(invoke("eval", tmp_path, "--no-model"), "is not a trained SAE")


def test_variants_lists_the_registry() -> None:
    res = invoke("variants", "--plain")
    assert res.exit_code == 0 and res.output.split() == variant_names()
    res = invoke("variants")
    assert res.exit_code == 0 and all(name in res.output for name in variant_names())


def test_eval_flags_a_dead_share_counted_on_few_tokens() -> None:
    """Under 100k held-out tokens the dead share is a small-sample count, and `sae eval` says so."""
    from sae_cli.cli_eval import _dead

    assert _dead({"dead_pct": 9.7, "tokens": 6630}) == "9.70 (only 6,630 tokens: rare latents count as dead)"
    assert (
        _dead({"dead_pct": 2.148, "tokens": 97920}) == "2.15 (only 97,920 tokens: rare latents count as dead)"
    )
    assert _dead({"dead_pct": 0.5, "tokens": 100_000}) == "0.50"
