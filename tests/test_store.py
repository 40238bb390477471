"""Store format: round trips, statistics, atomic commits and resume, spec/version errors, chunk planning."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from actcache.codecs import DEFAULT_CODEC, from_stored, to_stored
from actcache.stats import RunningStats
from actcache.store import (
    FLAG_BOS,
    FORMAT_VERSION,
    Store,
    StoreError,
    StoreSpec,
    StoreWriter,
    make_synthetic_store,
    plan_bytes,
    plan_chunks,
)


def small_spec(**kw) -> StoreSpec:
    base = dict(
        model="tiny", revision=None, dtype="bfloat16", layers=(0, 2), sites=("resid_post", "mlp_out"), d_model=16,
        context=32, corpus="synthetic", tokenizer="tiny", tokens_target=600, chunk_tokens=64, shard_tokens=256,
        codec="blosc-zstd1-shuffle", harvest_config={"batch": 4},
    )  # fmt: skip
    base.update(kw)
    return StoreSpec(**base)


def token_arrays(start: int, n: int) -> dict[str, np.ndarray]:
    pos = np.arange(start, start + n) % 32
    return {
        "token_ids": np.arange(start, start + n, dtype=np.int32),
        "doc_ids": np.arange(start, start + n) // 32,
        "positions": pos,
        "flags": (pos == 0).astype(np.uint8) * FLAG_BOS,
    }


def write(writer: StoreWriter, start: int, x_ND: torch.Tensor, commit: bool = True) -> None:
    n = len(x_ND)
    writer.write_shard(start, {**{k: x_ND for k in writer.spec.acts_keys}, **token_arrays(start, n)})
    if commit:
        writer.commit(start + n, {k: RunningStats(x_ND.shape[1]).update(x_ND) for k in writer.spec.acts_keys})


# The planted inf makes the statistics' mean nan (numpy warns).
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_round_trip_bit_exact(tmp_path: Path, dtype: str) -> None:
    spec = small_spec(dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    # Include the awkward values: signed zero, inf, subnormals, large magnitudes.
    x_ND = (torch.randn(600, 16, generator=gen) * 30).to(getattr(torch, dtype))
    x_ND[0, :4] = torch.tensor([-0.0, float("inf"), 1e-40, -3e4]).to(x_ND.dtype)
    writer = StoreWriter.create_or_resume(tmp_path / "s", spec)
    for start in range(0, 600, 256):
        write(writer, start, x_ND[start : start + 256])
    store = Store.open(tmp_path / "s")
    assert store.committed_tokens == 600 and store.complete
    raw = store.read_raw("acts/mlp_out/2", 0, 600)
    back = from_stored(raw, dtype)
    assert back.dtype == x_ND.dtype
    int_dtype = torch.int32 if dtype == "float32" else torch.int16
    assert torch.equal(back.view(int_dtype), x_ND.view(int_dtype))  # bit patterns, so -0.0 and inf count
    f32 = store.read_acts(2, "mlp_out", 100, 300)
    assert f32.dtype == np.float32 and np.array_equal(f32, x_ND[100:300].float().numpy())
    assert np.array_equal(store.read("token_ids", 0, 600), np.arange(600))
    assert store.read("flags", 0, 64).tolist() == [1] + [0] * 31 + [1] + [0] * 31


def test_to_stored_accepts_bits_floats_and_tensors() -> None:
    x = torch.randn(5, 3).to(torch.bfloat16)
    bits = to_stored(x, "bf16")
    assert bits.dtype == np.uint16
    assert np.array_equal(to_stored(bits, "bfloat16"), bits)  # uint16 is taken as bits already
    assert np.array_equal(to_stored(x.float().numpy(), "bfloat16"), bits)  # exact bf16 values survive fp32
    assert torch.equal(from_stored(bits, "bfloat16", torch.float32), x.float())


def test_running_stats_match_numpy_on_concatenation() -> None:
    rng = np.random.default_rng(1)
    parts = [rng.normal(3.0, 2.0, size=(n, 7)) for n in (1, 50, 333, 2)]
    total = RunningStats(7)
    for p in parts[:2]:
        total.update(p)
    other = RunningStats(7)
    for p in parts[2:]:
        other.update(torch.from_numpy(p))
    total.merge(other)
    cat = np.concatenate(parts)
    assert total.count == 386
    np.testing.assert_allclose(total.mean, cat.mean(0), rtol=1e-13)
    np.testing.assert_allclose(total.mean_sq_norm, (cat**2).sum(1).mean(), rtol=1e-13)
    keep = rng.random(len(cat)) > 0.3
    masked = RunningStats(7).update(cat, keep=keep)
    assert masked.count == keep.sum()
    np.testing.assert_allclose(masked.mean, cat[keep].mean(0), rtol=1e-13)
    back = RunningStats.from_json(json.loads(json.dumps(total.to_json())))
    assert back.count == total.count and np.array_equal(back.mean, total.mean)


def test_store_stats_accumulate_over_commits(tmp_path: Path) -> None:
    x_ND = torch.randn(600, 16).to(torch.bfloat16)
    writer = StoreWriter.create_or_resume(tmp_path / "s", small_spec())
    for start in range(0, 600, 256):
        write(writer, start, x_ND[start : start + 256])
    stats = Store.open(tmp_path / "s").stats(0, "resid_post")
    ref = x_ND.double().numpy()
    assert stats["count"] == 600
    np.testing.assert_allclose(stats["mean"], ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["mean_sq_norm"], (ref**2).sum(1).mean(), rtol=1e-12)


def test_uncommitted_data_is_invisible_and_resume_rewrites_it(tmp_path: Path) -> None:
    spec = small_spec()
    x_ND = torch.randn(600, 16).to(torch.bfloat16)
    writer = StoreWriter.create_or_resume(tmp_path / "s", spec)
    write(writer, 0, x_ND[:256])
    write(writer, 256, torch.zeros(256, 16), commit=False)  # "crash" between write_shard and commit
    store = Store.open(tmp_path / "s")
    assert store.committed_tokens == 256
    with pytest.raises(StoreError, match="committed"):
        store.read_acts(0, "resid_post", 0, 300)
    # A torn shard file from the killed run must not trouble the resumed one.
    torn = store.shard_path("acts/mlp_out/2", 1)
    torn.write_bytes(torn.read_bytes()[:100])
    writer.close()  # the killed process's store lock went with it
    resumed = StoreWriter.create_or_resume(tmp_path / "s", spec)
    assert resumed.committed_tokens == 256
    with pytest.raises(StoreError, match="never rewritten"):
        resumed.write_shard(0, {"flags": np.zeros(256, np.uint8)})
    write(resumed, 256, x_ND[256:512])
    write(resumed, 512, x_ND[512:])
    store = Store.open(tmp_path / "s")
    assert store.committed_tokens == 600
    assert np.array_equal(store.read_acts(2, "mlp_out", 0, 600), x_ND.float().numpy())
    assert store.stats(2, "mlp_out")["count"] == 600  # the uncommitted attempt was not counted


def test_commit_requires_every_array_written(tmp_path: Path) -> None:
    writer = StoreWriter.create_or_resume(tmp_path / "s", small_spec())
    writer.write_shard(0, {"acts/resid_post/0": torch.zeros(256, 16), **token_arrays(0, 256)})
    with pytest.raises(StoreError, match="was not written"):
        writer.commit(256, {})
    with pytest.raises(StoreError, match="multiple of 256"):
        writer.write_shard(100, {"flags": np.zeros(10, np.uint8)})
    assert Store.open(tmp_path / "s").committed_tokens == 0


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from actcache.store import StoreSpec, StoreWriter
    spec = StoreSpec(model="tiny", revision=None, dtype="bfloat16", layers=(0,), sites=("resid_post",),
        d_model=64, context=32, corpus="c", tokenizer="t", tokens_target=10**7, chunk_tokens=64,
        shard_tokens=256, codec="blosc-zstd1-shuffle")
    w = StoreWriter.create_or_resume(sys.argv[1], spec)
    start = w.committed_tokens
    while True:
        x = (torch.arange(start, start + 256).float()[:, None] + torch.zeros(256, 64)).to(torch.bfloat16)
        z = np.zeros(256, np.int32)
        w.write_shard(start, {"acts/resid_post/0": x, "token_ids": z, "doc_ids": z, "positions": z, "flags": z})
        w.commit(start + 256, {})
        start += 256
        if start == 2048:
            print("ready", flush=True)
    """
)


