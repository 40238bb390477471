"""Harvest under faults: damaged committed shards are harvested again bit-exactly (or refused), a full or read-only
disk and a bad environment give one line and exit 2 with the committed data intact, one writer per store."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import actcache.manifest
from actcache.cli import app
from actcache.harvest import SLOW_COMMIT_ENV
from actcache.store import Store
from actcache.verify import verify_store

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(model, corpus, out, *extra) -> list[str]:
    return [str(a) for a in (
        "harvest", model, "--dataset", corpus, "--context", 32, "--tokens", 512, "--shard-tokens", 64,
        "--device", "cpu", "--layers", "0,2", "--sites", "resid_post,mlp_out", "--out", out, *extra,
    )]  # fmt: skip


def _invoke(*args):
    return CliRunner().invoke(app, list(args))


def _one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _files(out: Path) -> dict[str, bytes]:
    """Every file of a store but the commit record's timestamp (bit-identical stores compare equal)."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "commit.json":
                record = json.loads(data)
                record.pop("time")
                data = json.dumps(record).encode()
            files[str(p.relative_to(out))] = data
    return files


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir, tiny_corpus) -> Path:
    out = tmp_path_factory.mktemp("ref") / "store"
    result = _invoke(*_args(tiny_llama_dir, tiny_corpus, out))
    assert result.exit_code == 0, result.output
    return out


def test_deleted_or_flipped_committed_shards_are_harvested_again_bit_exactly(
    reference, tmp_path, tiny_llama_dir, tiny_corpus
):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    store = Store.open(out)
    store.shard_path("acts/mlp_out/2", 3).unlink()
    store.shard_path("token_ids", 7).write_bytes(b"short")  # the last shard, resized
    result = _invoke(*_args(tiny_llama_dir, tiny_corpus, out))
    assert result.exit_code == 0, result.output
    assert "committed shard 3" in result.stderr and "committed shard 7" in result.stderr
    assert "repaired: 2 damaged shard(s)" in result.stderr
    assert _files(out) == _files(reference)

    # A flipped byte keeps the size: only --repair (which reads every committed byte) finds it.
    path = store.shard_path("acts/resid_post/0", 5)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x08
    path.write_bytes(bytes(data))
    plain = _invoke(*_args(tiny_llama_dir, tiny_corpus, out))
    assert plain.exit_code == 0 and "already complete" in plain.stderr
    assert not verify_store(out).ok
    repaired = _invoke(*_args(tiny_llama_dir, tiny_corpus, out, "--repair"))
    assert repaired.exit_code == 0, repaired.output
    assert "repaired: 1 damaged shard(s)" in repaired.stderr
    assert verify_store(out).ok and _files(out) == _files(reference)


def test_a_repair_that_does_not_reproduce_the_committed_bytes_is_refused(
    reference, tmp_path, tiny_llama_dir, tiny_corpus
):
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    out = tmp_path / "store"
    assert _invoke(*_args(model, tiny_corpus, out)).exit_code == 0
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    save_file(
        {k: v + 0.01 * torch.ones_like(v) for k, v in tensors.items()}, weights, metadata={"format": "pt"}
    )
    Store.open(out).shard_path("acts/resid_post/2", 1).unlink()
    _one_error_line(
        _invoke(*_args(model, tiny_corpus, out)), "shard 1", "differs from the committed one", "--overwrite"
    )


