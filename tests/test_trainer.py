"""The training loop on tiny synthetic stores: loss falls, resume is bit-exact, bad data stops with a checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from actcache.stats import RunningStats
from actcache.store import FLAG_BOS, Store, StoreSpec, StoreWriter
from sae_cli import data, io
from sae_cli.config import LoopConfig, MemberConfig, resolve_loop
from sae_cli.registry import get_variant
from sae_cli.trainer import (
    METRICS_FILE,
    Trainer,
    TrainingError,
    check_memory,
    dead_window,
    default_lr,
    estimate_memory,
    input_scale,
    lr_multiplier,
    plan_member,
    stop_on_signals,
)

Key = tuple[int, str]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread (two spin-waiting threads on a busy 2-core machine are 10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sparse_acts(
    n: int, d: int, n_features: int, k_active: float, seed: int = 0, scale: float = 3.0
) -> torch.Tensor:
    """[n, d] tokens: positive combinations of random unit feature directions, ~k_active features per token
    (Zipf-ish frequencies), times `scale` (so the trainer's normalisation has work to do)."""
    gen = torch.Generator().manual_seed(seed)
    feats_FD = torch.randn(n_features, d, generator=gen)
    feats_FD /= feats_FD.norm(dim=1, keepdim=True)
    w_F = torch.arange(1, n_features + 1, dtype=torch.float32).pow(-0.5)
    p_F = (w_F / w_F.sum() * k_active).clamp(max=1.0)
    fire_NF = torch.rand(n, n_features, generator=gen) < p_F
    mag_NF = 0.5 + torch.rand(n, n_features, generator=gen)
    return (fire_NF * mag_NF) @ feats_FD * scale + 0.5


def write_store(
    path: Path,
    acts: dict[Key, torch.Tensor],
    context: int = 64,
    model: str = "synthetic",
    token_ids: np.ndarray | None = None,
    chunk_tokens: int | None = None,
) -> Store:
    """A float32 store holding `acts` (every key [N, d]); window starts are BOS."""
    n, d = next(iter(acts.values())).shape
    layers = sorted({k[0] for k in acts})
    sites = sorted({k[1] for k in acts})
    chunk = chunk_tokens or context
    spec = StoreSpec(
        model=model, revision=None, dtype="float32", layers=tuple(layers), sites=tuple(sites), d_model=d,
        context=context, corpus="synthetic", tokenizer=model, tokens_target=n, chunk_tokens=chunk,
        shard_tokens=8 * math.lcm(chunk, context), codec="zstd-1", harvest_config={},
    )  # fmt: skip
    writer = StoreWriter.create_or_resume(path, spec, overwrite=True)
    ids = token_ids if token_ids is not None else np.random.default_rng(0).integers(2, 100, n)
    for start in range(0, n, spec.shard_tokens):
        stop = min(n, start + spec.shard_tokens)
        pos = np.arange(start, stop) % context
        arrays = {
            "token_ids": ids[start:stop].astype(np.int32),
            "doc_ids": np.arange(start, stop) // context,
            "positions": pos,
            "flags": (pos == 0).astype(np.uint8) * FLAG_BOS,
        }
        stats = {}
        for (layer, site), x in acts.items():
            key = f"acts/{site}/{layer}"
            arrays[key] = x[start:stop]
            stats[key] = RunningStats(d).update(x[start:stop], keep=pos != 0)
        writer.write_shard(start, arrays)
        writer.commit(stop, stats)
    writer.finish()
    return Store.open(path)


# ---- helpers for the tests below (and tests/test_cli_sae.py, tests/test_l0_control.py) ---------------------------
KEY: Key = (0, "resid_post")


def small_store(tmp_path: Path, n: int = 4096, d: int = 16, seed: int = 0, **kw) -> Store:
    return write_store(
        tmp_path / "store", {KEY: sparse_acts(n, d, 128, 4, seed=seed)}, **{"chunk_tokens": 512, **kw}
    )


def make_trainer(store: Store, run_dir: Path, members: list[MemberConfig], tokens: int, **loop_kw) -> Trainer:
    loop = LoopConfig(**{"batch_size": 256, "log_every": 5, "mix_chunks": 4, "threads": 1, **loop_kw})
    train_range, _ = data.split(store, 512)
    keys = sorted({(m.layer, m.site) for m in members})
    plans = [plan_member(m, store.d_model, run_dir / (m.name or m.variant)) for m in members]
    reader = data.train_reader(store, keys, loop, train_range)
    return Trainer(plans, loop, reader, run_dir, tokens), data.sample(store, keys, loop, train_range)


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {f"{m.plan.name}.{k}": v.clone() for m in trainer.members for k, v in m.sae.state_dict().items()}


TOPK = MemberConfig(variant="topk", layer=0, site="resid_post", width="8x", l0_target=4, name="topk")
JUMP = MemberConfig(variant="jumprelu", layer=0, site="resid_post", width="8x", l0_target=8, name="jump")
BTK = MemberConfig(variant="batchtopk", layer=0, site="resid_post", width="8x", l0_target=4, name="btk")


def test_loss_falls_and_metrics_are_logged(tmp_path: Path) -> None:
    store = small_store(tmp_path)
    trainer, sample = make_trainer(store, tmp_path / "run", [TOPK], tokens=256 * 60)
    trainer.start(sample)
    result = trainer.run()
    assert result.status == "done" and result.step == 60
    rows = pq.read_table(tmp_path / "run" / METRICS_FILE).to_pylist()
    assert [r["step"] for r in rows] == list(range(5, 65, 5))
    first, last = rows[0], rows[-1]
    assert last["fvu"] < 0.5 * first["fvu"], (first["fvu"], last["fvu"])
    assert last["loss"] < 0.5 * first["loss"]
    assert 3.8 < last["l0"] <= 4  # TopK: k = l0_target (minus the odd non-positive pre-activation)
    assert {"part_mse", "part_aux", "lr", "sparsity_coef", "dead_pct", "tokens_per_s"} <= set(last)
    # lr: warm-up over 5 % of 60 steps = 3 steps, flat, linear decay over the last 20 % (steps 48..59).
    assert rows[0]["lr"] == pytest.approx(trainer.plans[0].lr)
    assert rows[-2]["lr"] == pytest.approx(trainer.plans[0].lr * (60 - 54) / 12)
    assert (tmp_path / "run" / "topk" / "cfg.json").is_file()


def test_lr_schedule_and_dead_window() -> None:
    loop = LoopConfig(warmup_steps=1000, decay_fraction=0.2, batch_size=100)
    assert lr_multiplier(0, 100, loop) == pytest.approx(1 / 5)  # warm-up min(1000, 5 % of 100) = 5 steps
    assert lr_multiplier(4, 100, loop) == 1.0
    assert lr_multiplier(79, 100, loop) == 1.0
    assert lr_multiplier(90, 100, loop) == pytest.approx(0.5)
    assert lr_multiplier(30_000, 100_000, loop) == 1.0 and lr_multiplier(999, 100_000, loop) == 1.0
    assert lr_multiplier(998, 100_000, loop) == pytest.approx(999 / 1000)
    assert dead_window(loop, 10**11) == 10_000_000
    assert dead_window(loop, 1_000_000) == 100_000
    assert dead_window(loop, 1000) == 800  # at least 8 batches


def test_resume_is_bit_exact_for_members_in_one_loop(tmp_path: Path) -> None:
    """Stop after 14 steps (as on Ctrl-C; inside the steered member's final L0 trim, steps 13-16), resume in a new
    Trainer: same weights as 16 uninterrupted steps, and the same saved SAEs (BatchTopK's calibrated threshold)."""
    store = small_store(tmp_path)
    tokens = 256 * 16
    full, sample = make_trainer(store, tmp_path / "full", [TOPK, JUMP, BTK], tokens, checkpoint_every=256 * 5)
    full.start(sample)
    assert full.run().status == "done"

    calls = {"n": 0}

    def stop_after_14() -> bool:
        calls["n"] += 1
        return calls["n"] > 14

    part, sample = make_trainer(store, tmp_path / "part", [TOPK, JUMP, BTK], tokens, checkpoint_every=256 * 5)
    part.should_stop = stop_after_14
    part.start(sample)
    res = part.run()
    assert res.status == "interrupted" and res.step == 14
    assert not (tmp_path / "part" / "topk" / "cfg.json").exists()
    resumed, _ = make_trainer(store, tmp_path / "part", [TOPK, JUMP, BTK], tokens, checkpoint_every=256 * 5)
    resumed.resume(sample)
    assert resumed.step == 14 and resumed.members[1].controller.coef == part.members[1].controller.coef
    assert resumed.members[1].controller.trim_shift == part.members[1].controller.trim_shift != 0.0
    assert resumed.run().status == "done"
    a, b = params(full), params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for m_full, m_res in zip(full.members, resumed.members, strict=True):
        assert torch.equal(m_full.since_fired_F, m_res.since_fired_F)
        for s1, s2 in zip(m_full.opt.state.values(), m_res.opt.state.values(), strict=True):
            assert torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])
    for name in ("topk", "jump", "btk"):
        saved_full = io.read_tensors(tmp_path / "full" / name / "sae.safetensors")
        saved_res = io.read_tensors(tmp_path / "part" / name / "sae.safetensors")
        assert all(torch.equal(saved_full[k], saved_res[k]) for k in saved_full), name
    assert float(saved_full["threshold"]) > 0
    rows_full = pq.read_table(tmp_path / "full" / METRICS_FILE).column("loss").to_pylist()
    rows_res = pq.read_table(tmp_path / "part" / METRICS_FILE).column("loss").to_pylist()
    assert rows_full == rows_res
    # Only JSON and safetensors in a checkpoint: nothing is ever unpickled.
    assert {p.suffix for p in (tmp_path / "part" / "checkpoint").iterdir()} == {".json", ".safetensors"}


