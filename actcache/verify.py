"""Read every chunk of every array up to the committed tokens, check every checksum, name the first bad chunk.

The shard files are parsed directly (docs/store-format.md, "Shards"): the index at the end of each shard
(n_chunks x (offset, nbytes) uint64 LE + crc32c) is checked against its own crc32c, then every inner chunk's
trailing crc32c against its bytes. A shard whose checksums pass is then decoded through zarr, which also catches
a stream the codec cannot decode. So a flipped byte is reported as the exact inner chunk that holds it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actcache.codecs import crc32c_matches
from actcache.store import Store, parse_shard_index

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
    bad: BadChunk | None = None

    def __str__(self) -> str:
        if self.ok:
            return (
                f"ok: {self.chunks} chunks of {self.arrays} arrays ({self.stored_bytes / 2**20:.1f} MiB) up to "
                f"{self.committed_tokens} committed tokens, every checksum matches"
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


def verify_store(path: str | os.PathLike, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check every chunk below the committed tokens; progress(done_chunks, total_chunks) after each shard."""
    store = Store.open(path)
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
            problem = _shard_problem(store, key, shard_path, start, stop, per_shard, wanted)
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
            stored_bytes += shard_path.stat().st_size
            done += wanted
            if progress is not None:
                progress(done, total)
    return VerifyReport(True, committed, len(keys), done, stored_bytes)


def _shard_problem(
    store: Store, key: str, shard_path: Path, start: int, stop: int, per_shard: int, wanted: int
) -> tuple[int, str] | None:
    if not shard_path.is_file():
        return 0, "shard file missing"
    problem = _check_shard(shard_path.read_bytes(), per_shard, wanted)
    if problem is not None:
        return problem
    try:
        store.read_raw(key, start, stop)
    except Exception as e:  # any decode failure is corruption of this shard
        return 0, f"shard does not decode: {type(e).__name__}: {e}"
    return None
