"""The store manifest: binds every committed shard's bytes to its position (docs/store-format.md, "Manifest").

One small JSON record per committed shard, ``manifest/{shard:08d}.json``, holds the byte size and crc32c of that
shard's file for every array, and a hash chain: ``chain_{i+1} = sha256(chain_i || record_i)``, starting from the
``genesis`` digest of the store's identity (its id, spec and the digest of every array's ``zarr.json``). The
commit record holds the chain value after its last committed shard, so ``commit.json`` alone proves the whole
committed store: a shard swapped for another valid shard, a deleted or truncated shard file, an edited array
metadata file or an edited record all break the chain or a digest.

The digests cost no extra read: the writer hashes each shard's bytes as zarr hands them to the file
(``DigestingLocalStore``); only where a zarr version writes by another path does the commit read the file back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actcache.byteio import ByteStore, DigestingLocalStore, open_bytes
from actcache.digests import canonical, crc32c_hex, file_digest, sha256_hex

__all__ = [  # the digest helpers and the digesting zarr store are re-exported from where they lived before
    "MANIFEST_DIR", "ShardRecord", "DigestingLocalStore", "canonical", "crc32c_hex", "file_digest", "sha256_hex",
    "genesis", "next_chain", "read_record", "write_record", "record_path", "record_key", "meta_digests",
    "read_chain", "seal", "is_sealed", "object_digest",
]  # fmt: skip

MANIFEST_DIR = "manifest"


def genesis(store_id: str, spec_json: Mapping[str, Any], meta_digests: Mapping[str, str]) -> str:
    """The chain's start: binds the records to this store's id, spec and array metadata."""
    return sha256_hex(canonical({"store_id": store_id, "spec": spec_json, "meta": dict(meta_digests)}))


@dataclass(frozen=True)
class ShardRecord:
    """The manifest record of one committed shard."""

    shard: int
    rows: int
    """Committed rows of the shard (shard_tokens, or fewer in the short last shard)."""
    arrays: dict[str, tuple[int, str]]
    """Array key -> (bytes, crc32c hex) of its shard file."""
    chain: str
    """sha256 chain value after this record (see the module docstring)."""

    def body(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "rows": self.rows,
            "arrays": {k: list(v) for k, v in sorted(self.arrays.items())},
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.body(), "chain": self.chain}

    @classmethod
    def make(
        cls, prev_chain: str, shard: int, rows: int, arrays: Mapping[str, tuple[int, str]]
    ) -> ShardRecord:
        draft = cls(shard, rows, {k: (int(n), str(d)) for k, (n, d) in arrays.items()}, "")
        return cls(draft.shard, draft.rows, draft.arrays, next_chain(prev_chain, draft.body()))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardRecord:
        arrays = {str(k): (int(v[0]), str(v[1])) for k, v in dict(data["arrays"]).items()}
        return cls(int(data["shard"]), int(data["rows"]), arrays, str(data["chain"]))


def next_chain(prev: str, body: Mapping[str, Any]) -> str:
    return sha256_hex(prev.encode() + canonical(body))


def record_key(shard: int) -> str:
    """The byte-I/O key of a shard's record."""
    return f"{MANIFEST_DIR}/{shard:08d}.json"


def record_path(store_path: Path, shard: int) -> Path:
    return Path(store_path) / record_key(shard)


def read_record(store: Path | ByteStore, shard: int) -> ShardRecord:
    """The record of one shard; ValueError / OSError when it is missing or unreadable."""
    data = json.loads(open_bytes(store).read(record_key(shard)))
    record = ShardRecord.from_json(data)
    if record.shard != shard:
        raise ValueError(f"the record names shard {record.shard}")
    return record


def write_record(store: Path | ByteStore, record: ShardRecord) -> str:
    """Write a record (atomic, not yet durable: the commit makes it durable before it covers it); its key."""
    key = record_key(record.shard)
    open_bytes(store).write(key, canonical(record.to_json()))
    return key


def object_digest(store: ByteStore, key: str, piece: int = 1 << 24) -> tuple[int, str]:
    """(size, crc32c hex) of an object, read in 16 MiB ranges (`file_digest` through the byte-I/O seam)."""
    import google_crc32c

    crc, size = 0, 0
    while data := store.read_range(key, size, piece):
        crc = google_crc32c.extend(crc, data)
        size += len(data)
        if len(data) < piece:
            break
    return size, f"{crc:08x}"


def meta_digests(store: Path | ByteStore, keys: list[str]) -> dict[str, str]:
    """sha256 of every array's zarr.json (a missing file digests as "missing")."""
    io, out = open_bytes(store), {}
    for key in keys:
        try:
            out[key] = sha256_hex(io.read(f"{key}/zarr.json"))
        except OSError:
            out[key] = "missing"
    return out


def read_chain(
    store: Path | ByteStore, spec: Any, store_id: str | None, manifest: Any, committed_tokens: int
) -> tuple[list[ShardRecord], str | None]:
    """The shard records of the committed shards, and the first problem of the chain (None: it holds)."""
    import math

    if not isinstance(manifest, dict) or not all(
        k in manifest for k in ("shards", "chain", "genesis", "meta")
    ):
        return [], "the commit record has no valid manifest entry"
    shards = math.ceil(committed_tokens / spec.shard_tokens)
    if manifest["shards"] != shards:
        return [], (
            f"the commit record's manifest covers {manifest['shards']} shards but its {committed_tokens} committed "
            f"tokens fill {shards}"
        )
    if (
        not isinstance(manifest["meta"], dict)
        or genesis(str(store_id), spec.to_json(), manifest["meta"]) != (manifest["genesis"])
    ):
        return [], "the store's id or spec (zarr.json) is not the one its manifest was started with"
    io = open_bytes(store)
    chain, records = str(manifest["genesis"]), []
    for shard in range(shards):
        path = io.location(record_key(shard))
        try:
            record = read_record(io, shard)
        except FileNotFoundError:
            return records, f"manifest record {path} is missing"
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            return records, f"manifest record {path} is unreadable ({type(e).__name__}: {e})"
        rows = min(spec.shard_tokens, committed_tokens - shard * spec.shard_tokens)
        if next_chain(chain, record.body()) != record.chain:
            return (
                records,
                f"manifest record {path} was edited or belongs to another store (its digest chain breaks)",
            )
        if record.rows != rows or sorted(record.arrays) != sorted(spec.array_keys):
            return records, f"manifest record {path} does not describe {rows} rows of every array"
        chain = record.chain
        records.append(record)
    if chain != manifest["chain"]:
        return records, "the manifest records do not end at the commit record's digest"
    return records, None


UNSEALED = ("digest", "time")
"""Fields of the commit record outside its digest ("time" differs between runs that are otherwise bit-identical)."""


def seal(record: Mapping[str, Any]) -> dict[str, Any]:
    """The commit record with a "digest" of its fields, so that any edit of it is seen by verify."""
    body = {k: v for k, v in record.items() if k not in UNSEALED}
    return {**record, "digest": sha256_hex(canonical(body))}


def is_sealed(record: Mapping[str, Any]) -> bool:
    """Whether a commit record's "digest" matches its fields."""
    return record.get("digest") == seal(record)["digest"]
