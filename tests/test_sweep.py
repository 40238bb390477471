"""`sae sweep` / `sae pareto`: a member equals its solo `sae train` bit for bit, the folder layout, the memory
refusal, the member plan and the Pareto frontier."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_corpus
from safetensors.torch import load_file
from test_trainer import sparse_acts, write_store
from typer.testing import CliRunner

from actcache.harvest import HarvestConfig, plan_harvest, run_harvest
from actcache.models import load_model
from sae_cli import data
from sae_cli import evaluate as ev_mod
from sae_cli import sweep as sw
from sae_cli import trainer as sw_trainer
from sae_cli.cli import app
from sae_cli.config import ConfigError, LoopConfig
from sae_cli.pareto import pareto_front
from sae_cli.trainer import Trainer, estimate_memory

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
# No --batch-size: the sweep must resolve the automatic batch (1024 on this store) exactly as `sae train` does.
COMMON = ("--tokens", 1024 * 6, "--eval-tokens", 512, "--device", "cpu", "--seed", 3)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Two layers of resid_post, 4096 tokens of d 16 (different data per layer), chunks of 512 tokens."""
    root = tmp_path_factory.mktemp("sweep-store")
    acts = {
        (0, "resid_post"): sparse_acts(4096, 16, 96, 4, seed=1),
        (1, "resid_post"): sparse_acts(4096, 16, 96, 4, seed=2),
    }
    write_store(root / "store", acts, chunk_tokens=512)
    return root / "store"


