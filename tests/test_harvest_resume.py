"""Crash safety: a harvest killed with SIGKILL and rerun with the same command ends
with a store identical to an uninterrupted run's, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from actcache.harvest import SLOW_COMMIT_ENV
from actcache.store import Store

SHARD = 64


def _command(model_dir: Path, corpus: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "actcache.cli", "harvest", str(model_dir), "--dataset", str(corpus),
        "--context", "32", "--shard-tokens", str(SHARD), "--batch-size", "2", "--dtype", "bf16",
        "--device", "cpu", "--layers", "0,2,3", "--out", str(out),
    ]  # fmt: skip


def _start(cmd: list[str], slow: float = 0.0) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", SLOW_COMMIT_ENV: str(slow), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _committed(out: Path) -> int:
    try:
        return int(json.loads((out / "commit.json").read_text())["committed_tokens"])
    except (OSError, ValueError, KeyError):
        return 0


def _wait_for_first_commit(proc: subprocess.Popen, out: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while _committed(out) == 0:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no commit became visible"
        time.sleep(0.01)


def _snapshot(out: Path) -> dict:
    """Every committed row of every array, and the metadata (commit record without its timestamp)."""
    store = Store.open(out)
    n = store.committed_tokens
    arrays = {key: np.asarray(store.array(key)[:n]) for key in store.spec.array_keys}
    commit = json.loads((out / "commit.json").read_text())
    commit.pop("time")
    root = json.loads((out / "zarr.json").read_text())["attributes"]
    return {"n": n, "arrays": arrays, "commit": commit, "root": root}


def _assert_identical(a: dict, b: dict) -> None:
    assert a["n"] == b["n"] > 0
    assert a["arrays"].keys() == b["arrays"].keys()
    for key in a["arrays"]:
        x, y = a["arrays"][key], b["arrays"][key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.tobytes() == y.tobytes(), key
    assert a["commit"] == b["commit"]
    assert a["root"] == b["root"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_stopped_by_a_signal_then_rerun_gives_the_uninterrupted_store(
    sig, tmp_path, tiny_llama_dir, tiny_corpus
):
    """SIGKILL after the first commit: the committed shards survive. SIGTERM (kill, a scheduler) stops it as Ctrl-C
    does: the complete shards are committed, exit 130 with the resume hint. Either way the rerun of the same
    command ends with the uninterrupted store, bit for bit."""
    outs = {name: tmp_path / name for name in ("reference", "stopped")}
    cmds = {name: _command(tiny_llama_dir, tiny_corpus, out) for name, out in outs.items()}
    reference = _start(cmds["reference"])
    stopped = _start(cmds["stopped"], slow=0.3)

    _wait_for_first_commit(stopped, outs["stopped"])
    stopped.send_signal(sig)
    out, err = stopped.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert stopped.returncode == -signal.SIGKILL
    else:
        assert stopped.returncode == 130, err
        assert "interrupted" in out + err and "rerun the same command to resume" in out + err, out + err
    assert reference.wait(timeout=120) == 0, reference.communicate()
    target = Store.open(outs["reference"]).committed_tokens
    partial = Store.open(outs["stopped"]).committed_tokens
    assert 0 < partial < target and partial % SHARD == 0, (partial, target)

    resumed = _start(cmds["stopped"])
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"resuming {outs['stopped']} at {partial:,} committed tokens" in err
    expected = _snapshot(outs["reference"])
    assert expected["commit"]["complete"] and expected["n"] == target
    _assert_identical(_snapshot(outs["stopped"]), expected)
