"""The store's contract, run against the byte-I/O seam (actcache/byteio.py, docs/store-format.md "Byte I/O seam").

Every test takes a `backend` fixture parametrised over BACKENDS: a factory of a ByteStore for a fresh store
location. A second backend (fsspec/S3) is run through the same suite by adding its factory to BACKENDS. Today:
the local filesystem, and the same behind a recorder that checks the store's bytes go through the seam's
operations (the commit record only through `replace_json`, chunk reads through `read_range`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from actcache.byteio import ByteStore, LocalByteStore
from actcache.objstore import FsspecByteStore
from actcache.stats import RunningStats
from actcache.store import COMMIT_FILE, FLAG_BOS, Store, StoreError, StoreSpec, StoreWriter, damaged_shards
from actcache.verify import BadChunk, verify_store

D, CONTEXT, CHUNK, SHARD, SHARDS = 16, 32, 32, 128, 4
KEY = "acts/resid_post/0"


class RecordingByteStore(LocalByteStore):
    """The local backend that records which operation touched which key."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls: list[tuple[str, str]] = []

    def _note(self, op: str, key: str) -> None:
        self.calls.append((op, key))

    def read(self, key: str) -> bytes:
        self._note("read", key)
        return super().read(key)

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        self._note("read_range", key)
        return super().read_range(key, offset, length)

    def write(self, key: str, data: bytes) -> None:
        self._note("write", key)
        super().write(key, data)

    def replace_json(self, key: str, obj) -> None:
        self._note("replace_json", key)
        super().replace_json(key, obj)

    def make_durable(self, keys) -> None:
        keys = list(keys)
        for key in keys:
            self._note("make_durable", key)
        super().make_durable(keys)


BACKENDS: dict[str, Callable[[Path], ByteStore]] = {
    "local": lambda root: LocalByteStore(root),
    "recording": lambda root: RecordingByteStore(root),
    "fsspec-memory": lambda root: FsspecByteStore(
        f"memory://{root}"
    ),  # the object-store backend (actcache/objstore.py)
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, tmp_path: Path) -> Callable[[str], ByteStore]:
    """A factory: name -> the ByteStore of a fresh store location of this backend."""
    return lambda name: BACKENDS[request.param](tmp_path / name)


def spec() -> StoreSpec:
    return StoreSpec(
        model="synthetic", revision=None, dtype="bfloat16", layers=(0,), sites=("resid_post",), d_model=D,
        context=CONTEXT, corpus="synthetic", tokenizer="synthetic", tokens_target=SHARD * SHARDS,
        chunk_tokens=CHUNK, shard_tokens=SHARD, codec="blosc-zstd1-shuffle",
    )  # fmt: skip


def shard_data(shard: int) -> tuple[dict[str, np.ndarray | torch.Tensor], RunningStats]:
    gen = torch.Generator().manual_seed(shard)
    pos = np.arange(SHARD) % CONTEXT
    x = torch.randn(SHARD, D, generator=gen)
    arrays = {
        KEY: x,
        "token_ids": np.arange(SHARD, dtype=np.int32) + shard,
        "doc_ids": (np.arange(SHARD) + shard * SHARD) // CONTEXT,
        "positions": pos,
        "flags": (pos == 0).astype(np.uint8) * FLAG_BOS,
    }
    return arrays, RunningStats(D).update(x, keep=pos != 0)


def write(writer: StoreWriter, shards: range, commit: bool = True) -> None:
    for shard in shards:
        arrays, stats = shard_data(shard)
        writer.write_shard(shard * SHARD, arrays)
        if commit:
            writer.commit((shard + 1) * SHARD, {KEY: stats})


def fingerprint(store: Store) -> tuple:
    """The commit record's sealed content and every committed shard's bytes, read through the seam."""
    commit = json.loads(store.io.read(COMMIT_FILE))
    shards = store.committed_tokens // SHARD
    data = [store.io.read(store.shard_key(k, i)) for k in store.spec.array_keys for i in range(shards)]
    return commit["digest"], commit["manifest"]["chain"], commit["stats"], data


def full_store(backend) -> Store:
    writer = StoreWriter.create_or_resume(backend("reference"), spec())
    write(writer, range(SHARDS))
    writer.finish()
    writer.close()
    return Store.open(backend("reference"))


def test_byte_operations(backend) -> None:
    io = backend("objects")
    if isinstance(io.root, Path):  # an object store has no folders
        io.root.mkdir(parents=True)
    assert not io.exists("a/b") and io.size("a/b") is None and io.list("") == []
    io.write("a/b", b"0123456789")
    io.make_durable(["a/b"])
    assert io.exists("a/b") and io.size("a/b") == 10 and io.read("a/b") == b"0123456789"
    assert io.read_range("a/b", 3, 4) == b"3456" and io.read_range("a/b", 8, 10) == b"89"
    io.write("a/b", b"new")  # a whole object is replaced, never appended to
    assert io.read("a/b") == b"new"
    io.replace_json("c.json", {"x": 1})
    io.replace_json("c.json", {"x": 2})
    assert json.loads(io.read("c.json")) == {"x": 2}
    assert io.list("") == ["a/b", "c.json"] and io.list("a") == ["a/b"]  # no temporary objects left behind
    io.delete("a/b")
    io.delete("a/b")  # deleting a missing object is no error
    assert not io.exists("a/b")
    with pytest.raises(FileNotFoundError):
        io.read("a/b")


