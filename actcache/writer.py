"""The write side of a store: create or resume (`StoreWriter.create_or_resume`), append whole shards, commit them;
`damaged_shards`, what the manifest does not prove. Crash safety (docs/store-format.md, "Commit protocol"): data
is written in whole shards that no reader looks at until the commit record, replaced atomically through the
byte-I/O seam (actcache/byteio.py) after the shards and their manifest records are durable, covers them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from actcache.byteio import ByteStore, LocalByteStore, open_bytes
from actcache.codecs import to_stored
from actcache.create import create_store as _create
from actcache.lock import StoreLock
from actcache.lossy import round_mantissa, rounding_error
from actcache.manifest import (
    ShardRecord,
    meta_digests,
    object_digest,
    read_record,
    seal,
    write_record,
)
from actcache.objstore import remove_store, store_exists, writer_lock
from actcache.spec import (
    COMMIT_FILE,
    FORMAT_NAME,
    TOKEN_ARRAYS,
    StoreError,
    StoreSpec,
    acts_key,
)
from actcache.stats import RunningStats
from actcache.view import Store, _read_commit, _read_root_attrs, is_store

log = logging.getLogger(__name__)


class StoreWriter:
    """Appends whole shards and commits them; see the module docstring for the crash-safety argument."""

    def __init__(self, where: Path | ByteStore, spec: StoreSpec, commit: dict[str, Any]) -> None:
        self.io: ByteStore = open_bytes(where)
        """Every byte outside zarr goes through it; zarr writes through `io.zarr_store` (actcache/byteio.py)."""
        self.path: Path = self.io.root
        self.spec = spec
        self.committed_tokens: int = int(commit["committed_tokens"])
        self.complete: bool = bool(commit.get("complete", False))
        self.stats: dict[str, RunningStats] = {
            k: RunningStats.from_json(v) for k, v in commit.get("stats", {}).items()
        }
        self._store = Store(self.io, _read_root_attrs(self.io))
        self._written: dict[str, dict[int, int]] = {k: {} for k in spec.array_keys}  # key -> shard -> rows
        self._digests: dict[str, dict[int, tuple[int, str]]] = {k: {} for k in spec.array_keys}
        self.rounding: dict[str, list[float]] = {k: list(v) for k, v in commit.get("rounding", {}).items()}
        """Lossy mode: key -> `lossy.rounding_error` summed over the committed shards."""
        self._rounding: dict[tuple[str, int], tuple[float, ...]] = {}
        """(key, shard) -> rounding error of a shard written, not yet committed."""
        self._durable: set[str] = set()
        """Shard files made durable by write_shard(durable=True), not yet committed."""
        self.manifest: dict[str, Any] | None = commit.get("manifest")
        """None for a format-1 store (resumed without a manifest)."""
        self.store_id: str | None = self._store.store_id
        self.repairing: set[int] = set()
        """Committed shards the harvest rewrites because the manifest does not prove them (`damaged_shards`)."""
        self._zarr_store = self.io.zarr_store(read_only=False)
        self._arrays: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.lock: StoreLock | None = None

    @property
    def store(self) -> Store:
        """The read view of this store (shard keys, sizes, byte I/O) that the writer holds; not refreshed."""
        return self._store

    @classmethod
    def create_or_resume(
        cls, where: str | os.PathLike | ByteStore, spec: StoreSpec, overwrite: bool = False
    ) -> StoreWriter:
        """A new store, or the existing one if its spec is equal (resume from committed_tokens). `where`: a local
        folder, a URL (s3://...: docs/store-format.md "Object storage", no lock there) or a ByteStore."""
        io = open_bytes(where)
        spec.validate()
        lock = writer_lock(io)
        try:
            writer = cls._create_or_resume(io, spec, overwrite)
        except BaseException:
            lock and lock.release()
            raise
        writer.lock = lock
        return writer

    @classmethod
    def _create_or_resume(cls, io: ByteStore, spec: StoreSpec, overwrite: bool) -> StoreWriter:
        path, local = io.root, isinstance(io, LocalByteStore)
        if path.exists() and not (path.is_dir() and not any(path.iterdir())) if local else store_exists(io):
            if not is_store(io) and not io.exists("zarr.json"):
                raise StoreError(
                    f"{path} exists and is not an actcache store; choose another --out or remove it"
                )
            attrs = _read_root_attrs(io)  # raises on newer format versions, even with overwrite
            if overwrite:
                log.info("removing existing store %s (--overwrite)", path)
                shutil.rmtree(path) if local else remove_store(io)
            else:
                old = StoreSpec.from_json(attrs["spec"])
                if old != spec:
                    raise StoreError(
                        f"{path} holds a store with a different spec ({'; '.join(old.diff(spec))}); rerun the "
                        "same command to resume, or pass --overwrite to replace it"
                    )
                writer = cls(io, spec, _read_commit(io))
                log.info("resuming store %s at %d committed tokens", path, writer.committed_tokens)
                return writer
        _create(io, spec)
        return cls(io, spec, _read_commit(io))

    def _array(self, key: str) -> Any:
        with self._lock:
            if key not in self._arrays:
                # write_empty_chunks is a runtime setting, not stored metadata: without it zarr omits
                # all-zero chunks (e.g. flags), and verify could not tell an omitted chunk from a lost one.
                arr = zarr.open_array(store=self._zarr_store, path=key, mode="r+")
                self._arrays[key] = arr.with_config({"write_empty_chunks": True})
            return self._arrays[key]

    def write_shard(
        self, start: int, arrays: Mapping[str, Any], keep: np.ndarray | None = None, durable: bool = False
    ) -> None:
        """Write one whole shard (rows [start, start + n), n <= shard_tokens) of some or all array keys.

        Thread-safe for distinct shards. Activations may be torch tensors or numpy (bf16: uint16 bits or floats).
        The data stays invisible to readers until commit() covers it. Lossy mode (spec.keep_bits): the values are
        rounded, and the rounding error of the rows `keep` selects (default all; the harvest: neither BOS nor
        padding) goes into the commit record. `durable`: make the files durable now, in the calling thread (the
        harvest's writer threads, so that the commit of the last shard does not wait for them one by one).
        """
        spec = self.spec
        shard = start // spec.shard_tokens
        repair = shard in self.repairing
        if start % spec.shard_tokens or ((start < self.committed_tokens or self.complete) and not repair):
            raise StoreError(
                f"write_shard(start={start}) must start a shard (multiple of {spec.shard_tokens}) at or after the "
                f"{self.committed_tokens} committed tokens of a store that is not complete; committed shards are "
                "never rewritten"
            )
        rows = {k: len(v) for k, v in arrays.items()}
        unknown = [k for k in arrays if k not in self._written]
        if unknown or not arrays or len(set(rows.values())) != 1:
            raise StoreError(f"write_shard: unknown keys {unknown} or unequal row counts {rows}")
        n = next(iter(rows.values()))
        if not 0 < n <= spec.shard_tokens or start + n > spec.tokens_target:
            raise StoreError(f"write_shard: {n} rows at {start} exceed the shard or tokens_target")
        for key, data in arrays.items():
            if key in TOKEN_ARRAYS:
                stored = np.asarray(data.cpu().numpy() if hasattr(data, "cpu") else data).astype(
                    TOKEN_ARRAYS[key]
                )
            else:
                stored = to_stored(data, spec.dtype)
                if stored.shape != (n, spec.d_model):
                    raise StoreError(
                        f"write_shard: {key} has shape {stored.shape}, expected {(n, spec.d_model)}"
                    )
                if spec.keep_bits is not None:
                    rounded = round_mantissa(stored, spec.dtype, spec.keep_bits)
                    with self._lock:
                        self._rounding[(key, shard)] = rounding_error(stored, rounded, spec.dtype, keep)
                    stored = rounded
            # A torn shard from a killed run may sit here; remove it so zarr never reads it back.
            name = Store.shard_key(key, shard)
            with self._lock:
                self._durable.discard(name)
            self.io.delete(name)
            self._array(key)[start : start + n] = stored
            # The digest of the bytes zarr handed to the file (no re-read); read back only where zarr wrote by
            # a path the digesting store does not see.
            digest = self._zarr_store.pop_digest(name) or object_digest(self.io, name)
            if durable:
                self.io.make_durable([name])
            with self._lock:
                self._written[key][shard] = n
                self._digests[key][shard] = digest
                if durable:
                    self._durable.add(name)

    def commit(self, tokens: int, stats_update: Mapping[Any, RunningStats] | None = None) -> None:
        """Make rows [0, tokens) durable and visible; stats_update holds the statistics of the NEW rows only
        (keys 'acts/{site}/{layer}' or (layer, site)), merged into the stored running statistics."""
        spec = self.spec
        if tokens < self.committed_tokens:
            raise StoreError(f"commit({tokens}) is below the {self.committed_tokens} committed tokens")
        first, last = self.committed_tokens // spec.shard_tokens, math.ceil(tokens / spec.shard_tokens)
        for key, written in self._written.items():
            for shard in range(first, last):
                need = min(spec.shard_tokens, tokens - shard * spec.shard_tokens)
                if written.get(shard, 0) < need:
                    raise StoreError(f"commit({tokens}): shard {shard} of {key} was not written")
        ends_short = tokens % spec.shard_tokens != 0
        if ends_short and any(
            w.get(last - 1) != tokens - (last - 1) * spec.shard_tokens for w in self._written.values()
        ):
            # A committed shard is never rewritten, so a commit may only end inside a shard at its last row.
            raise StoreError(f"commit({tokens}) ends inside a shard that holds more rows")
        names = [Store.shard_key(key, shard) for key in spec.array_keys for shard in range(first, last)]
        with self._lock:
            self.io.make_durable([name for name in names if name not in self._durable])
            self._durable.difference_update(names)
        merged = {k: v.copy() for k, v in self.stats.items()}
        for key, update in (stats_update or {}).items():
            key = acts_key(*key) if isinstance(key, tuple) else key
            merged.setdefault(key, RunningStats(spec.d_model)).merge(update)
        complete = ends_short or tokens >= spec.tokens_target
        rounding = self._merge_rounding(first, last)
        manifest = self._extend_manifest(first, last, tokens)
        record: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": self._store.format_version,
            "committed_tokens": int(tokens),
            "complete": complete,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stats": {k: v.to_json() for k, v in merged.items()},
            **({"rounding": rounding} if spec.keep_bits is not None else {}),
        }
        if manifest is not None:
            record = seal(record | {"store_id": self.store_id, "manifest": manifest})
        self.io.replace_json(COMMIT_FILE, record)
        self.committed_tokens, self.stats, self.complete = int(tokens), merged, complete
        self.manifest, self.rounding = manifest, rounding

    def _merge_rounding(self, first: int, last: int) -> dict[str, list[float]]:
        """The committed rounding errors plus those of shards [first, last) (lossy mode; {} otherwise)."""
        out = {k: list(v) for k, v in self.rounding.items()}
        if self.spec.keep_bits is None:
            return out
        with self._lock:
            for key in self.spec.acts_keys:
                for shard in range(first, last):
                    new = self._rounding.pop((key, shard), (0.0, 0.0, 0.0))
                    out[key] = [a + b for a, b in zip(out.get(key, [0.0, 0.0, 0.0]), new, strict=True)]
        return out

    def _extend_manifest(self, first: int, last: int, tokens: int) -> dict[str, Any] | None:
        """Write (fsynced) the manifest records of shards [first, last) and return the commit's manifest entry."""
        if self.manifest is None:
            return None
        chain, keys = str(self.manifest["chain"]), []
        for shard in range(first, last):
            rows = min(self.spec.shard_tokens, tokens - shard * self.spec.shard_tokens)
            digests = {key: self._digests[key][shard] for key in self.spec.array_keys}
            record = ShardRecord.make(chain, shard, rows, digests)
            keys.append(write_record(self.io, record))
            chain = record.chain
        self.io.make_durable(keys)
        return {**self.manifest, "shards": last, "chain": chain}

    def damaged_shards(self, deep: bool = False) -> list[tuple[int, str]]:
        """`damaged_shards` of this store; those the harvest rewrites."""
        return damaged_shards(self._store, deep)

    def shard_bytes(self, key: str, shard: int) -> int:
        """Bytes of a shard file this writer wrote (from its recorded digest)."""
        return self.shard_digest(key, shard)[0]

    def shard_digest(self, key: str, shard: int) -> tuple[int, str]:
        """(bytes, crc32c hex) of a shard file this writer wrote, recorded as it was written."""
        with self._lock:
            return self._digests[key][shard]

    def adopt(self, shard: int, rows: int, digests: Mapping[str, Any]) -> None:
        """Take a shard another process wrote (its rows, every array's digest) as written here, for commit()."""
        with self._lock:
            for key in self.spec.array_keys:
                self._written[key][shard], self._digests[key][shard] = rows, tuple(digests[key])

    def confirm_repair(self, shard: int) -> None:
        """After a damaged committed shard was written again: its bytes must equal the manifest's record."""
        record = read_record(self.io, shard)
        for key in self.spec.array_keys:
            got = self._digests[key].get(shard)
            if got != record.arrays[key]:
                raise StoreError(
                    f"{self.path}: shard {shard} of {key} harvested again differs from the committed one "
                    f"({got} != {record.arrays[key]}): the model, corpus or software changed; pass --overwrite to "
                    "harvest the store again"
                )
        self.repairing.discard(shard)
        with self._lock:  # its rounding error is committed already
            for key in self.spec.acts_keys:
                self._rounding.pop((key, shard), None)
        log.info("repaired shard %d of %s bit-exactly", shard, self.path)

    def finish(self) -> None:
        """Mirror the commit record into the root group's attributes (for plain zarr users); atomic."""
        meta = json.loads(self.io.read("zarr.json"))
        attrs = meta["attributes"]["actcache"]
        attrs["committed_tokens"] = self.committed_tokens
        attrs["stats"] = {k: v.to_json() for k, v in self.stats.items()}
        self.io.replace_json("zarr.json", meta)
        log.info("store %s finished at %d tokens", self.path, self.committed_tokens)

    def close(self) -> None:
        """Release the store's write lock (the process exit releases it too)."""
        if self.lock is not None:
            self.lock.release()


