"""Prove a whole store: the commit record, the manifest, every committed shard's bytes; name the first problem.

In order (docs/store-format.md, "Manifest" and "Shards"):
1. The commit record: present, parseable, its counts in range, its store id the store's.
2. The manifest (format 2): the chain of shard records from the store's identity (id, spec, array metadata
   digests) to the commit record's digest; every array's zarr.json against its recorded digest.
3. Every committed shard of every array: present, of the recorded size, the index at its end (n_chunks x (offset,
   nbytes) uint64 LE + crc32c) against its own crc32c, every inner chunk's trailing crc32c against its bytes, then
   the crc32c of the whole file against the manifest (a valid shard of another position or store fails here),
   then a decode of every inner chunk from the bytes read (the reader's chunk decoder; zarr for a pipeline it
   does not know). A flipped byte is reported as the exact inner chunk that holds it.
Format-1 stores have no manifest: step 2 and the whole-file digests are skipped, and the report says so.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actcache.byteio import ByteStore, open_bytes
from actcache.codecs import crc32c_matches
from actcache.digests import crc32c_hex
from actcache.manifest import ShardRecord, is_sealed, meta_digests, read_chain
from actcache.store import COMMIT_FILE, Store, StoreDamaged, parse_shard_index

log = logging.getLogger(__name__)

EMPTY = 2**64 - 1  # offset/nbytes of a chunk that is absent from a shard


@dataclass(frozen=True)
class BadChunk:
    """The first corrupted chunk found."""

    key: str
    """Array key, e.g. 'acts/resid_post/3'."""
    chunk: int
    """Inner-chunk index along tokens (global within the array)."""
    token_start: int
    token_stop: int
    shard_path: str
    """The shard file that holds the chunk."""
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.key} chunk {self.chunk} (tokens {self.token_start}..{self.token_stop}) in {self.shard_path}: "
            f"{self.reason}"
        )


@dataclass(frozen=True)
class BadRecord:
    """A problem of the store as a whole: the commit record, the manifest, an array's metadata."""

    path: str
    """The file at fault."""
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of verify_store."""

    ok: bool
    committed_tokens: int
    arrays: int
    """Arrays checked."""
    chunks: int
    """Inner chunks whose checksums were checked."""
    stored_bytes: int
    """Bytes of shard files read."""
    bad: BadChunk | BadRecord | None = None
    manifest: bool = True
    """Whether the store has a manifest (format 2) that was checked."""

    def __str__(self) -> str:
        if self.ok:
            proof = (
                "every checksum and the manifest match"
                if self.manifest
                else "every checksum matches (format-1 store: no manifest, so shards are not bound to positions)"
            )
            return (
                f"ok: {self.chunks} chunks of {self.arrays} arrays ({self.stored_bytes / 2**20:.1f} MiB) up to "
                f"{self.committed_tokens} committed tokens, {proof}"
            )
        return f"CORRUPT: {self.bad}"


def _check_shard(data: bytes, n_chunks: int, wanted: int) -> tuple[int, str] | None:
    """None if the first `wanted` inner chunks of a shard are intact, else (inner index, reason)."""
    index_size = n_chunks * 16 + 4
    if len(data) < index_size:
        return 0, f"shard file truncated ({len(data)} bytes, index alone needs {index_size})"
    entries = parse_shard_index(data[-index_size:], n_chunks)
    if entries is None:
        return 0, "shard index checksum mismatch"
    body_end = len(data) - index_size
    u8 = np.frombuffer(data, dtype=np.uint8)
    for j in range(wanted):
        offset, nbytes = (int(v) for v in entries[j])
        if offset == EMPTY:
            return j, "chunk missing from the shard"
        if nbytes < 4 or offset + nbytes > body_end:
            return j, f"chunk bytes [{offset}, {offset + nbytes}) outside the shard body"
        if not crc32c_matches(u8[offset : offset + nbytes - 4], u8[offset + nbytes - 4 : offset + nbytes]):
            return j, "chunk checksum (crc32c) mismatch"
    return None


def verify_store(
    path: str | os.PathLike | ByteStore, progress: Callable[[int, int], None] | None = None
) -> VerifyReport:
    """Check the commit record, the manifest and every chunk below the committed tokens (module docstring);
    progress(done_chunks, total_chunks) after each shard. StoreError only when `path` is not a store at all.
    `path`: a local folder or any ByteStore (every byte is read through it)."""
    io = open_bytes(path)
    path = io.root
    try:
        store = Store.open(io)  # StoreError: missing, not a store, newer format (bad input, not corruption)
    except StoreDamaged as e:  # the root metadata or the commit record is missing, unreadable or out of range
        where = path / ("zarr.json" if "zarr.json" in str(e) else COMMIT_FILE)
        return VerifyReport(False, 0, 0, 0, 0, BadRecord(str(where), _after_path(str(e), path)))
    bad_record, records = _check_store_records(store)
    if bad_record is not None:
        log.info("verify %s: %s", path, bad_record)
        return VerifyReport(False, store.committed_tokens, 0, 0, 0, bad_record)
    spec, committed = store.spec, store.committed_tokens
    per_shard = spec.shard_tokens // spec.chunk_tokens
    n_shards = math.ceil(committed / spec.shard_tokens)
    keys = spec.array_keys
    total = math.ceil(committed / spec.chunk_tokens) * len(keys)
    done = stored_bytes = 0
    for key in keys:
        for shard in range(n_shards):
            start = shard * spec.shard_tokens
            stop = min(committed, start + spec.shard_tokens)
            wanted = math.ceil((stop - start) / spec.chunk_tokens)
            shard_path = store.shard_path(key, shard)
            recorded = records[shard].arrays[key] if records is not None else None
            problem, size = _shard_problem(store, key, shard, start, stop, per_shard, wanted, recorded)
            if problem is not None:
                j, reason = problem
                chunk = shard * per_shard + j
                bad = BadChunk(
                    key,
                    chunk,
                    chunk * spec.chunk_tokens,
                    min(committed, (chunk + 1) * spec.chunk_tokens),
                    str(shard_path),
                    reason,
                )
                log.info("verify %s: %s", path, bad)
                return VerifyReport(False, committed, keys.index(key) + 1, done + j, stored_bytes, bad)
            stored_bytes += size
            done += wanted
            if progress is not None:
                progress(done, total)
    return VerifyReport(True, committed, len(keys), done, stored_bytes, manifest=records is not None)


def _after_path(message: str, path: Path) -> str:
    """A reader's message about the commit record, without the file name (the report names it) and without the
    advice to run verify."""
    commit = str(path / COMMIT_FILE)
    message = message.split("; run `actcache verify", 1)[0]
    return message[len(commit) :].lstrip(": ") if message.startswith(commit) else message


def _check_store_records(store: Store) -> tuple[BadRecord | None, list[ShardRecord] | None]:
    """The commit record's fields, the manifest chain and the array metadata; (problem, the shard records)."""
    commit_path = str(store.path / COMMIT_FILE)
    spec = store.spec
    if store.complete is False and store.committed_tokens % spec.shard_tokens:
        return BadRecord(
            commit_path, "the commit ends inside a shard but the store is not marked complete"
        ), None
    if store.manifest is None:
        if store.format_version >= 2:
            return BadRecord(commit_path, "the commit record of a format-2 store has no manifest"), None
        return None, None
    commit = _commit_record(store)
    if not is_sealed(commit):
        return BadRecord(
            commit_path, "the commit record was edited (its digest does not match its fields)"
        ), None
    commit_id = commit.get("store_id")
    if commit_id != store.store_id:
        return BadRecord(commit_path, f"store id {commit_id!r} is not the store's {store.store_id!r}"), None
    records, problem = read_chain(store.io, spec, store.store_id, store.manifest, store.committed_tokens)
    if problem is not None:
        return BadRecord(commit_path if problem.startswith("the ") else str(store.path), problem), None
    current = meta_digests(store.io, spec.array_keys)
    for key in spec.array_keys:
        if current[key] != store.manifest["meta"].get(key):
            what = "is missing" if current[key] == "missing" else "was edited since the store was created"
            where = str(store.io.location(f"{key}/zarr.json"))
            return BadRecord(where, f"the metadata of array {key} {what}"), None
    return None, records