def test_nan_in_data_stops_with_a_checkpoint_naming_the_token(tmp_path: Path) -> None:
    x = sparse_acts(2048, 16, 64, 4)
    x[1000, 3] = float("nan")
    store = write_store(tmp_path / "store", {KEY: x})
    trainer, sample = make_trainer(store, tmp_path / "run", [TOPK], tokens=256 * 20, normalize="none")
    # The normalisation sample may hold the NaN token: give the scale explicitly.
    sample = {KEY: torch.nan_to_num(sample[KEY])}
    trainer.start(sample, {KEY: 1.0})
    with pytest.raises(
        TrainingError, match="NaN/Inf in the activations of layer 0 resid_post at store token 1000"
    ):
        trainer.run()
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] < 8  # the bad token is met within the first epoch (1536 train tokens, 6 batches)


def test_nan_loss_stops_before_the_weights_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = small_store(tmp_path)
    trainer, sample = make_trainer(store, tmp_path / "run", [TOPK], tokens=256 * 20)
    trainer.start(sample)
    sae = trainer.members[0].sae
    original = type(sae).training_loss
    snapshot: dict[str, torch.Tensor] = {}

    def poisoned(self, x_BD, state):
        out = original(self, x_BD, state)
        if state.step == 3:
            snapshot.update({k: v.clone() for k, v in self.state_dict().items()})
            return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(type(sae), "training_loss", poisoned)
    with pytest.raises(TrainingError, match=r"loss is nan at step 4 \(tokens 768\)"):
        trainer.run()
    for k, v in sae.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and state["tokens"] == 768