def test_members_equal_solo_runs_bit_exact_and_the_folder_is_complete(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 layers x 2 variants x 2 L0 targets in one loop; two members against `sae train` of the same settings:
    identical weights (the sweep shares only the decoded batches). Then the table, the plot, `sae pareto`."""
    out = tmp_path / "sweep"
    lanes = []
    real_lanes = sw_trainer.Lanes
    monkeypatch.setattr(sw_trainer, "Lanes", lambda *a, **k: lanes.append(a[:2]) or real_lanes(*a, **k))
    torch.set_num_threads(2)  # the sweep's members run in 2 threads, one intra-op thread each ...
    try:
        res = invoke(
            "sweep", "--store", store, "--layers", "0,1", "--variants", "topk,jumprelu", "--l0-target", "4,8",
            "--width", "8x", "--out", out, "--no-model", *COMMON,
        )  # fmt: skip
    finally:
        torch.set_num_threads(1)  # ... and the solo runs below on one thread: the same numbers, bit for bit
    assert res.exit_code == 0, res.output
    assert lanes == [(8, 2)]  # 8 members concurrently on 2 threads
    meta = json.loads((out / "sweep.json").read_text())
    names = [m["name"] for m in meta["members"]]
    assert len(names) == 8 and names[0] == "topk-L0-resid_post-w128-l0_4"
    assert meta["status"] == "done" and meta["tokens"] == 1024 * 6 and meta["batch_size"] == 1024
    # Equal-shape groups: (variant, layer, site, shape); the two L0 targets of each share one.
    assert len(meta["shape_groups"]) == 4 and all(len(g) == 2 for g in meta["shape_groups"])

    # The sweep holds tokens back for JumpReLU's final calibration; a solo TopK run holds none back unless asked
    # (TopK sets no threshold): given the same hold-back, it equals its sweep member bit for bit.
    lo, hi = meta["calibration_range"]
    assert hi - lo > 0
    held_back = tmp_path / "held_back.toml"
    held_back.write_text(f"calibration_tokens = {hi - lo}\n")
    for variant, layer, l0 in (("topk", 1, 8), ("jumprelu", 0, 4)):
        solo = tmp_path / f"solo-{variant}"
        extra = ("--config", held_back) if variant == "topk" else ()
        res = invoke(
            "train", variant, "--store", store, "--layer", layer, "--site", "resid_post", "--width", "8x",
            "--l0-target", l0, "--out", solo, *COMMON, *extra,
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        member = out / "members" / f"{variant}-L{layer}-resid_post-w128-l0_{l0}"
        a, b = load_file(member / "sae.safetensors"), load_file(solo / "sae.safetensors")
        assert a.keys() == b.keys() and len(a) >= 4
        for k in a:
            assert torch.equal(a[k], b[k]), (variant, k)
        cfg_a = json.loads((member / "cfg.json").read_text())["training"]
        cfg_b = json.loads((solo / "cfg.json").read_text())["training"]
        assert cfg_a["input_scale_folded"] == cfg_b["input_scale_folded"]
        assert cfg_a["final_sparsity_coef"] == cfg_b["final_sparsity_coef"]

    rows = pq.read_table(out / "summary.parquet").to_pylist()
    assert [r["name"] for r in rows] == names
    for r in rows:
        ev = json.loads((out / "members" / r["name"] / "eval.json").read_text())
        assert r["fvu"] == ev["fvu"] and r["l0"] == ev["l0"] and r["train_tokens"] == 1024 * 6
        docs = ev["l0_by_document"]  # the L0 range over documents (NaN when none has 1,024 evaluated tokens)
        assert (r["l0_doc_min"], r["l0_doc_max"]) == (
            docs.get("min", math.nan),
            docs.get("max", math.nan),
        ) or (docs["documents"] == 0 and math.isnan(r["l0_doc_min"]) and math.isnan(r["l0_doc_max"]))
    assert all(r["l0"] <= 4 for r in rows if r["variant"] == "topk" and r["l0_target"] == 4)
    md = (out / "summary.md").read_text().splitlines()
    assert len(md) == 2 + 8 and "delta_lm_loss" not in md[0] and "fvu" in md[0]
    # --no-model: FVU charts per layer, no delta-LM-loss charts.
    assert sorted(p.name for p in (out / "pareto").iterdir()) == [
        "L0-resid_post-fvu.png",
        "L1-resid_post-fvu.png",
    ]
    png = (out / "pareto" / "L1-resid_post-fvu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    (out / "summary.md").unlink()
    (out / "pareto" / "L0-resid_post-fvu.png").unlink()
    res = invoke("pareto", out)
    assert res.exit_code == 0, res.output
    assert (out / "summary.md").read_text().splitlines() == md
    assert (out / "pareto" / "L0-resid_post-fvu.png").is_file()
    # A second sweep into the same folder needs --overwrite or --resume.
    res = invoke("sweep", "--store", store, "--layer", 0, "--out", out, "--no-model", *COMMON)
    assert res.exit_code == 2 and "--overwrite" in res.output


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_a_sweep_that_cannot_fit_is_refused_before_anything_is_written(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "big"
    res = invoke(
        "sweep", "--store", store, "--layer", 0, "--variants", "topk,jumprelu", "--l0-target", "20,50",
        "--width", "4000000000", "--out", out, *COMMON,
    )  # fmt: skip
    one_line_error(
        res, "the sweep needs about", "GiB (4 members", "not even one member fits", "--width", "--batch-size"
    )
    assert not out.exists()
    for args, needle in (
        (("--layer", 0, "--variants", "topk,nope"), "unknown SAE variant 'nope'"),
        (("--layer", 7), "layer"),
        (("--variants", "topk"), "no layer given"),
        (("--layer", 0, "--l0-target", "4,x"), "bad --l0-target"),
        (("--layer", 0, "--width", "128,8x"), "two members resolve to topk-L0-resid_post-w128-l0_50"),
    ):
        one_line_error(invoke("sweep", "--store", store, "--out", out, *args, *COMMON), needle)
        assert not out.exists()


def test_memory_check_names_how_many_members_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = LoopConfig(batch_size=10)
    cfg = sw.SweepConfig(
        store="-", variants=("topk",), layers=(0,), l0_targets=(1, 2, 3), widths=("2x",), loop=loop
    )
    plans = sw.plan_sweep(cfg, 16, "/nonexistent")
    # Per member 4 fp32 copies of 2*32*16 + 2*32 + 16 parameters; activations of one member; no reader.
    one = 4 * 4 * (2 * 32 * 16 + 64 + 16)
    acts = 4 * (8 * 10 * 32 + 4 * 10 * 16)
    assert estimate_memory(plans, loop) == 3 * one + acts
    free = int((2 * one + acts + 1) / sw.MEMORY_MARGIN) + 1  # room for exactly two members
    monkeypatch.setattr(sw, "available_memory", lambda device: free)
    assert sw.check_sweep_memory(plans[:2], loop, torch.device("cpu")) == (2 * one + acts, free)
    with pytest.raises(
        sw.SweepError, match=r"3 members, widest 32 latents, batch 10\).*fewer members .*\(2 of these fit\)"
    ):
        sw.check_sweep_memory(plans, loop, torch.device("cpu"))


def test_plan_is_the_cross_product_in_table_order() -> None:
    cfg = sw.SweepConfig(
        store="-", variants=("topk", "jumprelu"), layers=(3, 15), sites=("mlp_out",), l0_targets=(20, 50),
        widths=("8x", "1024"),
    )  # fmt: skip
    plans = sw.plan_sweep(cfg, 64, "/s")
    assert len(plans) == 2 * 2 * 2 * 2
    assert [p.name for p in plans[:5]] == [
        "topk-L3-mlp_out-w512-l0_20", "topk-L3-mlp_out-w512-l0_50", "topk-L3-mlp_out-w1024-l0_20",
        "topk-L3-mlp_out-w1024-l0_50", "jumprelu-L3-mlp_out-w512-l0_20",
    ]  # fmt: skip
    assert plans[-1].key == (15, "mlp_out") and plans[-1].out_dir == Path("/s/members") / plans[-1].name
    assert plans[0].sae_cfg.l0_target == 20.0 and plans[0].steered is False and plans[4].steered is True
    assert sw.shape_groups(plans)[:2] == [[0, 1], [2, 3]]
    assert sw.parse_layers("0-2, 5,1") == (0, 1, 2, 5)
    assert sw.parse_list("topk jumprelu,topk") == ("topk", "jumprelu")
    with pytest.raises(ConfigError, match="bad layers"):
        sw.parse_layers("a-3")


def test_pareto_front_hand_computed() -> None:
    x = [1.0, 2.0, 2.0, 3.0, 4.0, float("nan"), 5.0, 1.0, 0.5]
    y = [0.5, 0.3, 0.4, 0.35, 0.1, 0.0, 0.1, 0.5, float("nan")]
    # (1, .5) first of two equal points; (2, .3) beats (2, .4) and (3, .35); (4, .1) beats (5, .1); NaNs never.
    assert pareto_front(x, y) == [0, 1, 4]
    assert pareto_front([3.0, 2.0, 1.0], [1.0, 2.0, 3.0]) == [2, 1, 0]  # all on it, ordered by x
    assert pareto_front([], []) == []


def test_sweep_with_the_model_draws_both_charts(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """A store harvested from a tiny random Llama: the sweep loads the model once, splices every member and
    draws L0 vs FVU and L0 vs delta LM loss."""
    corpus = write_corpus(tmp_path / "corpus", n_docs=12, words_per_doc=150)
    plan = plan_harvest(
        HarvestConfig(
            model=str(tiny_llama_dir), dataset=str(corpus), layers="1", sites="resid_post", context=32,
            dtype="fp32", device="cpu", batch_size=8, tokens=2048,
        )
    )  # fmt: skip
    run_harvest(plan, tmp_path / "store", model=load_model(plan.source, "cpu", torch.float32))
    loads = []
    real_load_lm = sw.load_lm
    out = tmp_path / "sweep"
    shared = []
    real_lm = ev_mod.lm_metrics
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sw, "load_lm", lambda *a: loads.append(a) or real_load_lm(*a))
        mp.setattr(
            ev_mod, "lm_metrics", lambda fns, *a, **k: shared.append(len(fns)) or real_lm(fns, *a, **k)
        )
        res = invoke(
            "sweep", "--store", tmp_path / "store", "--layer", 1, "--variants", "topk,jumprelu",
            "--l0-target", "4,16", "--width", "4x", "--out", out, "--batch-size", 128, "--tokens", 128 * 10,
            "--eval-tokens", 256, "--device", "cpu",
        )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert len(loads) == 1
    assert shared == [4]  # one shared pass for the 4 members of layer 1 resid_post
    rows = pq.read_table(out / "summary.parquet").to_pylist()
    assert len(rows) == 4
    # The four members' LM metrics come from one pass that shares the clean and zero-ablated forward passes;
    # each equals what the member's own `sae eval` (three passes per window batch) gives, to the last bit.
    model = sw.load_lm(data.open_store(tmp_path / "store"), "cpu")
    for r in rows[::3]:
        ev = json.loads((out / "members" / r["name"] / "eval.json").read_text())
        alone = ev_mod.evaluate(out / "members" / r["name"], tmp_path / "store", device="cpu", model=model)
        for k in (
            "lm_tokens",
            "ce_clean",
            "ce_spliced",
            "ce_zero_ablation",
            "delta_lm_loss",
            "kl_clean_spliced",
        ):
            assert ev[k] == alone[k], (r["name"], k)
    for r in rows:
        ev = json.loads((out / "members" / r["name"] / "eval.json").read_text())
        assert r["delta_lm_loss"] == ev["delta_lm_loss"] and torch.isfinite(torch.tensor(r["delta_lm_loss"]))
        assert ev["site_match_rel_err"] < 1e-4  # the model the sweep loaded is the store's
    assert sorted(p.name for p in (out / "pareto").iterdir()) == [
        "L1-resid_post-delta_lm_loss.png", "L1-resid_post-fvu.png",
    ]  # fmt: skip
    assert "delta_lm_loss" in (out / "summary.md").read_text().splitlines()[0]


@pytest.mark.parametrize("threads", [1, 2])
def test_an_interrupted_sweep_resumes_to_the_same_weights(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """Ctrl-C after 3 of 8 steps, then `sae sweep --resume`: the weights of an uninterrupted sweep; members one
    after another (1 thread) and in lanes (2 threads: the interrupt first brings every member to the same step)."""
    torch.set_num_threads(threads)  # the fixture restores 1
    lanes = []
    real_lanes = sw_trainer.Lanes
    monkeypatch.setattr(sw_trainer, "Lanes", lambda *a, **k: lanes.append(a[:2]) or real_lanes(*a, **k))
    loop = LoopConfig(batch_size=256, seed=3, eval_tokens=512)
    cfg = sw.SweepConfig(
        store=str(store),
        variants=("topk", "jumprelu"),
        layers=(0,),
        l0_targets=(4.0,),
        widths=("8x",),
        loop=loop,
    )
    full, _ = sw.run_sweep(cfg, tmp_path / "full", tokens=256 * 8)
    prep = sw.prepare_sweep(cfg, tmp_path / "part", tokens=256 * 8)
    calls = iter(range(100))
    prep.trainer.should_stop = lambda: next(calls) >= 3
    assert sw.run_training(prep).status == "interrupted"
    assert json.loads((tmp_path / "part" / "sweep.json").read_text())["status"] == "interrupted"
    assert json.loads((tmp_path / "part" / "checkpoint" / "state.json").read_text())["step"] == 3
    steps = []
    real = Trainer._forward_backward
    monkeypatch.setattr(
        Trainer,
        "_forward_backward",
        lambda self, m, batch, step: steps.append(step) or real(self, m, batch, step),
    )
    res = invoke("sweep", "--out", tmp_path / "part", "--resume", "--no-model", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert sorted(steps) == sorted(list(range(3, 8)) * 2)  # both members continued from the checkpoint
    assert lanes == ([(2, 2)] * 3 if threads == 2 else [])  # full, part, resume: in lanes on 2 threads
    for p in full.plans:
        a = load_file(p.out_dir / "sae.safetensors")
        b = load_file(tmp_path / "part" / "members" / p.name / "sae.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), p.name
    assert (tmp_path / "part" / "summary.md").is_file()
    one_line_error(
        invoke("sweep", "--store", store, "--layer", 0, "--out", tmp_path / "none", "--resume"),
        "nothing to resume",
    )