@pytest.mark.slow
def test_kill_9_mid_harvest_leaves_a_readable_resumable_store(tmp_path: Path) -> None:
    path = tmp_path / "s"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(path)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = Store.open(path)
    n = store.committed_tokens
    assert n >= 2048 and n % 256 == 0
    # Bit-exact below the commit: row i holds the value i (exactly representable in bf16 up to 256, so compare
    # against the same bf16 rounding).
    expected = torch.arange(n).float().to(torch.bfloat16).float().numpy()
    assert np.array_equal(store.read_acts(0, "resid_post", 0, n)[:, 5], expected)
    from actcache.verify import verify_store

    assert verify_store(path).ok
    spec = store.spec
    assert StoreWriter.create_or_resume(path, spec).committed_tokens == n


def test_spec_mismatch_names_both_fixes(tmp_path: Path) -> None:
    StoreWriter.create_or_resume(tmp_path / "s", small_spec())
    assert StoreWriter.create_or_resume(tmp_path / "s", small_spec(layers=[0, 2])).committed_tokens == 0
    with pytest.raises(StoreError) as err:
        StoreWriter.create_or_resume(tmp_path / "s", small_spec(d_model=32))
    msg = str(err.value)
    assert "d_model: 16 != 32" in msg and "rerun the same command to resume" in msg and "--overwrite" in msg
    writer = StoreWriter.create_or_resume(tmp_path / "s", small_spec(d_model=32), overwrite=True)
    assert Store.open(tmp_path / "s").spec.d_model == 32 and writer.committed_tokens == 0