def test_memory_estimate_refuses_a_width_that_cannot_fit() -> None:
    loop = LoopConfig(batch_size=4096)
    plan = plan_member(MemberConfig(variant="topk", width="4000000"), 4096, "/nonexistent")
    # 2 * 4M * 4096 params * 4 copies * 4 bytes = 537 GB: more than any test machine has free.
    with pytest.raises(
        TrainingError, match=r"training needs about \d+\.\d GiB .* lower --width or --batch-size"
    ):
        check_memory([plan], loop, torch.device("cpu"))
    small = plan_member(MemberConfig(variant="topk", width="2x"), 16, "/nonexistent")
    assert estimate_memory([small], LoopConfig(batch_size=10)) == 4 * (
        4 * (2 * 32 * 16 + 64 + 16) + 8 * 10 * 32 + 4 * 10 * 16
    )


def test_input_scale_gives_unit_mean_squared_norm() -> None:
    x = torch.randn(1000, 8) * 7
    c = input_scale(x)
    assert float((c * x).pow(2).sum(-1).mean()) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(TrainingError):
        input_scale(torch.zeros(3, 4))


def test_automatic_batch_and_tokens_for_small_and_large_stores() -> None:
    demo = resolve_loop(LoopConfig(), 36_864)  # the demo store: 40,960 tokens minus 4,096 held out
    assert (demo.batch_size, demo.tokens) == (1024, 300 * 1024)
    big = resolve_loop(LoopConfig(), 10_000_000)
    assert (big.batch_size, big.tokens) == (4096, 10_000_000)
    assert resolve_loop(LoopConfig(), 10**9).tokens == 50_000_000
    assert resolve_loop(LoopConfig(batch_size=512, tokens=7), 10).tokens == 7
    assert resolve_loop(LoopConfig(), 100).batch_size == 1024
    assert resolve_loop(LoopConfig(), 65_536 * 2).batch_size == 4096