def test_disk_full_mid_harvest_keeps_the_committed_data_and_the_rerun_resumes(
    reference, tmp_path, tiny_llama_dir, tiny_corpus, monkeypatch
):
    out = tmp_path / "store"
    real_set = actcache.manifest.DigestingLocalStore._set

    async def full_disk(self, key, value, exclusive=False):
        # The disk fills up at shard 3 (of 8; 64 tokens each), whatever order the writer threads take: shards 0-2
        # are committed, every later write fails.
        if int(key.split("/c/")[1].split("/")[0]) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.root / key))
        await real_set(self, key, value, exclusive=exclusive)

    monkeypatch.setattr(actcache.manifest.DigestingLocalStore, "_set", full_disk)
    line = _one_error_line(
        _invoke(*_args(tiny_llama_dir, tiny_corpus, out)),
        "no space left on the device",
        "intact",
        "free space",
    )
    committed = Store.open(out).committed_tokens
    assert committed == 3 * 64 and f"the {committed:,} tokens committed" in line
    assert verify_store(out).ok
    monkeypatch.undo()
    resumed = _invoke(*_args(tiny_llama_dir, tiny_corpus, out))
    assert resumed.exit_code == 0, resumed.output
    assert _files(out) == _files(reference)


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def test_a_real_full_disk_and_a_read_only_folder(reference, tmp_path, tiny_llama_dir, tiny_corpus):
    """On a real small tmpfs where the machine allows mounting one (root in a container); skipped elsewhere (the
    injected error above covers the same path)."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "200k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = disk / "store"
        result = _invoke(*_args(tiny_llama_dir, tiny_corpus, out, "--force"))
        _one_error_line(result, "no space left on the device", "free space")
        committed = Store.open(out).committed_tokens
        assert committed < 512 and verify_store(out).ok
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        again = _invoke(*_args(tiny_llama_dir, tiny_corpus, disk / "another", "--force"))
        _one_error_line(again, "read-only", "writable disk")
        assert verify_store(out).ok and Store.open(out).committed_tokens == committed
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_read_only_out_folder_by_injection(tmp_path, tiny_llama_dir, tiny_corpus, monkeypatch):
    import actcache.writer

    def read_only(path, spec):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(actcache.writer, "_create", read_only)
    out = tmp_path / "ro" / "store"
    _one_error_line(_invoke(*_args(tiny_llama_dir, tiny_corpus, out)), "read-only", str(out), "writable disk")
    assert not out.exists()


def test_a_second_harvest_into_the_same_store_is_refused(tmp_path, tiny_llama_dir, tiny_corpus):
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "actcache.cli", *_args(tiny_llama_dir, tiny_corpus, out)]
    env = os.environ | {"OMP_NUM_THREADS": "1", SLOW_COMMIT_ENV: "1.0", "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / "commit.json").exists() or Store.open(out).committed_tokens == 0:
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        second = _invoke(*_args(tiny_llama_dir, tiny_corpus, out))
        _one_error_line(second, "is being written by pid", str(first.pid))
        overwrite = _invoke(*_args(tiny_llama_dir, tiny_corpus, out, "--overwrite"))
        _one_error_line(overwrite, "is being written by pid")
    finally:
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert verify_store(out).ok and Store.open(out).committed_tokens == 512


def test_environment_and_corpus_faults_are_one_line(tmp_path, tiny_llama_dir, tiny_corpus):
    out = tmp_path / "store"
    for device, needle in [
        ("foo", "unknown --device foo"),
        ("cuda:0", "no CUDA device"),
        ("cuda:7", "CUDA"),
    ]:
        args = _args(tiny_llama_dir, tiny_corpus, out)
        args[args.index("--device") + 1] = device
        if device.startswith("cuda"):
            import torch

            if torch.cuda.is_available() and device == "cuda:0":
                continue
        _one_error_line(_invoke(*args), needle)
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_llama_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    _one_error_line(_invoke(*_args(truncated, tiny_corpus, out)), "truncated or corrupt", "SafetensorError")
    bad = {
        "bad.parquet": b"not parquet at all",
        "bad.bin": b"12345",
        "bad.npy": b"\x93NUMPY garbage",
        "bad.jsonl": b"\xff\xfe{}\n",
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        _one_error_line(_invoke(*_args(tiny_llama_dir, tmp_path / name, out)), name, "cannot read it as")
    assert not out.exists()
    wide = _invoke(*_args(tiny_llama_dir, tiny_corpus, out, "--workers", "0"))
    _one_error_line(wide, "--workers 0")


def test_more_tokens_than_the_corpus_holds_is_said(tmp_path, tiny_llama_dir, tiny_corpus):
    args = _args(tiny_llama_dir, tiny_corpus, tmp_path / "store", "--dry-run")
    args[args.index("--tokens") + 1] = "10000000"
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    assert "warning: the corpus holds" in result.stderr and "fewer than --tokens 10,000,000" in result.stderr


def test_bad_sizes_and_an_out_path_under_a_file(tmp_path, tiny_llama_dir, tiny_corpus):
    out = tmp_path / "store"
    for flag in ("--shard-tokens", "--chunk-tokens"):
        args = _args(tiny_llama_dir, tiny_corpus, out)
        args = [*args, flag, "0"] if flag not in args else args
        args[args.index(flag) + 1] = "0"
        _one_error_line(_invoke(*args), f"{flag} 0 must be positive")
    (tmp_path / "afile").write_text("x")
    _one_error_line(_invoke(*_args(tiny_llama_dir, tiny_corpus, tmp_path / "afile" / "store")), "afile")
    assert not out.exists()


def test_nan_in_the_model_is_named_and_not_committed(tmp_path, tiny_llama_dir, tiny_corpus):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if "layers.2.mlp.down_proj" in k)
    tensors[name][0, 0] = float("nan")  # every token's mlp_out of layer 2 (and what follows) turns NaN
    save_file(tensors, weights, metadata={"format": "pt"})
    out = tmp_path / "store"
    line = _one_error_line(_invoke(*_args(model, tiny_corpus, out)), "NaN/Inf into acts/", "store token 0")
    assert "was not committed" in line and "weights" in line
    assert Store.open(out).committed_tokens == 0 and verify_store(out).ok