def test_newer_format_and_non_store_errors(tmp_path: Path) -> None:
    StoreWriter.create_or_resume(tmp_path / "s", small_spec())
    meta_path = tmp_path / "s" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["actcache"]["format_version"] = FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    expected = f"newer actcache \\(format {FORMAT_VERSION + 1} > {FORMAT_VERSION}\\); upgrade actcache"
    with pytest.raises(StoreError, match=expected):
        Store.open(tmp_path / "s")
    with pytest.raises(StoreError, match=expected):
        StoreWriter.create_or_resume(tmp_path / "s", small_spec(), overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an actcache store"):
        StoreWriter.create_or_resume(tmp_path / "other", small_spec(), overwrite=True)
    assert (tmp_path / "other" / "notes.txt").exists()
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(tmp_path / "missing")
    store = make_synthetic_store(tmp_path / "syn", tokens=256, chunk_tokens=64, shard_tokens=128)
    with pytest.raises(StoreError, match="holds layers \\[0\\] and sites \\['resid_post'\\]"):
        store.acts(3, "resid_post")
    with pytest.raises(StoreError, match="unknown site"):
        StoreWriter.create_or_resume(tmp_path / "bad", small_spec(sites=("resid_mid",)))
    assert not (tmp_path / "bad").exists()


def test_plan_chunks_and_plan_bytes() -> None:
    for d_model, context, n_arrays in [(576, 256, 120), (576, 1024, 1), (3584, 1024, 168), (16384, 2048, 4)]:
        chunk, shard = plan_chunks(d_model, context, "bfloat16", n_arrays)
        assert shard % chunk == 0 and shard % context == 0
        assert 2**18 <= chunk * d_model * 2 <= 2**22, (d_model, chunk)  # 256 KiB .. 4 MiB decoded
        assert 1 <= shard // chunk <= 64
        assert shard * d_model * 2 * n_arrays <= 2**31  # the harvest's shard buffers stay bounded
    assert plan_chunks(576, 256, "bf16", 1) == (1024, 65536)
    spec = small_spec(tokens_target=10**6, d_model=576, codec="none", layers=(0,), sites=("resid_post",))
    raw = 10**6 * 576 * 2
    assert raw < plan_bytes(spec) < 1.1 * raw
    assert plan_bytes(dataclasses.replace(spec, dtype="float32")) > 1.9 * raw


@pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr version 3 specification")
@pytest.mark.parametrize("codec", ["none", "zstd-1", DEFAULT_CODEC, "blosc-lz4-bitshuffle", "shuffle-zstd1"])
def test_fast_chunk_decoder_matches_zarr_for_every_codec(tmp_path: Path, codec: str) -> None:
    store = make_synthetic_store(
        tmp_path / "s", tokens=700, d_model=8, context=50, chunk_tokens=100, shard_tokens=200, codec=codec
    )
    for key in ("acts/resid_post/0", "token_ids", "flags", "doc_ids"):
        for chunk in range(7):
            fast = store.read_chunk(key, chunk)
            assert np.array_equal(fast, store.read_raw(key, chunk * 100, chunk * 100 + 100)), (key, chunk)
    with pytest.raises(StoreError, match="committed"):
        store.read_chunk("flags", 7)