def test_sigterm_and_ctrl_c_set_the_stop_flag_instead_of_killing() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop_on_signals() as should_stop:
        assert not should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert should_stop()
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts at once
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # restored


def test_seed_sets_the_init_and_members_do_not_share_rng_draws(tmp_path: Path) -> None:
    """--seed changes the initial decoder; the same seed gives the same one whether a member trains alone or
    after another member in the same loop."""
    store = small_store(tmp_path)

    def init_dec(members: list[MemberConfig], seed: int) -> torch.Tensor:
        trainer, sample = make_trainer(store, tmp_path / f"run{seed}{len(members)}", members, 256, seed=seed)
        trainer.start(sample)
        return trainer.members[-1].sae.W_dec_FD.detach().clone()

    solo = init_dec([JUMP], 0)
    assert torch.equal(init_dec([TOPK, JUMP], 0), solo)
    other = init_dec([JUMP], 1)
    assert not torch.allclose(other, solo)
    torch.testing.assert_close(other.norm(dim=1), solo.norm(dim=1))  # same rule, different draw


def test_the_trainer_calibrates_thresholds_at_the_end_unless_told_not_to(tmp_path: Path) -> None:
    """BatchTopK after 8 steps: saved with its running threshold when calibrate = false, with the cut-off pooled
    over the calibration tokens (here the normalisation sample) otherwise; nothing else differs."""
    store = small_store(tmp_path)
    saved, running = {}, {}
    for flag in (False, True):
        trainer, sample = make_trainer(store, tmp_path / f"run-{flag}", [BTK], 256 * 8, calibrate=flag)
        trainer.start(sample)
        trainer.run()
        saved[flag] = io.load_sae(tmp_path / f"run-{flag}" / "btk")
        running[flag] = trainer.members[0].sae.threshold.clone()
    on, off = saved[True], saved[False]
    assert torch.equal(running[True], running[False]) and torch.equal(off.threshold, running[False])
    x = sample[KEY].float()  # raw tokens: the saved SAE has the input scale folded in
    top = on.pre_acts(x - on.b_dec_D).flatten().topk(on.k * len(x) + 1).values
    torch.testing.assert_close(on.threshold, (top[-2] + top[-1]) / 2)
    assert float((on.threshold - off.threshold).abs()) > 1e-4
    on_state, off_state = on.state_dict(), off.state_dict()
    assert all(torch.equal(on_state[k], off_state[k]) for k in on_state if k != "threshold")


