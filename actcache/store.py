"""The on-disk activation store (spec: docs/store-format.md): create, resume, append shards, commit, open, stats.

Layout: a zarr v3 group; `acts/{site}/{layer}` [tokens, d_model] per (layer, site) plus per-token arrays
`token_ids`, `doc_ids`, `positions`, `flags` at the root. All arrays are chunked along tokens and sharded (one file
per shard per array), every inner chunk carries a crc32c. The commit record `commit.json` (tokens committed +
running statistics) is replaced atomically after the shards it covers are durable; readers only ever look below
the committed token count, so a kill -9 mid-write can only damage data that nobody reads.

This module is the store's public face; the code lives in
- `actcache.spec`: StoreSpec, constants, errors, chunk/shard planning (no I/O);
- `actcache.byteio`: the byte-I/O seam (ByteStore, LocalByteStore) every read and write outside zarr goes through;
- `actcache.view`: `Store`, the read-only view up to the committed tokens;
- `actcache.writer`: `StoreWriter` (create, resume, write_shard, commit, finish) and `damaged_shards`;
- `actcache.synthetic`: `make_synthetic_store`.
"""

from __future__ import annotations

from actcache.byteio import ByteStore, LocalByteStore, open_bytes, write_json_atomic
from actcache.spec import (
    COMMIT_FILE,
    FLAG_BOS,
    FLAG_PAD,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_CHUNKS_PER_SHARD,
    MIN_CHUNKS_PER_SHARD,
    SHARD_BUFFER_BUDGET,
    SITES,
    TARGET_CHUNK_BYTES,
    TOKEN_ARRAYS,
    StoreDamaged,
    StoreError,
    StoreSpec,
    acts_key,
    parse_acts_key,
    plan_bytes,
    plan_chunks,
)
from actcache.synthetic import make_synthetic_store
from actcache.view import Store, check_store_folder, is_store, parse_shard_index
from actcache.writer import StoreWriter, damaged_shards

__all__ = [
    "COMMIT_FILE",
    "FLAG_BOS",
    "FLAG_PAD",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_CHUNKS_PER_SHARD",
    "MIN_CHUNKS_PER_SHARD",
    "SHARD_BUFFER_BUDGET",
    "SITES",
    "TARGET_CHUNK_BYTES",
    "TOKEN_ARRAYS",
    "ByteStore",
    "LocalByteStore",
    "Store",
    "StoreDamaged",
    "StoreError",
    "StoreSpec",
    "StoreWriter",
    "acts_key",
    "check_store_folder",
    "damaged_shards",
    "is_store",
    "make_synthetic_store",
    "open_bytes",
    "parse_acts_key",
    "parse_shard_index",
    "plan_bytes",
    "plan_chunks",
    "write_json_atomic",
]
