"""The manifest proves the whole store: verify names every kind of damage (exit 1), the identity of a store tells
it from another, and one writer at a time holds a store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from actcache.cli import app
from actcache.manifest import file_digest, read_record, record_path
from actcache.store import Store, StoreError, StoreWriter, damaged_shards, make_synthetic_store
from actcache.verify import BadRecord, verify_store

CHUNK, SHARD, TOKENS = 128, 512, 2048 + 256  # 4 inner chunks per shard, 5 shards (the last one short)


def _make(path: Path, seed: int = 0) -> Path:
    make_synthetic_store(
        path, tokens=TOKENS, d_model=16, context=64, layers=(1, 3), sites=("resid_post", "attn_out"),
        chunk_tokens=CHUNK, shard_tokens=SHARD, seed=seed,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make(tmp_path_factory.mktemp("integrity") / "pristine")


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same spec, other activations (another seed)."""
    return _make(tmp_path_factory.mktemp("integrity") / "other", seed=1)


@pytest.fixture
def s(pristine: Path, tmp_path: Path) -> Path:
    shutil.copytree(pristine, tmp_path / "s")
    return tmp_path / "s"


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _verify_cli(path: Path):
    result = CliRunner().invoke(app, ["verify", str(path)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result.exit_code, lines


def _assert_corrupt(path: Path, *needles: str) -> None:
    report = verify_store(path)
    assert not report.ok, report
    for needle in needles:
        assert needle in str(report), str(report)
    code, lines = _verify_cli(path)
    assert code == 1 and len(lines) == 1 and "CORRUPT" in lines[0], lines
    for needle in needles:
        assert needle in lines[0]


def test_pristine_store_is_proven_and_its_manifest_matches_the_files(pristine: Path) -> None:
    report = verify_store(pristine)
    assert report.ok and report.manifest and report.committed_tokens == TOKENS
    store = Store.open(pristine)
    assert store.manifest["shards"] == 5
    for shard in range(5):
        record = read_record(pristine, shard)
        assert record.rows == (SHARD if shard < 4 else 256)
        for key in store.spec.array_keys:  # digests taken while writing equal a re-read of the files
            assert record.arrays[key] == file_digest(store.shard_path(key, shard))
    code, lines = _verify_cli(pristine)
    assert code == 0 and "every checksum and the manifest match" in lines[-1]


def test_missing_or_damaged_commit_record(s: Path) -> None:
    commit = s / "commit.json"
    original = commit.read_text()
    commit.unlink()
    _assert_corrupt(s, "commit.json", "is missing")
    commit.write_text("{not json")
    _assert_corrupt(s, "commit.json", "damaged")
    commit.write_text(original)
    _edit_json(commit, lambda d: d.update(committed_tokens=-5))
    _assert_corrupt(s, "committed_tokens is -5")
    commit.write_text(original)
    _edit_json(commit, lambda d: d.update(committed_tokens=10**9))
    _assert_corrupt(s, "exceed the store's 2304 rows")
    commit.write_text(original)
    _edit_json(commit, lambda d: d.update(committed_tokens=1024))  # a count in range, but not the one sealed
    _assert_corrupt(s, "commit.json", "was edited")
    commit.write_text(original)
    _edit_json(commit, lambda d: d["stats"]["acts/resid_post/1"].update(mean_sq_norm=1.0))
    _assert_corrupt(s, "was edited")
    commit.write_text(original)
    assert verify_store(s).ok


def test_swapped_shard_of_the_same_array_and_a_shard_of_another_store(s: Path, other: Path) -> None:
    store = Store.open(s)
    key = "acts/attn_out/3"
    target = store.shard_path(key, 2)
    shutil.copy(store.shard_path(key, 1), target)  # a valid shard: every chunk checksum still matches
    _assert_corrupt(s, key, "manifest", "replaced")
    bad = verify_store(s).bad
    assert bad.shard_path == str(target) and (bad.token_start, bad.token_stop) == (1024, 1152)
    # The same position from another store of the same spec: every checksum valid, the content is not ours.
    shutil.copy(Store.open(other).shard_path(key, 1), store.shard_path(key, 1))
    shutil.copy(Store.open(other).shard_path(key, 2), target)
    _assert_corrupt(s, key, "manifest")


def test_deleted_truncated_and_flipped_shards(s: Path, pristine: Path) -> None:
    store = Store.open(s)
    path = store.shard_path("token_ids", 3)
    path.unlink()
    _assert_corrupt(s, "token_ids chunk 12", "shard file missing")
    shutil.copy(Store.open(pristine).shard_path("token_ids", 3), path)
    path.write_bytes(path.read_bytes()[:-7])
    _assert_corrupt(s, "token_ids chunk 12", "bytes, the manifest records")
    shutil.copy(Store.open(pristine).shard_path("token_ids", 3), path)
    data = bytearray(path.read_bytes())
    data[20] ^= 0x10
    path.write_bytes(bytes(data))
    _assert_corrupt(s, "token_ids chunk 12", "checksum")


def test_edited_array_metadata_root_spec_and_manifest_records(s: Path, pristine: Path) -> None:
    meta = s / "acts" / "resid_post" / "1" / "zarr.json"
    _edit_json(meta, lambda d: d["attributes"].update(site="mlp_out"))
    _assert_corrupt(s, "acts/resid_post/1/zarr.json", "metadata of array acts/resid_post/1 was edited")
    shutil.copy(pristine / "acts" / "resid_post" / "1" / "zarr.json", meta)

    root = s / "zarr.json"
    _edit_json(root, lambda d: d["attributes"]["actcache"]["spec"].update(corpus="another corpus"))
    _assert_corrupt(s, "spec", "not the one its manifest was started with")
    shutil.copy(pristine / "zarr.json", root)

    record = record_path(s, 2)
    _edit_json(record, lambda d: d["arrays"]["flags"].__setitem__(1, "00000000"))
    _assert_corrupt(s, "00000002.json", "chain breaks")
    record.unlink()
    _assert_corrupt(s, "00000002.json", "is missing")
    shutil.copy(pristine / "manifest" / "00000002.json", record)
    assert verify_store(s).ok


def test_format_1_store_still_verifies_on_chunk_checksums(s: Path) -> None:
    """A store written before the manifest: readable, and verify says what it could not prove."""
    shutil.rmtree(s / "manifest")
    _edit_json(s / "zarr.json", lambda d: d["attributes"]["actcache"].update(format_version=1))
    _edit_json(s / "commit.json", lambda d: [d.pop(k) for k in ("manifest", "store_id", "digest")])
    _edit_json(s / "commit.json", lambda d: d.update(format_version=1))
    report = verify_store(s)
    assert report.ok and not report.manifest and "format-1 store: no manifest" in str(report)
    store = Store.open(s)
    assert store.manifest is None and store.identity()["content"] is None
    assert np.isfinite(store.read_acts(1, "resid_post", 0, 100)).all()


def test_a_missing_shard_is_an_error_for_readers_never_zeros(s: Path) -> None:
    store = Store.open(s)
    store.shard_path("acts/resid_post/3", 1).unlink()
    store.shard_path("doc_ids", 0).unlink()
    with pytest.raises(StoreError, match="committed shard file .* is missing"):
        store.read_acts(3, "resid_post", 600, 700)  # zarr alone would return zeros here
    with pytest.raises(StoreError, match="is missing"):
        store.read_chunk("acts/resid_post/3", 5)
    with pytest.raises(StoreError, match="is missing"):
        store.read("doc_ids", 0, 10)


def test_identity_tells_stores_apart_by_content_and_provenance(pristine: Path, other: Path, s: Path) -> None:
    a, b = Store.open(pristine), Store.open(other)
    ident = a.identity(1024)
    assert ident["tokens"] == 1024 and ident["model"] == "synthetic" and len(ident["content"]) == 64
    assert a.identity_mismatch(ident) is None
    assert Store.open(s).identity_mismatch(ident) is None  # a copy is the same store
    assert ident["content"] == a.identity(1000)["content"]  # the digest covers whole shards
    assert ident["content"] != a.identity(1025)["content"]
    diff = b.identity_mismatch(ident)
    assert diff is not None and "content of its first 1024 tokens differs" in diff
    with pytest.raises(StoreError, match=f"is not the store the run used .*{pristine}"):
        b.check_identity(ident)
    assert b.identity_mismatch({**ident, "content": None}) is None  # provenance alone cannot tell these apart
    assert "d_model 32 != 16" in b.identity_mismatch({**ident, "d_model": 32})
    assert "the run read 4096" in a.identity_mismatch({**ident, "tokens": 4096})
    a.check_identity(None)  # nothing recorded: nothing to check


def test_harvest_resume_finds_what_the_manifest_does_not_prove(s: Path, pristine: Path) -> None:
    store = Store.open(s)
    spec = store.spec
    writer = StoreWriter.create_or_resume(s, spec)
    assert writer.damaged_shards() == [] and writer.damaged_shards(deep=True) == []
    writer.close()
    store.shard_path("acts/attn_out/1", 1).unlink()
    flipped = store.shard_path("positions", 3)
    data = bytearray(flipped.read_bytes())
    data[5] ^= 1
    flipped.write_bytes(bytes(data))
    assert [(n, "missing" in why) for n, why in damaged_shards(store)] == [(1, True)]
    assert [n for n, _ in damaged_shards(store, deep=True)] == [1, 3]
    (s / "manifest" / "00000000.json").unlink()  # nothing proves anything now: refused, not repaired
    with pytest.raises(StoreError, match="cannot be trusted.*--overwrite"):
        damaged_shards(store)


def test_a_second_writer_is_refused_while_the_first_holds_the_store(tmp_path: Path) -> None:
    path = _make(tmp_path / "s")
    spec = Store.open(path).spec
    first = StoreWriter.create_or_resume(path, spec)
    with pytest.raises(StoreError, match=r"is being written by pid \d+ on .*wait for that harvest"):
        StoreWriter.create_or_resume(path, spec)
    with pytest.raises(StoreError, match="is being written"):
        StoreWriter.create_or_resume(path, spec, overwrite=True)  # nothing removed under a running writer
    assert verify_store(path).ok
    first.close()
    StoreWriter.create_or_resume(path, spec).close()
    # Another process holding it (a harvest in flight); the lock dies with the process, kill -9 included.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from actcache.lock import StoreLock; "
         f"lock = StoreLock({str(path)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=f"pid {holder.pid}"):
            StoreWriter.create_or_resume(path, spec)
    finally:
        holder.kill()
        holder.wait()
    StoreWriter.create_or_resume(path, spec).close()


def test_info_on_a_damaged_commit_record_is_one_line(s: Path) -> None:
    (s / "commit.json").write_text("[]")
    result = CliRunner().invoke(app, ["info", str(s)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "committed_tokens is None" in result.output
    report = verify_store(s)
    assert isinstance(report.bad, BadRecord) and report.bad.path == str(s / "commit.json")


def test_damaged_root_metadata_is_corruption_not_bad_input(s: Path, tmp_path: Path) -> None:
    root = s / "zarr.json"
    original = root.read_text()
    root.write_text("{")
    _assert_corrupt(s, "zarr.json", "metadata is damaged")
    root.write_text(original)
    _edit_json(root, lambda d: d["attributes"]["actcache"]["spec"].pop("d_model"))
    _assert_corrupt(s, "zarr.json", "damaged")
    # Not a store at all, or no such folder: bad input (exit 2), not corruption.
    code, lines = _verify_cli(tmp_path / "nothing")
    assert code == 2 and "does not exist" in lines[0]
    (tmp_path / "plain").mkdir()
    code, lines = _verify_cli(tmp_path / "plain")
    assert code == 2 and "not an actcache store" in lines[0]