def test_calibration_split_holds_back_windows_only_for_runs_of_several_epochs(tmp_path: Path) -> None:
    """4096 tokens, context 64: 512 held out for eval leave 56 training windows (3584 tokens). A run of more than
    one pass holds back 10 % of them as whole windows from the end (358 tokens -> 6 windows = 384 tokens); a run of
    one pass holds back nothing and calibrates on the normalisation sample; an explicit count is honoured or
    refused when it would leave no training window."""
    store = small_store(tmp_path)
    train, _ = data.split(store, 512)
    assert train == (0, 3584)
    many = resolve_loop(LoopConfig(batch_size=256), 3584)  # 300 steps of 256 > 3584 tokens
    kept, calib = data.calibration_split(store, train, many)
    assert kept == (0, 3200) and calib == (3200, 3584)
    # no member sets a threshold at the end (TopK): nothing held back; an explicit count still is
    assert data.calibration_split(store, train, many, calibrates=False) == (train, (3584, 3584))
    assert not get_variant("topk").calibrates and get_variant("jumprelu").calibrates
    explicit_many = dataclasses.replace(many, calibration_tokens=100)
    assert data.calibration_split(store, train, explicit_many, calibrates=False) == ((0, 3456), (3456, 3584))
    x = data.calibration_sample(store, [KEY], many, kept, calib)[KEY]
    assert len(x) == 384 - 6  # every held-back token but the 6 window starts (BOS, dropped as in training)
    one = resolve_loop(LoopConfig(batch_size=256, tokens=3584), 3584)
    kept, calib = data.calibration_split(store, train, one)
    assert kept == train and calib == (3584, 3584)
    norm = data.calibration_sample(store, [KEY], one, kept, calib)[KEY]
    assert torch.equal(norm, data.sample(store, [KEY], one, kept)[KEY])
    explicit = LoopConfig(batch_size=256, tokens=3584, calibration_tokens=100)
    assert data.calibration_split(store, train, explicit) == ((0, 3456), (3456, 3584))
    with pytest.raises(data.DataError, match="calibration tokens"):
        data.calibration_split(store, train, LoopConfig(batch_size=256, calibration_tokens=3584))


