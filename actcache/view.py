"""The read side of a store: `Store`, a read-only view up to its committed token count, and the checks of a
store's root metadata and commit record. Every byte goes through the store's `ByteStore` (actcache/byteio.py);
zarr reads go through the same backend's zarr store."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from actcache.byteio import ByteStore, open_bytes
from actcache.codecs import ChunkDecoder, crc32c_matches
from actcache.manifest import read_record
from actcache.spec import (
    COMMIT_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    TOKEN_ARRAYS,
    StoreDamaged,
    StoreError,
    StoreSpec,
    acts_key,
)
from actcache.stats import RunningStats

log = logging.getLogger(__name__)


def _read_root_attrs(where: Path | ByteStore) -> dict[str, Any]:
    io = open_bytes(where)
    path, meta = io.root, io.location("zarr.json")
    if not io.exists("zarr.json"):
        raise StoreError(
            f"{path} is not an actcache store (no zarr.json); harvest one with `actcache harvest`"
        )
    try:
        attrs = json.loads(io.read("zarr.json")).get("attributes", {}).get("actcache")
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        raise StoreDamaged(f"cannot read {meta}: {e}; the store's metadata is damaged") from None
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
        raise StoreError(f"{path} is a zarr group but not an actcache store (no actcache attributes)")
    version = attrs.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(
            f"{path} was written by a newer actcache (format {version} > {FORMAT_VERSION}); upgrade actcache"
        )
    return attrs


def _read_commit(where: Path | ByteStore) -> dict[str, Any]:
    """The commit record, checked for the fields every reader relies on (StoreError naming what is wrong)."""
    io = open_bytes(where)
    path, commit_path = io.root, io.location(COMMIT_FILE)
    if not io.exists(COMMIT_FILE):
        raise StoreDamaged(
            f"{commit_path} is missing: nothing proves which rows of {path} are data; run `actcache verify {path}`, "
            "then harvest the store again (--overwrite)"
        )
    try:
        commit = json.loads(io.read(COMMIT_FILE))
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        raise StoreDamaged(f"cannot read {commit_path}: {e}; the commit record is damaged") from None
    tokens = commit.get("committed_tokens") if isinstance(commit, dict) else None
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise StoreDamaged(
            f"{commit_path} is damaged: committed_tokens is {tokens!r}, not a count >= 0; run `actcache verify {path}`"
        )
    return commit


def parse_shard_index(tail: bytes, n_chunks: int) -> np.ndarray | None:
    """[n_chunks, 2] (offset, nbytes) from the last n_chunks * 16 + 4 bytes of a shard; None if its crc32c fails.

    zarr v3 sharding_indexed with index_location "end" and index codecs bytes(little) + crc32c; an absent
    chunk has offset = nbytes = 2**64 - 1.
    """
    if len(tail) != n_chunks * 16 + 4:
        return None
    u8 = np.frombuffer(tail, dtype=np.uint8)
    if not crc32c_matches(u8[:-4], u8[-4:]):
        return None
    return np.frombuffer(tail[:-4], dtype="<u8").reshape(n_chunks, 2)


def check_store_folder(path: str | os.PathLike | ByteStore) -> None:
    """StoreError unless `path` holds an actcache store of a format this version reads (its commit record is not
    looked at: a store whose commit record is damaged can still be replaced)."""
    io = open_bytes(path)
    path = io.root
    if isinstance(path, Path) and not path.exists():
        raise StoreError(f"store {path} does not exist; harvest one with `actcache harvest ... --out {path}`")
    _read_root_attrs(io)


def is_store(path: str | os.PathLike) -> bool:
    try:
        _read_root_attrs(open_bytes(path))
        return True
    except StoreError:
        return False


class Store:
    """A read-only view of a store up to its committed token count."""

    def __init__(self, path: Path | ByteStore, attrs: dict[str, Any]) -> None:
        self.io: ByteStore = open_bytes(path)
        """Every byte of the store goes through it (actcache/byteio.py)."""
        self.path: Path = self.io.root
        self.format_version: int = attrs["format_version"]
        self.spec = StoreSpec.from_json(attrs["spec"])
        self.store_id: str | None = attrs.get("store_id")
        """Made at creation (format 2); None for format-1 stores."""
        self.d_model = self.spec.d_model
        self._arrays: dict[str, Any] = {}
        self._decoders: dict[str, ChunkDecoder | None] = {}
        self._indexes: dict[tuple[str, int], np.ndarray] = {}
        self._lock = threading.Lock()
        self._zarr: Any = None
        self.refresh()

    @classmethod
    def open(cls, path: str | os.PathLike | ByteStore) -> Store:
        """Open a store (a local folder, or any ByteStore); StoreError if it is missing, not a store, or written by
        a newer format version."""
        io = open_bytes(path)
        path = io.root
        if isinstance(io.root, Path) and not io.root.exists():
            raise StoreError(
                f"store {path} does not exist; harvest one with `actcache harvest ... --out {path}`"
            )
        attrs = _read_root_attrs(io)
        try:
            return cls(io, attrs)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a spec that does not parse
            raise StoreDamaged(
                f"the store metadata of {path} (zarr.json) is damaged ({type(e).__name__}: {e}); harvest it again"
            ) from None

    def refresh(self) -> None:
        """Re-read the commit record (a store that is still being harvested grows)."""
        commit = _read_commit(self.io)
        self.committed_tokens: int = int(commit["committed_tokens"])
        self.complete: bool = bool(commit.get("complete", False))
        self._stats: dict[str, Any] = commit.get("stats", {})
        self.rounding: dict[str, list[float]] = commit.get("rounding", {})
        """Lossy mode (spec.keep_bits): stored key -> [squared rounding errors, squared values, squared deviations
        from the shard means], summed over the committed shards (actcache.lossy.rounding_error)."""
        self.manifest: dict[str, Any] | None = commit.get("manifest")
        """{"shards", "chain", "genesis", "meta"} (actcache/manifest.py); None for format-1 stores."""
        if self.committed_tokens > self.spec.tokens_target:
            raise StoreDamaged(
                f"{self.path / COMMIT_FILE} is damaged: {self.committed_tokens} committed tokens exceed the store's "
                f"{self.spec.tokens_target} rows; run `actcache verify {self.path}`"
            )

    # ---- identity -------------------------------------------------------------------------------------------
    IDENTITY_FIELDS = ("model", "revision", "corpus", "dtype", "d_model", "context")

    def content_digest(self, tokens: int) -> str | None:
        """The manifest's chain value after the shards holding rows [0, tokens): a digest of the spec, the array
        metadata and every byte of those shards. None for a format-1 store (no manifest)."""
        if self.manifest is None:
            return None
        if not 0 <= tokens <= self.committed_tokens:
            raise StoreError(f"{self.path} holds {self.committed_tokens} committed tokens, not {tokens}")
        shards = math.ceil(tokens / self.spec.shard_tokens)
        if shards == 0:
            return str(self.manifest["genesis"])
        if shards == int(self.manifest["shards"]):
            return str(self.manifest["chain"])
        try:
            return read_record(self.io, shards - 1).chain
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(
                f"manifest record of shard {shards - 1} of {self.path} is unreadable ({e}); run `actcache verify`"
            ) from None

    def identity(self, tokens: int | None = None) -> dict[str, Any]:
        """What a run records of the store it reads: where it came from (model, revision, corpus, ...), its id, and
        the content digest of its first `tokens` rows (default: all committed rows). `check_identity` compares."""
        tokens = self.committed_tokens if tokens is None else int(tokens)
        spec = self.spec
        return {
            "path": str(self.path),
            "store_id": self.store_id,
            **{k: getattr(spec, k) for k in self.IDENTITY_FIELDS},
            "tokens": tokens,
            "content": self.content_digest(min(tokens, self.committed_tokens)),
        }

    def identity_mismatch(self, recorded: Mapping[str, Any]) -> str | None:
        """None when this store holds what `recorded` (an `identity()`) describes, else the differences."""
        diffs = [
            f"{k} {recorded[k]!r} != {getattr(self.spec, k)!r}"
            for k in self.IDENTITY_FIELDS
            if k in recorded and recorded[k] != getattr(self.spec, k)
        ]
        tokens = int(recorded.get("tokens", 0) or 0)
        if tokens > self.committed_tokens:
            diffs.append(f"it holds {self.committed_tokens} committed tokens, the run read {tokens}")
        elif not diffs and recorded.get("content") and self.manifest is not None:
            mine = self.content_digest(tokens)
            if mine != recorded["content"]:
                diffs.append(
                    f"the content of its first {tokens} tokens differs (digest {str(recorded['content'])[:12]} != "
                    f"{str(mine)[:12]})"
                )
        return "; ".join(diffs) or None

    def check_identity(
        self,
        recorded: Mapping[str, Any] | None,
        what: str = "the run",
        fix: str = "pass that store with --store, or start a new run",
    ) -> None:
        """StoreError naming both stores and `fix` when this is not the store `recorded` describes (None: nothing
        to check)."""
        if not recorded:
            return
        diff = self.identity_mismatch(recorded)
        if diff is not None:
            raise StoreError(
                f"{self.path} is not the store {what} used ({recorded.get('path', '?')}: {diff}); {fix}"
            )

    @property
    def keys(self) -> list[tuple[int, str]]:
        """(layer, site) pairs held by the store."""
        return [(layer, site) for layer in self.spec.layers for site in self.spec.sites]

    def array(self, key: str) -> Any:
        """The zarr array of a key ('acts/resid_post/3', 'token_ids', ...; an alias gives the array it names)."""
        key = self.spec.stored_key(key)
        with self._lock:
            if key not in self._arrays:
                if key not in self.spec.array_keys:
                    raise StoreError(f"{self.path} has no array {key!r}")
                if self._zarr is None:
                    self._zarr = self.io.zarr_store(read_only=True)
                self._arrays[key] = zarr.open_array(store=self._zarr, path=key, mode="r")
            return self._arrays[key]

    def _check_key(self, layer: int, site: str) -> str:
        if layer not in self.spec.layers or site not in self.spec.sites:
            raise StoreError(
                f"{self.path} has no activations for layer {layer} site {site!r}; it holds layers "
                f"{list(self.spec.layers)} and sites {list(self.spec.sites)}"
            )
        return self.spec.stored_key(acts_key(layer, site))

    def acts(self, layer: int, site: str) -> Any:
        """The zarr array [tokens_target, d_model] (stored dtype); rows >= committed_tokens are not data."""
        return self.array(self._check_key(layer, site))

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.committed_tokens:
            raise StoreError(
                f"token range [{start}, {stop}) outside the {self.committed_tokens} committed tokens"
            )

    def read_raw(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of an array in the stored dtype (bf16 as uint16 bits); an alias reads its array."""
        key = self.spec.stored_key(key)
        self._check_range(start, stop)
        # zarr reads an absent shard file as fill values (zeros): a lost file must be an error, never data.
        for shard in range(start // self.spec.shard_tokens, math.ceil(stop / self.spec.shard_tokens)):
            self._require_file(key, shard)
        return self.array(key)[start:stop]

    def _require_file(self, key: str, shard: int) -> None:
        if not self.io.exists(self.shard_key(key, shard)):
            raise StoreError(
                f"{key}: committed shard file {self.shard_path(key, shard)} is missing; run `actcache verify "
                f"{self.path}`, then rerun the harvest command to write it again"
            )

    def read_acts(self, layer: int, site: str, start: int, stop: int, dtype: str = "float32") -> np.ndarray:
        """Rows [start, stop) decoded to float32 (default) or left in the stored dtype (dtype='stored')."""
        raw = self.read_raw(self._check_key(layer, site), start, stop)
        if dtype == "stored":
            return raw
        if self.spec.dtype == "bfloat16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(dtype)

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a per-token array (token_ids, doc_ids, positions, flags)."""
        if name not in TOKEN_ARRAYS:
            raise StoreError(f"unknown per-token array {name!r}; choose from {', '.join(TOKEN_ARRAYS)}")
        return self.read_raw(name, start, stop)

    def stats(self, layer: int, site: str) -> dict[str, Any]:
        """{"mean": [d] float64, "mean_sq_norm": float, "count": int} over the committed tokens."""
        s = self.running_stats(layer, site)
        return {"mean": s.mean, "mean_sq_norm": s.mean_sq_norm, "count": s.count}

    def running_stats(self, layer: int, site: str) -> RunningStats:
        key = self._check_key(layer, site)
        data = self._stats.get(key)
        return RunningStats.from_json(data) if data else RunningStats(self.d_model)

    def read_chunk(self, key: str, chunk: int) -> np.ndarray:
        """Committed rows of inner chunk `chunk` of an array (stored dtype), decoded without zarr's machinery.

        The fast path of the reader: one pread of the chunk's bytes (the shard index is read once per shard and
        cached; committed shards never change), crc32c check, decompression in the calling thread.
        """
        spec = self.spec
        key = spec.stored_key(key)
        start, stop = chunk * spec.chunk_tokens, min(self.committed_tokens, (chunk + 1) * spec.chunk_tokens)
        if not 0 <= start < self.committed_tokens:
            raise StoreError(
                f"chunk {chunk} of {key} starts beyond the {self.committed_tokens} committed tokens"
            )
        decoder = self._decoder(key)
        if decoder is None:
            return self.read_raw(key, start, stop)
        per_shard = spec.shard_tokens // spec.chunk_tokens
        shard, j = divmod(chunk, per_shard)
        path = self.shard_path(key, shard)
        index = self._shard_index(key, shard, per_shard)
        offset, nbytes = (int(v) for v in index[j])
        if offset == 2**64 - 1:
            raise StoreError(f"{key} chunk {chunk} is missing from {path}; run `actcache verify {self.path}`")
        try:
            data = self.io.read_range(self.shard_key(key, shard), offset, nbytes)
        except FileNotFoundError:
            self._require_file(key, shard)
            raise
        try:
            return decoder.decode(data)[: stop - start]
        except ValueError as e:
            raise StoreError(
                f"{key} chunk {chunk} in {path}: {e}; run `actcache verify {self.path}`"
            ) from None

    def chunk_decoder(self, key: str) -> ChunkDecoder | None:
        """The fast decoder of one inner chunk of `key` (None: a codec pipeline it does not know; use zarr)."""
        return self._decoder(self.spec.stored_key(key))

    def _decoder(self, key: str) -> ChunkDecoder | None:
        with self._lock:
            if key not in self._decoders:
                try:
                    meta = json.loads(self.io.read(f"{key}/zarr.json"))
                    self._decoders[key] = ChunkDecoder(meta)
                except NotImplementedError:
                    self._decoders[key] = None
            return self._decoders[key]

    def _shard_index(self, key: str, shard: int, per_shard: int) -> np.ndarray:
        cached = self._indexes.get((key, shard))
        if cached is not None:
            return cached
        size = per_shard * 16 + 4
        self._require_file(key, shard)
        name = self.shard_key(key, shard)
        total = self.io.size(name)
        # Shorter than its index: truncated.
        tail = b"" if total is None or total < size else self.io.read_range(name, total - size, size)
        index = parse_shard_index(tail, per_shard)
        if index is None:
            raise StoreError(
                f"shard index of {self.shard_path(key, shard)} is damaged; run `actcache verify {self.path}`"
            )
        self._indexes[(key, shard)] = index
        return index

    def stored_bytes(self, key: str) -> int:
        """Bytes on disk of the shard files of an array that hold committed rows."""
        n_shards = math.ceil(self.committed_tokens / self.spec.shard_tokens)
        sizes = (self.io.size(self.shard_key(key, i)) for i in range(n_shards))
        return sum(n for n in sizes if n is not None)

    @staticmethod
    def shard_key(key: str, shard_index: int) -> str:
        """Byte-I/O key of one shard of an array (zarr v3 default chunk key encoding 'c/i/0')."""
        coords = (shard_index, 0) if key.startswith("acts/") else (shard_index,)
        return f"{key}/c/" + "/".join(str(c) for c in coords)

    def shard_path(self, key: str, shard_index: int) -> Path:
        """File (location) of one shard of an array, for messages and local tools."""
        return self.io.location(self.shard_key(key, shard_index))