def damaged_shards(store: Store, deep: bool = False) -> list[tuple[int, str]]:
    """Committed shards the manifest does not prove: (shard, why), for the harvest to write again.

    Every record must exist and continue the chain up to the commit record's value, and every array's shard file
    must have the recorded size (`deep`: and crc32c, which reads every committed byte). StoreError when the records
    or the metadata themselves are damaged: nothing then proves which bytes are right. [] for format-1 stores.
    """
    if store.manifest is None:
        return []
    from actcache.manifest import read_chain

    spec, io = store.spec, store.io
    records, problem = read_chain(io, spec, store.store_id, store.manifest, store.committed_tokens)
    if problem is None:
        current = meta_digests(io, spec.array_keys)
        edited = [k for k in spec.array_keys if current.get(k) != store.manifest["meta"].get(k)]
        if edited:
            problem = f"the metadata of {edited[0]} ({edited[0]}/zarr.json) was edited"
    if problem is not None:
        raise StoreError(
            f"{store.path}: {problem}; the committed data cannot be trusted: run `actcache verify {store.path}`, "
            "then --overwrite to harvest it again"
        )
    damaged: list[tuple[int, str]] = []
    for shard, record in enumerate(records):
        for key in spec.array_keys:
            path, name = store.shard_path(key, shard), store.shard_key(key, shard)
            size, crc = record.arrays[key]
            got = io.size(name)
            if got is None:
                why = f"{key} shard file {path} is missing"
            elif got != size:
                why = f"{key} shard file {path} has {got} bytes, the manifest records {size}"
            elif deep and object_digest(io, name)[1] != crc:
                why = f"{key} shard file {path} differs from the manifest (crc32c)"
            else:
                continue
            damaged.append((shard, why))
            break
    return damaged
