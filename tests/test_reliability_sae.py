"""Reliability of `sae train|eval|sweep|pareto` (issue 12, the sae side): a run refuses a store other than the one
it recorded, environment faults (full disk, read-only folder, missing device, missing shard) are one line with
exit 2, every numeric option is checked before anything is allocated or written, and NaN/Inf are named (array and
token for data, file and tensor for weights) and never written into JSON as a bare NaN."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_trainer import KEY, TOPK, make_trainer, sparse_acts, write_store
from typer.testing import CliRunner

from actcache.store import make_synthetic_store
from sae_cli import io, trainer
from sae_cli.cli import app
from sae_cli.trainer import TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
# 4096 tokens of d_model 16 (context 64): the default split holds out 448 tokens; 2048 training tokens take ~1 s.
TRAIN = (
    "--layer",
    0,
    "--width",
    "4x",
    "--l0-target",
    4,
    "--tokens",
    2048,
    "--batch-size",
    256,
    "--device",
    "cpu",
)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *needles: str) -> str:
    """Exit code 2, exactly one non-empty line starting with 'error: ' (a progress bar may precede it only after
    training started: then the error is the last line), no traceback; returns the line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.output
    assert sum(line.startswith("error: ") for line in lines) == 1, result.output
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def before_training(result, *needles: str) -> str:
    """one_line_error, and nothing else was printed: the failure came before the run started."""
    line = one_line_error(result, *needles)
    assert len([x for x in result.output.splitlines() if x.strip()]) == 1, result.output
    return line


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (to prove that nothing was written)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def strict_json(path: Path):
    """json.loads that refuses NaN/Infinity (which are not JSON)."""

    def refuse(name: str):
        raise AssertionError(f"{path} holds a bare {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """s0 and s1: same shape, other content (seed); wide: another d_model."""
    root = tmp_path_factory.mktemp("stores")
    make_synthetic_store(root / "s0", tokens=4096, d_model=16, context=64, seed=0)
    make_synthetic_store(root / "s1", tokens=4096, d_model=16, context=64, seed=1)
    make_synthetic_store(root / "wide", tokens=4096, d_model=24, context=64, seed=0)
    return {name: root / name for name in ("s0", "s1", "wide")}


@pytest.fixture(scope="module")
def trained(stores, tmp_path_factory) -> Path:
    """A finished TopK run on s0 with checkpoints every 1024 tokens (copy it before changing it)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    res = invoke("train", "topk", "--store", stores["s0"], *TRAIN, "--checkpoint-every", 1024, "--out", run)
    assert res.exit_code == 0, res.output
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


# ---- 1. store identity ------------------------------------------------------------------------------------------
def test_a_run_records_the_identity_of_its_store(trained: Path, stores) -> None:
    resolved = json.loads((trained / "train_config.json").read_text())["resolved"]
    identity = resolved["store_identity"]
    assert identity["path"] == str(stores["s0"].resolve()) and identity["d_model"] == 16
    # The end of the last range the run reads (the held-out windows end the store).
    assert identity["tokens"] == max(
        resolved[k][1] for k in ("train_range", "calibration_range", "eval_range")
    )
    assert identity["content"]  # a digest of those rows
    assert json.loads((trained / "cfg.json").read_text())["training"]["store_identity"] == identity


@pytest.mark.parametrize(
    ("other", "needle"), [("s1", "the content of its first"), ("wide", "d_model 16 != 24")]
)
def test_resume_on_another_store_is_refused_before_anything_is_written(
    trained: Path, stores, tmp_path: Path, other: str, needle: str
) -> None:
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    line = before_training(
        invoke("train", "--out", run, "--resume", "--store", stores[other], "--tokens", 3072), needle
    )
    assert str(stores[other]) in line and str(stores["s0"].resolve()) in line  # names both stores
    assert snapshot(run) == before
    # The recorded store itself resumes (and runs the extra tokens).
    res = invoke("train", "--out", run, "--resume", "--store", stores["s0"], "--tokens", 3072)
    assert res.exit_code == 0, res.output
    assert json.loads((run / "cfg.json").read_text())["training"]["tokens"] == 3072


def test_a_resume_keeps_the_lr_its_record_resolved(trained: Path, stores, tmp_path: Path) -> None:
    """The default-lr rule may change between a run's start and its resume: the resume reads the resolved lr
    from train_config.json instead of deriving it again (here the record says 3e-3, the rule gives another)."""
    run = copy_run(trained, tmp_path)
    record = json.loads((run / "train_config.json").read_text())
    derived = record["resolved"]["lr"]
    assert record["config"].get("lr") is None and derived != 3e-3  # the run took the rule's lr
    record["resolved"]["lr"] = 3e-3
    (run / "train_config.json").write_text(json.dumps(record))
    res = invoke("train", "--out", run, "--resume", "--store", stores["s0"], "--tokens", 3072)
    assert res.exit_code == 0, res.output
    assert json.loads((run / "cfg.json").read_text())["training"]["lr"] == 3e-3


def test_a_sweep_resume_keeps_each_member_s_recorded_lr(tmp_path: Path) -> None:
    from sae_cli.config import MemberConfig
    from sae_cli.run import keep_recorded_lr
    from sae_cli.training.plan import plan_member

    plans = [
        plan_member(
            MemberConfig(variant=v, layer=0, site="resid_post", width="4x", l0_target=4), 16, tmp_path
        )
        for v in ("topk", "relu")
    ]
    saved = {"members": [{"name": plans[0].name, "lr": 1e-2}, {"name": plans[1].name}]}  # relu: no record
    kept = keep_recorded_lr(plans, saved)
    assert [p.lr for p in kept] == [1e-2, plans[1].lr]
    assert keep_recorded_lr(plans, None) == plans


def test_eval_refuses_another_store_and_runs_made_before_identities_keep_working(
    trained: Path, stores, tmp_path: Path
) -> None:
    run = copy_run(trained, tmp_path)
    one_line_error(
        invoke("eval", run, "--store", stores["s1"], "--no-model", "--device", "cpu"),
        "differs",
        "--other-store",
    )
    assert not (run / "eval.json").exists()
    # A run saved before this change has no store_identity: the old (weaker) check only, as before.
    for name in ("cfg.json", "train_config.json"):
        cfg = json.loads((run / name).read_text())
        (cfg["training"] if name == "cfg.json" else cfg["resolved"]).pop("store_identity")
        (run / name).write_text(json.dumps(cfg))
    res = invoke("eval", run, "--store", stores["s1"], "--no-model", "--device", "cpu")
    assert res.exit_code == 0, res.output
    res = invoke("train", "--out", run, "--resume", "--store", stores["s0"], "--tokens", 2304)
    assert res.exit_code == 0, res.output


def test_sweep_resume_on_another_store_is_refused(stores, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    res = invoke(
        "sweep", "--store", stores["s0"], "--layer", 0, "--variants", "topk", "--l0-target", "2,4", "--width", "4x",
        "--tokens", 1024, "--batch-size", 256, "--device", "cpu", "--no-eval", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["store_identity"]["d_model"] == 16
    member = out / meta["members"][0]["folder"]
    assert (
        json.loads((member / "cfg.json").read_text())["training"]["store_identity"] == meta["store_identity"]
    )
    before = snapshot(out)
    for other, needle in (("s1", "differs"), ("wide", "d_model 16 != 24")):
        line = before_training(invoke("sweep", "--out", out, "--resume", "--store", stores[other]), needle)
        assert "the sweep in" in line
    assert snapshot(out) == before
    # `sae pareto --eval` evaluates the members against the recorded store.
    res = invoke("pareto", out, "--eval", "--no-model", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert strict_json(member / "eval.json")["tokens"] > 0


# ---- 2. environment faults --------------------------------------------------------------------------------------
def fail_on_call(n: int, err: OSError, real):
    """A stand-in for `real` that raises `err` on its n-th call (1-based)."""
    calls = [0]

    def fake(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise err
        return real(*args, **kwargs)

    return fake


def test_a_full_disk_at_the_start_leaves_no_half_made_run(
    stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    full = OSError(errno.ENOSPC, "No space left on device", str(run / "train_config.json"))
    monkeypatch.setattr(io, "write_json_atomic", fail_on_call(1, full, io.write_json_atomic))
    one_line_error(invoke("train", "topk", "--store", stores["s0"], *TRAIN, "--out", run), "no space left")
    assert not run.exists()  # a plain rerun starts cleanly
    monkeypatch.undo()
    res = invoke("train", "topk", "--store", stores["s0"], *TRAIN, "--out", run)
    assert res.exit_code == 0, res.output


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_resume_is_exact(
    stores, trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    full = OSError(errno.ENOSPC, "No space left on device")
    # The second checkpoint (the last one, at 2048 tokens) fails while writing its tensors.
    monkeypatch.setattr(io, "write_tensors_atomic", fail_on_call(2, full, io.write_tensors_atomic))
    args = ("train", "topk", "--store", stores["s0"], *TRAIN, "--checkpoint-every", 1024, "--out", run)
    line = one_line_error(invoke(*args), "no space left", f"sae train --out {run} --resume")
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["tokens"] == 1024 and (run / "checkpoint" / state["tensors"]).is_file()
    assert not [p for p in run.rglob(".*tmp*")], "a temporary file was left behind"
    assert "Traceback" not in line
    monkeypatch.undo()
    res = invoke("train", "--out", run, "--resume")
    assert res.exit_code == 0, res.output
    # Bit-identical to the uninterrupted run of the same settings.
    assert load_file(run / "sae.safetensors").keys() == load_file(trained / "sae.safetensors").keys()
    for k, v in load_file(trained / "sae.safetensors").items():
        assert torch.equal(load_file(run / "sae.safetensors")[k], v), k


@pytest.mark.parametrize(
    ("code", "needle"),
    [(errno.EROFS, "read-only file system"), (errno.EACCES, "no permission"), (errno.EDQUOT, "over quota")],
)
def test_eval_into_an_unwritable_run_is_one_line(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, needle: str
) -> None:
    run = copy_run(trained, tmp_path)
    err = OSError(code, os.strerror(code), str(run / "eval.json"))
    monkeypatch.setattr(io, "write_json_atomic", fail_on_call(1, err, io.write_json_atomic))
    one_line_error(invoke("eval", run, "--no-model", "--device", "cpu"), needle, "eval.json")
    assert not (run / "eval.json").exists()


def test_a_read_only_folder(trained: Path, stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 0o555 on the folders; root writes there anyway, so as root the same errors are injected (density.png
    is the first file `sae eval` writes, train_config.json the first of `sae train`)."""
    from sae_cli import evaluate

    parent = tmp_path / "ro"
    parent.mkdir()
    run = copy_run(trained, parent)
    if os.geteuid() == 0:
        denied = PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(evaluate, "save_density_png", fail_on_call(1, denied, None))
        monkeypatch.setattr(io, "write_json_atomic", fail_on_call(1, denied, None))
    parent.chmod(0o555)
    run.chmod(0o555)
    try:
        one_line_error(invoke("eval", run, "--no-model", "--device", "cpu"), "no permission")
        new = run / "new"  # a fresh run inside the read-only folder
        one_line_error(
            invoke("train", "topk", "--store", stores["s0"], *TRAIN, "--out", new), "no permission"
        )
        assert not new.exists() and not (run / "eval.json").exists()
    finally:
        run.chmod(0o755)
        parent.chmod(0o755)


def test_atomic_writes_map_safetensors_io_errors_and_leave_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class SafetensorError(Exception):  # what safetensors raises, message included
        pass

    def full(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(io, "save_file", full)
    with pytest.raises(OSError) as info:
        io.write_tensors_atomic(tmp_path / "x.safetensors", {"a": torch.zeros(3)})
    assert info.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []
    (tmp_path / "keep.json").write_text('{"old": 1}')
    with pytest.raises(TypeError):
        io.write_json_atomic(tmp_path / "keep.json", {"x": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"] and "old" in (
        tmp_path / "keep.json"
    ).read_text()


@pytest.mark.parametrize("device", ["foo", "cuda:7", "mps", "cuda:0"])
def test_a_device_that_does_not_exist_is_refused_before_anything(stores, tmp_path: Path, device: str) -> None:
    if device == "cuda:0" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    run = tmp_path / "run"
    args = [a if a != "cpu" else device for a in TRAIN]
    before_training(
        invoke("train", "topk", "--store", stores["s0"], *args, "--out", run), f"--device {device}"
    )
    assert not run.exists()
    before_training(invoke("eval", tmp_path, "--device", device), "--device")
    before_training(
        invoke("sweep", "--store", stores["s0"], "--layer", 0, "--device", device, "--out", tmp_path / "sw"),
        "--device",
    )
    assert not (tmp_path / "sw").exists()


def test_a_store_with_a_missing_shard_is_named_with_the_fix(stores, trained: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(stores["s0"], broken)
    shard = next(
        p for p in (broken / "acts").rglob("*") if p.is_file() and "c" in p.relative_to(broken).parts
    )
    shard.unlink()
    run = tmp_path / "run"
    line = one_line_error(
        invoke("train", "topk", "--store", broken, *TRAIN, "--out", run), f"actcache verify {broken}"
    )
    assert str(shard) in line and not run.exists()
    evaluated = copy_run(trained, tmp_path / "e")
    # The missing shard changes nothing the identity covers (the manifest is intact): the read fails.
    one_line_error(
        invoke("eval", evaluated, "--store", broken, "--no-model", "--device", "cpu"), "is missing"
    )
    assert not (evaluated / "eval.json").exists()


def test_pareto_into_a_read_only_sweep_is_one_line(
    stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sweep"
    res = invoke(
        "sweep", "--store", stores["s0"], "--layer", 0, "--l0-target", 4, "--width", "4x", "--tokens", 512,
        "--batch-size", 256, "--device", "cpu", "--no-model", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    from sae_cli import sweep

    err = OSError(errno.EROFS, "Read-only file system", str(out / "summary.md"))
    monkeypatch.setattr(sweep, "write_summary", fail_on_call(1, err, sweep.write_summary))
    before_training(invoke("pareto", out), "read-only file system", "summary.md")


# ---- 3. numeric options -----------------------------------------------------------------------------------------
TOML_BAD = [
    ("mix_chunks = 0", "--mix-chunks must be at least 1"),
    ("threads = 0", "--threads must be at least 1"),
    ("norm_sample_tokens = 0", "--norm-sample-tokens must be at least 1"),
    ("warmup_steps = -1", "--warmup-steps must be >= 0"),
    ("dead_window_tokens = -5", "--dead-window-tokens must be >= 0"),
    ("calibration_tokens = -1", "--calibration-tokens must be >= 0"),
    ("grad_clip = -1.0", "--grad-clip must be >= 0"),
    ("grad_clip = inf", "--grad-clip must be a finite number"),
    ("max_norm_ratio = 0.5", "--max-norm-ratio must be 0"),
    ("max_norm_ratio = nan", "--max-norm-ratio must be a finite number"),
    ("decay_fraction = nan", "--decay-fraction must be a finite number"),
    ("decay_fraction = 1.5", "must lie in [0, 1]"),
]
CLI_BAD = [
    (("--l0-target", 64), "is not below the width (64 latents"),
    (("--l0-target", 100), "is not below the width"),
    (("--l0-target", "nan"), "--l0-target must be a finite number"),
    (("--l0-target", "inf"), "--l0-target must be a finite number"),
    (("--sparsity-coef", -0.1), "--sparsity-coef must be >= 0"),
    (("--sparsity-coef", "nan"), "--sparsity-coef must be a finite number"),
    (("--lr", "nan"), "--lr must be a finite number"),
    (("--lr", -1), "--lr must be a positive number"),
    (("--log-every", 0), "--log-every must be at least 1"),
    (("--log-every", -2), "--log-every must be at least 1"),
    (("--batch-size", -1), "--batch-size must be >= 0"),
    (("--tokens", -5), "--tokens must be >= 0"),
    (("--eval-tokens", -64), "--eval-tokens must be >= 0"),
    (("--checkpoint-every", -1), "--checkpoint-every must be >= 0"),
    (("--seed", -1), "--seed must be >= 0"),
    (("--width", "infx"), "bad width 'infx'"),
    (("--width", "nanx"), "bad width 'nanx'"),
]


@pytest.mark.parametrize(("extra", "needle"), CLI_BAD, ids=[" ".join(map(str, e)) for e, _ in CLI_BAD])
def test_meaningless_train_options_are_refused_before_anything(
    stores, tmp_path: Path, extra: tuple, needle: str
) -> None:
    run = tmp_path / "run"
    args = list(TRAIN)
    for flag, value in zip(extra[::2], extra[1::2], strict=True):  # replace the flag when TRAIN has it
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    before_training(invoke("train", "topk", "--store", stores["s0"], *args, "--out", run), needle)
    assert not run.exists()


@pytest.mark.parametrize(("line", "needle"), TOML_BAD, ids=[line for line, _ in TOML_BAD])
def test_meaningless_loop_settings_in_toml_are_refused(
    stores, tmp_path: Path, line: str, needle: str
) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(line + "\n")
    run = tmp_path / "run"
    before_training(
        invoke("train", "topk", "--store", stores["s0"], *TRAIN, "--config", cfg, "--out", run), needle
    )
    assert not run.exists()


def test_the_memory_check_comes_before_any_sae_is_built(
    stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = []
    monkeypatch.setattr(trainer, "check_variant_options", lambda plans: built.append(plans))
    run = tmp_path / "run"
    args = [a if a != "4x" else "100000000x" for a in TRAIN]
    before_training(invoke("train", "topk", "--store", stores["s0"], *args, "--out", run), "lower --width")
    before_training(
        invoke(
            "sweep", "--store", stores["s0"], "--layer", 0, "--width", "100000000x", "--device", "cpu",
            "--out", tmp_path / "sw",
        ),
        "not even one member fits",
    )  # fmt: skip
    assert built == [] and not run.exists() and not (tmp_path / "sw").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--tokens", -1), "--tokens must be >= 0"),
        (("--lm-tokens", -1), "--lm-tokens must be >= 0"),
        (("--batch-size", 0), "--batch-size must be at least 1"),
        (("--batch-size", -8), "--batch-size must be at least 1"),
    ],
)
def test_meaningless_eval_options_are_refused(
    trained: Path, tmp_path: Path, extra: tuple, needle: str
) -> None:
    run = copy_run(trained, tmp_path)
    before_training(invoke("eval", run, "--no-model", "--device", "cpu", *extra), needle)
    assert not (run / "eval.json").exists() and not (run / "density.png").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--l0-target", "4,nan"), "--l0-target nan must be a positive number"),
        (("--l0-target", "-4"), "must be a positive number"),
        (("--l0-target", "4,64"), "is not below the width (64 latents"),
        (("--width", "0"), "it must be positive"),
        (("--log-every", 0), "--log-every must be at least 1"),
        (("--lm-tokens", -1), "--lm-tokens must be >= 0"),
        (("--batch-size", -1), "--batch-size must be >= 0"),
        (("--seed", -3), "--seed must be >= 0"),
    ],
)
def test_meaningless_sweep_options_are_refused(stores, tmp_path: Path, extra: tuple, needle: str) -> None:
    out = tmp_path / "sweep"
    base = {"--layer": 0, "--width": "4x", "--l0-target": "4", "--device": "cpu"}
    base.update(dict(zip(extra[::2], extra[1::2], strict=True)))
    args = [x for kv in base.items() for x in kv]
    before_training(invoke("sweep", "--store", stores["s0"], *args, "--out", out), needle)
    assert not out.exists()


def test_a_run_that_never_reached_its_first_checkpoint_is_replaced_or_explained(
    stores, trained: Path, tmp_path: Path
) -> None:
    """kill -9 before the first checkpoint leaves train_config.json alone: a plain rerun starts over, --resume
    says why it cannot. (A failure in-process removes the folder itself: see the full-disk test.)"""
    from sae_cli.sweep import SweepConfig

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained / "train_config.json", run)
    before_training(invoke("train", "--out", run, "--resume"), "stopped before its first checkpoint")
    res = invoke("train", "topk", "--store", stores["s0"], *TRAIN, "--out", run)
    assert res.exit_code == 0, res.output
    assert (run / "cfg.json").is_file()
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    meta = {"format": "sae_cli.sweep", "config": SweepConfig(store=str(stores["s0"])).to_dict()}
    (sweep / "sweep.json").write_text(json.dumps(meta))
    before_training(invoke("sweep", "--out", sweep, "--resume"), "stopped before its first checkpoint")


# ---- 4. NaN / Inf -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nan_store(tmp_path_factory) -> Path:
    """float32, 2048 tokens of d 16, one NaN at store token 1000 (training range) and one Inf at 1900 (held out)."""
    x = sparse_acts(2048, 16, 64, 4)
    x[1000, 3] = float("nan")
    x[1900, 5] = float("inf")
    root = tmp_path_factory.mktemp("nan-store")
    write_store(root / "store", {KEY: x})
    return root / "store"


def test_nan_in_the_data_names_the_array_and_the_store_token(nan_store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    before_training(
        invoke("train", "topk", "--store", nan_store, *TRAIN, "--out", run),
        "NaN/Inf in acts/resid_post/0 at store token 1000",
        "actcache verify",
    )
    assert not run.exists()
    before_training(  # the sweep's header comes once its members started: not before this error
        invoke(
            "sweep", "--store", nan_store, "--layer", 0, "--width", "4x", "--l0-target", 4, "--device", "cpu",
            "--out", tmp_path / "sw",
        ),
        "acts/resid_post/0 at store token 1000",
    )  # fmt: skip
    assert not (tmp_path / "sw").exists()


def test_nan_met_during_training_names_the_array(nan_store: Path, tmp_path: Path) -> None:
    from actcache.store import Store

    store = Store.open(nan_store)
    run, sample = make_trainer(store, tmp_path / "run", [TOPK], tokens=256 * 20, normalize="none")
    run.start({KEY: torch.nan_to_num(sample[KEY])}, {KEY: 1.0})
    with pytest.raises(TrainingError, match=r"at store token 1000 \(array acts/resid_post/0, step \d+"):
        run.run()


def test_eval_names_non_finite_data_and_writes_nothing(nan_store: Path, tmp_path: Path) -> None:
    run, sample = make_trainer(
        __import__("actcache.store").store.Store.open(nan_store), tmp_path / "run", [TOPK], tokens=512
    )
    run.start({KEY: torch.nan_to_num(sample[KEY])}, {KEY: 1.0})
    run.run()
    folder = tmp_path / "run" / "topk"
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["training"].update(eval_range=[1536, 2048], store=str(nan_store))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    one_line_error(
        invoke("eval", folder, "--no-model", "--device", "cpu"), "acts/resid_post/0 at store token 1900"
    )
    assert not (folder / "eval.json").exists()


def test_nan_weights_name_the_file_and_the_tensor(trained: Path, tmp_path: Path) -> None:
    run = copy_run(trained, tmp_path)
    weights = load_file(run / "sae.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, run / "sae.safetensors")
    before_training(
        invoke("eval", run, "--no-model", "--device", "cpu"), f"{run / 'sae.safetensors'}", f"tensor {name}"
    )
    assert not (run / "eval.json").exists()


def test_a_nan_checkpoint_is_named_on_resume(trained: Path, tmp_path: Path) -> None:
    run = copy_run(trained, tmp_path)
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    path = run / "checkpoint" / state["tensors"]
    tensors = load_file(path)
    name = next(k for k in sorted(tensors) if ".sae." in k)
    tensors[name].view(-1)[-1] = float("inf")
    save_file(tensors, path)
    before = snapshot(run)
    before_training(invoke("train", "--out", run, "--resume", "--tokens", 3072), str(path), f"tensor {name}")
    assert snapshot(run) == before


def test_eval_json_never_holds_a_bare_nan(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sae_cli import metrics

    real = metrics.ReconstructionMetrics.result
    monkeypatch.setattr(
        metrics.ReconstructionMetrics,
        "result",
        lambda self: {**real(self), "shrinkage": math.nan, "mse": math.inf},
    )
    run = copy_run(trained, tmp_path)
    res = invoke("eval", run, "--no-model", "--device", "cpu")
    assert res.exit_code == 0, res.output
    ev = strict_json(run / "eval.json")
    assert ev["shrinkage"] is None and ev["mse"] is None and ev["fvu"] >= 0
    strict_json(run / "cfg.json")
    assert io.json_safe({"a": [1.0, math.nan, {"b": -math.inf}], "c": "nan"}) == {
        "a": [1.0, None, {"b": None}],
        "c": "nan",
    }


def test_a_second_process_training_into_the_same_folder_is_refused(stores, tmp_path: Path) -> None:
    """The run / sweep folder lock (actcache.lock beside --out): held for the whole command, dropped after."""
    run, sweep_out = tmp_path / "run", tmp_path / "sweep"
    held = io.run_lock(
        run
    )  # stands for another `sae train` in flight (flock: per open file, so in-process too)
    try:
        line = before_training(
            invoke("train", "topk", "--store", stores["s0"], *TRAIN, "--out", run), "is being written by pid"
        )
        assert f"pid {os.getpid()}" in line and "training run" in line
        assert not run.exists()
    finally:
        held.release()
    with io.run_lock(sweep_out, "sweep"):
        before_training(
            invoke("sweep", "--store", stores["s0"], "--layer", 0, "--variants", "topk", "--l0-target", 4,
                   "--width", "4x", "--tokens", 1024, "--batch-size", 256, "--device", "cpu", "--no-eval",
                   "--out", sweep_out),
            "is being written by pid", "sweep",
        )  # fmt: skip
    assert not sweep_out.exists()
    res = invoke("train", "topk", "--store", stores["s0"], *TRAIN, "--out", run)
    assert res.exit_code == 0, res.output
    with io.run_lock(run):  # released when the command ended
        pass


def test_damaged_run_records_are_one_line(stores, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    res = invoke(
        "sweep", "--store", stores["s0"], "--layer", 0, "--variants", "topk", "--l0-target", 4, "--width", "4x",
        "--tokens", 1024, "--batch-size", 256, "--device", "cpu", "--no-eval", "--checkpoint-every", 256,
        "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    good = json.loads((out / "sweep.json").read_text())
    cases = [
        (lambda d: d.pop("train_range"), "recorded token ranges are damaged"),
        (lambda d: d.update(eval_range=[9, 3]), "recorded token ranges are damaged"),
        (lambda d: d["config"].pop("variants"), "sweep.json is damaged"),
    ]
    for edit, needle in cases:
        meta = json.loads(json.dumps(good))
        edit(meta)
        (out / "sweep.json").write_text(json.dumps(meta))
        before_training(invoke("sweep", "--out", out, "--resume", "--device", "cpu"), needle, "--overwrite")
    (out / "sweep.json").write_text("[1]")
    before_training(invoke("sweep", "--out", out, "--resume", "--device", "cpu"), "not an sae sweep file")


def test_eval_of_a_folder_that_is_no_sae_prints_only_its_error(tmp_path: Path) -> None:
    """No empty progress line before the error (rich prints one when a progress view stops off a terminal)."""
    before_training(invoke("eval", tmp_path / "nothing", "--no-model"), "is not a trained SAE")


def test_eval_on_another_text_reads_all_of_that_store(trained: Path, stores, tmp_path: Path) -> None:
    run = copy_run(trained, tmp_path)
    base = ("eval", run, "--no-model", "--device", "cpu", "--other-store")
    one_line_error(invoke(*base), "--other-store", "--store")
    one_line_error(invoke(*base, "--store", stores["s0"]), "is the store this SAE was trained on")
    one_line_error(invoke(*base, "--store", stores["wide"]), "d_model=24")
    assert not (run / "eval.json").exists()
    res = invoke(*base, "--store", stores["s1"])
    assert res.exit_code == 0, res.output
    ev = json.loads((run / "eval.json").read_text())
    assert ev["other_store"] is True and ev["eval_range"] == [0, 4096]
    assert ev["store"] == str(stores["s1"]) and sum(d["tokens"] for d in ev["by_document"]) == ev["tokens"]
    res = invoke(*base, "--store", stores["s1"], "--tokens", 100)  # whole windows of 64 tokens
    assert res.exit_code == 0, res.output
    assert json.loads((run / "eval.json").read_text())["eval_range"] == [0, 128]