def test_write_commit_reopen_verify(backend) -> None:
    store = full_store(backend)
    assert store.committed_tokens == SHARD * SHARDS and store.complete
    for shard in range(SHARDS):
        arrays, _ = shard_data(shard)
        got = store.read_acts(0, "resid_post", shard * SHARD, (shard + 1) * SHARD)
        want = arrays[KEY].to(torch.bfloat16).float().numpy()
        assert np.array_equal(got, want)
        chunk = store.read_chunk(KEY, shard * SHARD // CHUNK)  # the fast path: ranges through the seam
        assert np.array_equal(
            chunk, store.read_acts(0, "resid_post", shard * SHARD, shard * SHARD + CHUNK, "stored")
        )
        assert np.array_equal(
            store.read("token_ids", shard * SHARD, (shard + 1) * SHARD), arrays["token_ids"]
        )
    assert store.running_stats(0, "resid_post").count == SHARDS * (SHARD - SHARD // CONTEXT)
    report = verify_store(store.io)
    assert report.ok and report.manifest, report
    assert damaged_shards(store, deep=True) == []
    if isinstance(store.io, RecordingByteStore):
        ops = {op for op, key in store.io.calls if key == COMMIT_FILE}
        assert "read" in ops and "write" not in ops  # the reader's view of the commit record
        assert any(op == "read_range" and "/c/" in key for op, key in store.io.calls)


def test_commit_goes_through_replace_json_after_durable_shards(backend) -> None:
    writer = StoreWriter.create_or_resume(backend("s"), spec())
    write(writer, range(2))
    writer.close()
    if isinstance(writer.io, RecordingByteStore):
        calls = writer.io.calls
        commits = [i for i, (op, key) in enumerate(calls) if key == COMMIT_FILE and op != "read"]
        assert len(commits) == 2 and all(calls[i][0] == "replace_json" for i in commits)
        # Every shard file and manifest record of a commit was made durable before that commit.
        first = commits[0]
        durable = {key for op, key in calls[:first] if op == "make_durable"}
        assert {Store.shard_key(k, 0) for k in spec().array_keys} <= durable
        assert "manifest/00000000.json" in durable


def test_resume_continues_bit_identically(backend) -> None:
    reference = fingerprint(full_store(backend))
    writer = StoreWriter.create_or_resume(backend("s"), spec())
    write(writer, range(2))
    writer.close()
    writer = StoreWriter.create_or_resume(backend("s"), spec())
    assert writer.committed_tokens == 2 * SHARD
    with pytest.raises(StoreError, match="never rewritten"):
        writer.write_shard(SHARD, shard_data(1)[0])
    write(writer, range(2, SHARDS))
    writer.finish()
    writer.close()
    assert fingerprint(Store.open(backend("s"))) == reference


def test_a_crash_between_the_shard_write_and_the_commit(backend) -> None:
    reference = fingerprint(full_store(backend))
    writer = StoreWriter.create_or_resume(backend("s"), spec())
    write(writer, range(2))
    write(writer, range(2, 3), commit=False)  # shard 2 written, its commit never happens
    torn = Store.shard_key(KEY, 3)
    writer.io.write(torn, shard_data(3)[0]["token_ids"].tobytes()[:100])  # a torn write of the next shard
    writer.close()  # the process dies: no commit, the lock goes

    store = Store.open(backend("s"))
    assert store.committed_tokens == 2 * SHARD and not store.complete
    with pytest.raises(StoreError, match="outside the"):
        store.read_acts(0, "resid_post", 2 * SHARD, 3 * SHARD)  # the uncommitted rows are not data
    assert verify_store(store.io).ok
    assert damaged_shards(store, deep=True) == []

    writer = StoreWriter.create_or_resume(backend("s"), spec())
    assert writer.committed_tokens == 2 * SHARD
    write(writer, range(2, SHARDS))  # the same shards again, over what the crash left
    writer.finish()
    writer.close()
    assert fingerprint(Store.open(backend("s"))) == reference


def test_verify_and_damaged_shards_see_a_changed_committed_byte(backend) -> None:
    store = full_store(backend)
    name = store.shard_key(KEY, 1)
    data = bytearray(store.io.read(name))
    data[10] ^= 0xFF
    store.io.write(name, bytes(data))
    report = verify_store(store.io)
    assert not report.ok and isinstance(report.bad, BadChunk) and report.bad.key == KEY
    assert report.bad.token_start == SHARD  # the first chunk of shard 1
    assert damaged_shards(store) == []  # same size: only the deep check reads the bytes
    assert [s for s, _ in damaged_shards(store, deep=True)] == [1]
    store.io.delete(name)
    assert [s for s, _ in damaged_shards(store)] == [1]
    with pytest.raises(StoreError, match="missing"):
        store.read_raw(KEY, SHARD, 2 * SHARD)


def test_shards_made_durable_at_write_are_not_synced_again_by_the_commit(tmp_path) -> None:
    """write_shard(durable=True) (the harvest's writer threads) makes each shard file durable before the commit,
    which then syncs only what is not durable yet; a shard written again without it is synced by the commit."""
    io = RecordingByteStore(tmp_path / "s")
    writer = StoreWriter.create_or_resume(io, spec())
    arrays, stats = shard_data(0)
    writer.write_shard(0, {KEY: arrays[KEY]}, durable=True)
    writer.write_shard(0, {k: v for k, v in arrays.items() if k != KEY})
    at_write = {key for op, key in io.calls if op == "make_durable"}
    assert at_write == {Store.shard_key(KEY, 0)}
    io.calls.clear()
    writer.commit(SHARD, {KEY: stats})
    synced = [key for op, key in io.calls if op == "make_durable"]
    assert Store.shard_key(KEY, 0) not in synced
    assert {Store.shard_key(k, 0) for k in ("token_ids", "doc_ids", "positions", "flags")} <= set(synced)
    writer.close()
    assert verify_store(tmp_path / "s").ok