def _commit_record(store: Store) -> dict:
    import json

    return json.loads(store.io.read(COMMIT_FILE))


def _shard_problem(
    store: Store,
    key: str,
    shard: int,
    start: int,
    stop: int,
    per_shard: int,
    wanted: int,
    recorded: tuple[int, str] | None = None,
) -> tuple[tuple[int, str] | None, int]:
    """(None, bytes read) when the shard is intact, else ((inner chunk, reason), bytes read)."""
    name = store.shard_key(key, shard)
    if not store.io.exists(name):
        return (0, "shard file missing"), 0
    data = store.io.read(name)
    return _data_problem(store, key, data, start, stop, per_shard, wanted, recorded), len(data)


def _data_problem(
    store: Store,
    key: str,
    data: bytes,
    start: int,
    stop: int,
    per_shard: int,
    wanted: int,
    recorded: tuple[int, str] | None,
) -> tuple[int, str] | None:
    problem = _check_shard(data, per_shard, wanted)
    if recorded is not None and len(data) != recorded[0]:
        size = f"shard file has {len(data)} bytes, the manifest records {recorded[0]}"
        if problem is None:
            return 0, f"{size}: a valid shard, but not the one committed here (the file was replaced)"
        return problem[0], f"{size} (truncated or overwritten: {problem[1]})"
    if problem is not None:
        return problem
    if recorded is not None:
        crc = crc32c_hex(data)
        if crc != recorded[1]:
            return 0, (
                f"shard content differs from the manifest (crc32c {crc} != {recorded[1]}): the file was replaced "
                "by another shard or edited"
            )
    try:
        _decode(store, key, data, start, stop, per_shard, wanted)
    except Exception as e:  # any decode failure is corruption of this shard
        return 0, f"shard does not decode: {type(e).__name__}: {e}"
    return None


def _decode(store: Store, key: str, data: bytes, start: int, stop: int, per_shard: int, wanted: int) -> None:
    """Decode every wanted inner chunk from the bytes already in hand (the reader's chunk decoder; zarr, which
    reads the file again, only for a codec pipeline the decoder does not know)."""
    decoder = store.chunk_decoder(key)
    if decoder is None:
        store.read_raw(key, start, stop)
        return
    entries = parse_shard_index(data[-(per_shard * 16 + 4) :], per_shard)
    for j in range(wanted):
        offset, nbytes = (int(v) for v in entries[j])
        decoder.decode(data[offset : offset + nbytes])
