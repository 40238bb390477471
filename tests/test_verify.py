"""verify_store names the exact corrupted chunk; `actcache verify|info` exit codes and output."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from actcache.store import Store, make_synthetic_store
from actcache.verify import verify_store

CHUNK, SHARD, TOKENS = 128, 512, 2048 + 256  # 4 inner chunks per shard, 5 shards (the last one short)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("verify") / "pristine"
    make_synthetic_store(
        path, tokens=TOKENS, d_model=16, context=64, layers=(1, 3), sites=("resid_post", "attn_out"),
        chunk_tokens=CHUNK, shard_tokens=SHARD,
    )  # fmt: skip
    return path


@pytest.fixture
def store_copy(pristine: Path, tmp_path: Path) -> Path:
    shutil.copytree(pristine, tmp_path / "s")
    return tmp_path / "s"


def shard_index(data: bytes, n_chunks: int = SHARD // CHUNK) -> np.ndarray:
    """[n_chunks, 2] (offset, nbytes) read from the index at the end of a shard (index + 4-byte crc32c)."""
    return np.frombuffer(data[-(n_chunks * 16 + 4) : -4], dtype="<u8").reshape(n_chunks, 2)


def test_pristine_store_verifies(pristine: Path) -> None:
    seen = []
    report = verify_store(pristine, progress=lambda done, total: seen.append((done, total)))
    assert report.ok and report.bad is None
    n_chunks = -(-TOKENS // CHUNK)  # 18 per array
    assert report.chunks == n_chunks * 8 and report.arrays == 8
    assert seen[-1] == (n_chunks * 8, n_chunks * 8)
    assert report.stored_bytes == sum(p.stat().st_size for p in pristine.rglob("c/*") if p.is_file()) + sum(
        p.stat().st_size for p in pristine.rglob("c/*/*")
    )


def test_flipped_byte_names_the_inner_chunk(store_copy: Path) -> None:
    store = Store.open(store_copy)
    path = store.shard_path("acts/attn_out/3", 2)
    data = bytearray(path.read_bytes())
    offset, nbytes = shard_index(bytes(data))[3]  # inner chunk 3 of shard 2 = global chunk 11
    data[int(offset + nbytes // 2)] ^= 0x40
    path.write_bytes(bytes(data))
    report = verify_store(store_copy)
    assert not report.ok
    bad = report.bad
    assert (bad.key, bad.chunk, bad.token_start, bad.token_stop) == ("acts/attn_out/3", 11, 1408, 1536)
    assert bad.shard_path == str(path) and "checksum" in bad.reason
    assert str(bad).startswith("acts/attn_out/3 chunk 11 (tokens 1408..1536)")


def test_damaged_index_and_missing_shard(store_copy: Path, pristine: Path) -> None:
    store = Store.open(store_copy)
    idx_path = store.shard_path("flags", 1)
    data = bytearray(idx_path.read_bytes())
    data[-10] ^= 1  # inside the index
    idx_path.write_bytes(bytes(data))
    report = verify_store(store_copy)
    assert (report.bad.key, report.bad.chunk, report.bad.reason) == (
        "flags",
        4,
        "shard index checksum mismatch",
    )
    shutil.copy(pristine / "flags" / "c" / "1", idx_path)  # repaired
    store.shard_path("acts/resid_post/1", 4).unlink()
    report = verify_store(store_copy)
    assert (report.bad.key, report.bad.chunk) == ("acts/resid_post/1", 16)  # the last, short shard
    assert report.bad.reason == "shard file missing" and (report.bad.token_start, report.bad.token_stop) == (
        2048,
        2176,
    )


def test_only_committed_chunks_are_checked(tmp_path: Path) -> None:
    make_synthetic_store(tmp_path / "s", tokens=2048, d_model=8, context=64, chunk_tokens=128, shard_tokens=512,
                         commit_tokens=1024)  # fmt: skip
    store = Store.open(tmp_path / "s")
    store.shard_path("acts/resid_post/0", 3).write_bytes(b"garbage beyond the commit")
    report = verify_store(tmp_path / "s")
    assert report.ok and report.chunks == 8 * 5


def test_cli_verify_and_info_exit_codes(store_copy: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from actcache.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(store_copy)])
    assert ok.exit_code == 0 and "every checksum and the manifest match" in ok.output
    info = runner.invoke(app, ["info", str(store_copy)])
    assert info.exit_code == 0
    for text in ("acts/attn_out/3", "2,304 x 16", "bfloat16", "synthetic", "format 3", "2,304 / 2,304"):
        assert text in info.output
    path = Store.open(store_copy).shard_path("token_ids", 0)
    data = bytearray(path.read_bytes())
    data[int(shard_index(bytes(data))[1][0]) + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    bad = runner.invoke(app, ["verify", str(store_copy)])
    assert bad.exit_code == 1 and "token_ids chunk 1 (tokens 128..256)" in bad.output
    missing = runner.invoke(app, ["verify", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    assert runner.invoke(app, ["info", str(tmp_path)]).exit_code == 2