def _two_member_run_with_a_nan(
    tmp_path: Path, name: str, slow: str, threads: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[Trainer, str]:
    """TopK and BatchTopK on 2 threads (or one after another); TopK's loss turns NaN at its 4th step; `slow`
    sleeps 0.1 s in every step, so that the other member runs ahead or falls behind."""
    store = small_store(tmp_path)
    torch.set_num_threads(2)  # two intra-op threads: the members run in lanes (restored by the fixture)
    trainer, sample = make_trainer(
        store, tmp_path / name, [TOPK, BTK], tokens=256 * 20, member_threads=threads
    )
    assert trainer.member_workers == (2 if threads else 1)
    trainer.start(sample)
    for m in trainer.members:
        original = type(m.sae).training_loss

        def patched(self, x_BD, state, _original=original, _name=m.plan.name):
            if _name == slow:
                time.sleep(0.1)
            out = _original(self, x_BD, state)
            if _name == "topk" and state.step == 3:
                return out._replace(loss=out.loss * float("nan"))
            return out

        monkeypatch.setattr(type(m.sae), "training_loss", patched)
    with pytest.raises(TrainingError) as info:
        trainer.run()
    return trainer, str(info.value)


def test_a_nan_in_a_lane_checkpoints_the_last_good_step_like_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Members in lanes (CPU, several threads): TopK fails at step 4 while BatchTopK is behind; BatchTopK runs up
    to the failed step and the checkpoint holds what the one-thread loop writes, bit for bit."""
    _, msg = _two_member_run_with_a_nan(tmp_path, "lanes", "btk", True, monkeypatch)
    assert "member topk: loss is nan at step 4 (tokens 768); checkpoint of the last good step" in msg
    _, msg_ref = _two_member_run_with_a_nan(tmp_path, "loop", "btk", False, monkeypatch)
    assert msg_ref == msg.replace("lanes", "loop")
    states = [json.loads((tmp_path / n / "checkpoint" / "state.json").read_text()) for n in ("lanes", "loop")]
    assert states[0]["step"] == states[1]["step"] == 3 and states[0]["tokens"] == 768
    assert states[0]["reader"] == states[1]["reader"]
    a, b = (
        io.read_tensors(tmp_path / n / "checkpoint" / s["tensors"])
        for n, s in zip(("lanes", "loop"), states, strict=True)
    )
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_nan_in_a_lane_behind_the_others_writes_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TopK (slow) fails at step 4 when BatchTopK has already taken that step: no state holds both at step 3,
    so no checkpoint is written, and the message says so and how to keep the members in step."""
    _, msg = _two_member_run_with_a_nan(tmp_path, "lanes", "topk", True, monkeypatch)
    assert msg.startswith("member topk: loss is nan at step 4 (tokens 768); no checkpoint of this step: btk")
    assert "member_threads=False" in msg and msg.endswith("lower --lr or check the data")
    assert not (tmp_path / "lanes" / "checkpoint" / "state.json").exists()


def test_default_lr_by_width_steps_and_batch() -> None:
    """2e-4 / sqrt(d_sae / 2^14) times sqrt((1200 / steps) * r), r = clamp(batch / 256, 1, 4), clamped to
    [1, 2 sqrt(r)], by hand: from 1024 tokens a step on sqrt(4800 / steps) in [1, 4]; batches of <= 256 tokens keep
    the first rule, min(2, sqrt(1200 / steps)) and at least 1."""
    assert default_lr("topk", 2**14) == pytest.approx(2e-4)
    assert default_lr("topk", 2**14, 300) == pytest.approx(8e-4)  # the demo, 300 x 1024: sqrt(16) = 4
    assert default_lr("topk", 2**14, 300, 4096) == pytest.approx(8e-4)  # above 1024 the batch does not matter
    assert default_lr("topk", 2**14, 256, 4096) == pytest.approx(8e-4)  # sqrt(18.75) = 4.33 -> capped at 4
    assert default_lr("topk", 2**14, 1200, 4096) == pytest.approx(4e-4)  # sqrt(4) = 2
    assert default_lr("topk", 2**14, 1200, 1024) == pytest.approx(4e-4)  # the same (1 until 2026-12-04)
    assert default_lr("jumprelu", 2**14, 4800, 4096) == pytest.approx(2e-4)  # a long run: the plain heuristic
    assert default_lr("topk", 2**14, 9600, 1024) == pytest.approx(2e-4)  # sqrt(0.5) -> at least 1
    assert default_lr("topk", 2**14, 2400, 1024) == pytest.approx(2e-4 * math.sqrt(2))
    assert default_lr("topk", 2**14, 32, 256) == pytest.approx(4e-4)  # sqrt(37.5) -> 2: the first rule
    assert default_lr("topk", 2**14, 32, 64) == pytest.approx(4e-4)  # smaller batches: r stays 1
    assert default_lr("topk", 2**14, 600, 512) == pytest.approx(2e-4 * 2)  # r = 2: sqrt(4) = 2 < 2 sqrt(2)
    assert default_lr("topk", 2**14, 32, 512) == pytest.approx(2e-4 * 2 * math.sqrt(2))  # ceiling 2 sqrt(2)
    assert default_lr("topk", 2**14, 100, 65536) == pytest.approx(8e-4)  # ceiling at most 4
    assert default_lr("topk", 4608, 300, 1024) == pytest.approx(2e-4 / math.sqrt(4608 / 2**14) * 4)
    plan = plan_member(
        MemberConfig(variant="topk", width="4x"), 576, "/nonexistent", steps=300, batch_size=4096
    )
    assert plan.lr == pytest.approx(default_lr("topk", 2304, 300, 4096))
