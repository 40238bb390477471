"""A multi-process harvest (gloo on CPU, launched as torchrun launches: RANK / WORLD_SIZE / MASTER_PORT in the
environment) writes the same store as one process, byte for byte; a rank killed midway leaves a store that a
rerun, with any number of processes, completes and verifies."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ranks import start_ranks, wait_all
from test_harvest_resume import _assert_identical, _snapshot

from actcache.staging import PENDING_DIR
from actcache.store import Store
from actcache.verify import verify_store

SHARD = 64


def _command(model_dir: Path, corpus: Path, out: str) -> list[str]:
    return [
        sys.executable, "-m", "actcache.cli", "harvest", str(model_dir), "--dataset", str(corpus),
        "--context", "32", "--shard-tokens", str(SHARD), "--batch-size", "2", "--dtype", "bf16",
        "--device", "cpu", "--layers", "0,2,3", "--out", out,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir, tiny_corpus) -> Path:
    """The one-process harvest of the corpus."""
    out = tmp_path_factory.mktemp("dist") / "one"
    [(code, err)] = wait_all(start_ranks(_command(tiny_llama_dir, tiny_corpus, str(out)), 1))
    assert code == 0, err
    return out


def _records(out: Path) -> list[str]:
    return [p.read_text() for p in sorted((out / "manifest").iterdir())]


def _committed(out: Path) -> int:
    try:
        return int(json.loads((out / "commit.json").read_text())["committed_tokens"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_two_ranks_write_the_one_process_store(tmp_path, reference, tiny_llama_dir, tiny_corpus) -> None:
    out = tmp_path / "two"
    results = wait_all(start_ranks(_command(tiny_llama_dir, tiny_corpus, str(out)), 2))
    assert [code for code, _ in results] == [0, 0], results
    # Rank 0 forwards only every other shard and the fold stops at the first shard never staged, so a complete
    # store proves rank 1 wrote its half.
    expected = _snapshot(reference)
    assert expected["commit"]["complete"] and expected["n"] == 1088 and expected["n"] // SHARD >= 16
    _assert_identical(_snapshot(out), expected)  # every array, the commit record (but its time), the root
    assert _records(out) == _records(reference)  # the manifest, byte for byte
    assert not (out / PENDING_DIR).exists()  # the staging records are gone
    assert "done: 1,088 tokens" in results[0][1] and "done" not in results[1][1]  # only rank 0 prints


@pytest.mark.slow
def test_a_killed_rank_then_a_rerun_on_three_ranks_completes(
    tmp_path, reference, tiny_llama_dir, tiny_corpus
) -> None:
    out = tmp_path / "killed"
    cmd = _command(tiny_llama_dir, tiny_corpus, str(out))
    procs = start_ranks(cmd, 2, slow=0.3)
    deadline = time.monotonic() + 120
    while _committed(out) == 0:
        assert all(p.poll() is None for p in procs), wait_all(procs)
        assert time.monotonic() < deadline, "no commit became visible"
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGKILL)
    assert procs[1].wait() == -signal.SIGKILL
    try:
        code0 = procs[0].wait(timeout=120)  # the survivor stops at the barrier its peer never reaches
    except subprocess.TimeoutExpired:
        procs[0].kill()
        raise
    assert code0 != 0
    partial = Store.open(out).committed_tokens
    assert 0 < partial < 1088 and partial % SHARD == 0, partial

    results = wait_all(start_ranks(cmd, 3))  # another world size
    assert [code for code, _ in results] == [0, 0, 0], results
    assert f"resuming {out} at " in results[0][1]
    report = verify_store(out)
    assert report.ok, report
    _assert_identical(_snapshot(out), _snapshot(reference))
    assert _records(out) == _records(reference)
