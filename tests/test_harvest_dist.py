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
def test_a_killed_rank_then_a_rerun_on_one_process_completes(
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
    try:  # the survivor stops at the barrier its peer never reaches: one line, exit 2
        _, err0 = procs[0].communicate(timeout=120)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        raise
    assert procs[0].returncode == 2, err0
    assert "another process of the job stopped" in err0 and "Traceback" not in err0, err0
    partial = Store.open(out).committed_tokens
    assert 0 < partial < 1088 and partial % SHARD == 0, partial
    # Rank 0 went on after its peer died: its shards beyond the first missing one are staged, not committed.
    staged = sorted(int(p.stem) for p in (out / PENDING_DIR).iterdir())
    assert staged and min(staged) > partial // SHARD, (staged, partial)
    files = {p: p.stat().st_mtime_ns for s in staged for p in out.glob(f"acts/*/*/c/{s}/0")}
    on_disk = len(Store.open(out).spec.acts_keys)  # activation arrays on disk (aliased equal sites: once)
    assert on_disk >= 2 and len(files) == on_disk * len(staged)

    results = wait_all(start_ranks(cmd, 1))  # another world size
    assert [code for code, _ in results] == [0], results
    assert f"resuming {out} at " in results[0][1]
    # The staged shards were kept (committed by the rerun, not harvested again).
    assert {p: p.stat().st_mtime_ns for p in files} == files
    report = verify_store(out)
    assert report.ok, report
    _assert_identical(_snapshot(out), _snapshot(reference))
    assert _records(out) == _records(reference)


# ---- object storage: an S3-compatible server on 127.0.0.1 (moto), as zarr-python's own tests run one -------------
@pytest.fixture
def s3(monkeypatch) -> dict[str, str]:
    """A moto S3 server on a free port with one bucket, `harvest`; the AWS variables that point at it (set here
    and handed to subprocesses)."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer
    from ranks import free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    }  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("harvest")
    yield env
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def _remote_committed(url: str) -> int:
    from actcache.store import StoreError

    try:
        return Store.open(url).committed_tokens
    except (StoreError, OSError):
        return 0


@pytest.mark.slow
def test_s3_harvest_killed_resumed_verified_and_trained(s3, tmp_path, reference, tiny_llama_dir, tiny_corpus):
    from actcache.byteio import open_bytes
    from sae_cli import run as run_mod
    from sae_cli.config import LoopConfig, MemberConfig, TrainConfig

    url = "s3://harvest/run.zarr"
    cmd = _command(tiny_llama_dir, tiny_corpus, url)
    [proc] = start_ranks(cmd, 1, slow=0.3, env=s3)
    deadline = time.monotonic() + 120
    while _remote_committed(url) == 0:
        assert proc.poll() is None, wait_all([proc])
        assert time.monotonic() < deadline, "no commit became visible"
        time.sleep(0.2)  # the S3 server shares this process: poll gently
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    partial = Store.open(url).committed_tokens
    assert 0 < partial < 1088 and partial % SHARD == 0, partial

    results = wait_all(start_ranks(cmd, 2, env=s3))  # two ranks: their staging records live in the bucket
    assert [code for code, _ in results] == [0, 0], results
    assert f"resuming {url} at {partial:,} committed tokens" in results[0][1]
    report = verify_store(url)
    assert report.ok, report
    from typer.testing import CliRunner

    from actcache.cli import app

    for command in ("verify", "info"):  # the CLIs take the URL as it is
        shown = CliRunner().invoke(app, [command, url])
        assert shown.exit_code == 0 and url in shown.output, shown.output

    # The bucket holds the local one-process store: the same commit record and manifest records, which hold the
    # size and crc32c of every shard file, and verify just checked every shard object against them.
    remote, local = Store.open(url), Store.open(reference)
    assert remote.committed_tokens == local.committed_tokens == 1088 and remote.complete
    key = "acts/resid_post/2"
    assert remote.read_raw(key, 500, 700).tobytes() == local.read_raw(key, 500, 700).tobytes()
    io = open_bytes(url)
    commit = json.loads(io.read("commit.json"))
    assert commit["digest"] == json.loads((reference / "commit.json").read_text())["digest"]
    assert [io.read(f"manifest/{p.name}").decode() for p in sorted((reference / "manifest").iterdir())] == (
        _records(reference)
    )
    assert io.list("pending") == []

    # Train from the bucket: the run records the store's identity, the same content digest as the local store's.
    loop = LoopConfig(batch_size=128, tokens=512, eval_tokens=128, seed=1, device="cpu", log_every=2)
    member = MemberConfig(variant="topk", layer=2, site="resid_post", width="2x")
    prep = run_mod.prepare_run(
        run_mod.SoloRun(TrainConfig(store=url, member=member, loop=loop), tmp_path / "sae")
    )
    result = run_mod.run_training(prep)
    assert result.step == 4 and result.tokens == 512
    assert (tmp_path / "sae" / "sae.safetensors").is_file()
    recorded = json.loads((tmp_path / "sae" / "train_config.json").read_text())["resolved"]["store_identity"]
    assert recorded["path"] == url
    assert recorded["content"] == local.identity(recorded["tokens"])["content"]
    assert local.identity_mismatch(recorded) is None  # the local copy is the same store, by content


# ---- the launcher's variables --------------------------------------------------------------------------------------
def test_dist_from_env_reads_torchrun_variables() -> None:
    from actcache.dist import Dist

    assert Dist.from_env({}) == Dist(0, 1, 0) and not Dist().multi and Dist().is_main
    d = Dist.from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (d.rank, d.world_size, d.local_rank, d.multi, d.is_main) == (3, 8, 1, True, False)
    assert d.device("cpu") == "cpu" and Dist().device("cuda") == "cuda"  # one process: unchanged
    with pytest.raises(ValueError, match="RANK=8 WORLD_SIZE=8"):
        Dist.from_env({"RANK": "8", "WORLD_SIZE": "8"})
    assert Dist().run_main(lambda: 41 + 1) == 42  # one process: rank 0 decides alone, nothing broadcast


@pytest.mark.parametrize("command", ["actcache", "sae"])
def test_incomplete_launcher_variables_are_one_line(command, monkeypatch, tmp_path) -> None:
    from typer.testing import CliRunner

    from actcache.cli import app as actcache_app
    from sae_cli.cli import app as sae_app

    for name in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    app, args = (
        (actcache_app, ["harvest", "smollm2-135m", "--out", str(tmp_path / "s"), "--dry-run"])
        if command == "actcache"
        else (sae_app, ["train", "topk", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "r")])
    )
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "MASTER_ADDR, MASTER_PORT unset: launch with torchrun" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()
