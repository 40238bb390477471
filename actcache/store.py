"""The on-disk activation store (spec: docs/store-format.md): create, resume, append shards, commit, open, stats.

Layout: a zarr v3 group; `acts/{site}/{layer}` [tokens, d_model] per (layer, site) plus per-token arrays
`token_ids`, `doc_ids`, `positions`, `flags` at the root. All arrays are chunked along tokens and sharded (one file
per shard per array), every inner chunk carries a crc32c. The commit record `commit.json` (tokens committed +
running statistics) is replaced atomically after the shards it covers are durable; readers only ever look below
the committed token count, so a kill -9 mid-write can only damage data that nobody reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from actcache.codecs import (
    META_CODEC,
    STORED_DTYPE,
    ChunkDecoder,
    canonical_dtype,
    crc32c_matches,
    from_stored,
    get_codec,
    to_stored,
)
from actcache.lock import StoreLock
from actcache.manifest import (
    MANIFEST_DIR,
    DigestingLocalStore,
    ShardRecord,
    canonical,
    file_digest,
    genesis,
    read_record,
    seal,
    sha256_hex,
    write_record,
)
from actcache.stats import RunningStats

log = logging.getLogger(__name__)

SITES = ("resid_pre", "resid_post", "mlp_out", "attn_out")
FLAG_BOS, FLAG_PAD = 1, 2
FORMAT_NAME = "actcache-store"
FORMAT_VERSION = 2
"""2: a manifest binds every committed shard's bytes to its position (actcache/manifest.py); the store has an id.
Format-1 stores still open, read and resume; verify checks their chunk checksums only."""
COMMIT_FILE = "commit.json"
TOKEN_ARRAYS: dict[str, np.dtype] = {
    "token_ids": np.dtype(np.int32),
    "doc_ids": np.dtype(np.int64),
    "positions": np.dtype(np.int32),
    "flags": np.dtype(np.uint8),
}
# Chunk sizing (see plan_chunks): ~1 MiB decoded per inner chunk is large enough that per-chunk overhead
# (file seek, index lookup, codec call) is small next to decode time and small enough that the reader's
# chunk-order shuffle has many units to permute. The shard size is bounded by the harvest's shard buffers:
# it holds one shard per array in memory before writing (42 layers x 4 sites on Gemma-2-9b = 168 arrays).
TARGET_CHUNK_BYTES = 1 << 20
SHARD_BUFFER_BUDGET = 1 << 30
MIN_CHUNKS_PER_SHARD, MAX_CHUNKS_PER_SHARD = 8, 64


class StoreError(Exception):
    """Bad store input or state; the message names the problem and the fix (the CLI exits with code 2)."""


class StoreDamaged(StoreError):
    """The store's own metadata or commit record is damaged (verify reports it as corruption, exit code 1)."""


def acts_key(layer: int, site: str) -> str:
    """Array key of one (layer, site): 'acts/resid_post/15'."""
    return f"acts/{site}/{int(layer)}"


def parse_acts_key(key: str) -> tuple[int, str]:
    _, site, layer = key.split("/")
    return int(layer), site


@dataclass(frozen=True)
class StoreSpec:
    """Everything that defines a store; a resume requires an equal spec."""

    model: str
    """Model id (HF id, local folder or embedded name) the activations come from."""
    revision: str | None
    """Model revision (commit hash or tag), None for local models."""
    dtype: str
    """Logical activation dtype: bfloat16 | float16 | float32 (bf16 is stored as its uint16 bit pattern)."""
    layers: tuple[int, ...]
    """Harvested layer indices."""
    sites: tuple[str, ...]
    """Harvested sites, a subset of SITES."""
    d_model: int
    """Width of every activation row."""
    context: int
    """Tokens per context window; windows are stored contiguously, window w at rows [w*context, (w+1)*context)."""
    corpus: str
    """Corpus description (path / dataset id + split + text field)."""
    tokenizer: str
    """Tokenizer id (normally the model's)."""
    tokens_target: int
    """Planned token count; the arrays are created with this many rows (committed_tokens may end below it)."""
    chunk_tokens: int
    """Rows per inner chunk (the unit of compression, checksum and random access)."""
    shard_tokens: int
    """Rows per shard file (a multiple of chunk_tokens and of context); the unit of writing and of commit."""
    codec: str
    """Name of the activation codec pipeline (actcache.codecs.CODECS)."""
    harvest_config: dict = field(default_factory=dict)
    """The full resolved harvest configuration (JSON-serialisable)."""

    def __post_init__(self) -> None:
        # Normalise so that a spec built from the CLI equals the one read back from JSON.
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "sites", tuple(str(s) for s in self.sites))
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        object.__setattr__(self, "harvest_config", json.loads(json.dumps(self.harvest_config)))

    def validate(self) -> None:
        """Raise StoreError naming the first inconsistent field."""
        bad = [s for s in self.sites if s not in SITES]
        if bad:
            raise StoreError(f"unknown site(s) {bad}; choose from {', '.join(SITES)}")
        if not self.layers or not self.sites:
            raise StoreError("a store needs at least one layer and one site")
        if len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            raise StoreError(f"layers must be distinct non-negative integers, got {self.layers}")
        for name in ("d_model", "context", "tokens_target", "chunk_tokens", "shard_tokens"):
            if getattr(self, name) <= 0:
                raise StoreError(f"StoreSpec.{name} must be positive, got {getattr(self, name)}")
        if self.shard_tokens % self.chunk_tokens or self.shard_tokens % self.context:
            raise StoreError(
                f"shard_tokens {self.shard_tokens} must be a multiple of chunk_tokens {self.chunk_tokens} "
                f"and of context {self.context}; use plan_chunks() for defaults"
            )
        try:
            get_codec(self.codec)
        except ValueError as e:
            raise StoreError(str(e)) from None

    @property
    def acts_keys(self) -> list[str]:
        return [acts_key(layer, site) for layer in self.layers for site in self.sites]

    @property
    def array_keys(self) -> list[str]:
        return [*self.acts_keys, *TOKEN_ARRAYS]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"], d["sites"] = list(self.layers), list(self.sites)
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoreSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def diff(self, other: StoreSpec) -> list[str]:
        """Names of the fields that differ, each with both values."""
        a, b = self.to_json(), other.to_json()
        out = []
        for k in a:
            if a[k] == b[k]:
                continue
            if isinstance(a[k], dict) and isinstance(b[k], dict):  # harvest_config: only the keys that differ
                keys = sorted(set(a[k]) | set(b[k]))
                out += [
                    f"{k}.{sub}: {a[k].get(sub)!r} != {b[k].get(sub)!r}"
                    for sub in keys
                    if a[k].get(sub) != b[k].get(sub)
                ]
            else:
                out.append(f"{k}: {a[k]!r} != {b[k]!r}")
        return out


def plan_chunks(d_model: int, context: int, dtype: str = "bfloat16", n_arrays: int = 1) -> tuple[int, int]:
    """Default (chunk_tokens, shard_tokens) for activations of width d_model.

    chunk: ~TARGET_CHUNK_BYTES decoded, a multiple of the context when a window is smaller than that, else a
    divisor of it; shard: 8..64 chunks, fewer when many arrays share the harvest's shard buffer budget, and a
    multiple of the context so that a shard holds whole windows.
    """
    row_bytes = d_model * STORED_DTYPE[canonical_dtype(dtype)].itemsize
    target = max(1, TARGET_CHUNK_BYTES // row_bytes)
    if target >= context:
        chunk = context * max(1, round(target / context))
    else:
        chunk = max(d for d in range(1, context + 1) if context % d == 0 and d <= target)
    n_chunks = SHARD_BUFFER_BUDGET // max(1, n_arrays * chunk * row_bytes)
    n_chunks = min(MAX_CHUNKS_PER_SHARD, max(MIN_CHUNKS_PER_SHARD, n_chunks))
    unit = math.lcm(chunk, context)
    shard = unit * max(1, (chunk * n_chunks) // unit)
    return chunk, shard


def plan_bytes(spec: StoreSpec) -> int:
    """Estimated bytes on disk of the finished store (for the harvest's disk check and --dry-run)."""
    itemsize = STORED_DTYPE[spec.dtype].itemsize
    ratio = get_codec(spec.codec).bf16_ratio if spec.dtype == "bfloat16" else 1.0
    acts = spec.tokens_target * spec.d_model * itemsize * len(spec.acts_keys) * ratio
    # Per-token arrays: 17 raw bytes per token, which compress to well under half.
    per_token = spec.tokens_target * sum(d.itemsize for d in TOKEN_ARRAYS.values()) * 0.5
    # crc32c (4 B) per inner chunk + 16 B index entry per chunk; metadata files.
    n_chunks = math.ceil(spec.tokens_target / spec.chunk_tokens) * len(spec.array_keys)
    return int(acts * 1.02 + per_token + n_chunks * 20 + 4096 * (len(spec.array_keys) + 4))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that readers see the old or the new file, never a torn one (tmp + fsync + os.replace)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_root_attrs(path: Path) -> dict[str, Any]:
    meta = path / "zarr.json"
    if not meta.is_file():
        raise StoreError(
            f"{path} is not an actcache store (no zarr.json); harvest one with `actcache harvest`"
        )
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {}).get("actcache")
    except (json.JSONDecodeError, OSError) as e:
        raise StoreDamaged(f"cannot read {meta}: {e}; the store's metadata is damaged") from None
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
        raise StoreError(f"{path} is a zarr group but not an actcache store (no actcache attributes)")
    version = attrs.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(
            f"{path} was written by a newer actcache (format {version} > {FORMAT_VERSION}); upgrade actcache"
        )
    return attrs


def _read_commit(path: Path) -> dict[str, Any]:
    """The commit record, checked for the fields every reader relies on (StoreError naming what is wrong)."""
    commit_path = path / COMMIT_FILE
    if not commit_path.exists():
        raise StoreDamaged(
            f"{commit_path} is missing: nothing proves which rows of {path} are data; run `actcache verify {path}`, "
            "then harvest the store again (--overwrite)"
        )
    try:
        commit = json.loads(commit_path.read_text())
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


def check_store_folder(path: str | os.PathLike) -> None:
    """StoreError unless `path` holds an actcache store of a format this version reads (its commit record is not
    looked at: a store whose commit record is damaged can still be replaced)."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"store {path} does not exist; harvest one with `actcache harvest ... --out {path}`")
    _read_root_attrs(path)


def is_store(path: str | os.PathLike) -> bool:
    try:
        _read_root_attrs(Path(path))
        return True
    except StoreError:
        return False


class Store:
    """A read-only view of a store up to its committed token count."""

    def __init__(self, path: Path, attrs: dict[str, Any]) -> None:
        self.path = path
        self.format_version: int = attrs["format_version"]
        self.spec = StoreSpec.from_json(attrs["spec"])
        self.store_id: str | None = attrs.get("store_id")
        """Made at creation (format 2); None for format-1 stores."""
        self.d_model = self.spec.d_model
        self._arrays: dict[str, Any] = {}
        self._decoders: dict[str, ChunkDecoder | None] = {}
        self._indexes: dict[tuple[str, int], np.ndarray] = {}
        self._lock = threading.Lock()
        self.refresh()

    @classmethod
    def open(cls, path: str | os.PathLike) -> Store:
        """Open a store; StoreError if it is missing, not a store, or written by a newer format version."""
        path = Path(path)
        if not path.exists():
            raise StoreError(
                f"store {path} does not exist; harvest one with `actcache harvest ... --out {path}`"
            )
        attrs = _read_root_attrs(path)
        try:
            return cls(path, attrs)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a spec that does not parse
            raise StoreDamaged(
                f"the store metadata of {path} (zarr.json) is damaged ({type(e).__name__}: {e}); harvest it again"
            ) from None

    def refresh(self) -> None:
        """Re-read the commit record (a store that is still being harvested grows)."""
        commit = _read_commit(self.path)
        self.committed_tokens: int = int(commit["committed_tokens"])
        self.complete: bool = bool(commit.get("complete", False))
        self._stats: dict[str, Any] = commit.get("stats", {})
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
            return read_record(self.path, shards - 1).chain
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

    def check_identity(self, recorded: Mapping[str, Any] | None, what: str = "the run") -> None:
        """StoreError naming both stores when this is not the store `recorded` describes (None: nothing to check)."""
        if not recorded:
            return
        diff = self.identity_mismatch(recorded)
        if diff is not None:
            raise StoreError(
                f"{self.path} is not the store {what} used ({recorded.get('path', '?')}: {diff}); pass that store "
                "with --store, or start a new run"
            )

    @property
    def keys(self) -> list[tuple[int, str]]:
        """(layer, site) pairs held by the store."""
        return [(layer, site) for layer in self.spec.layers for site in self.spec.sites]

    def array(self, key: str) -> Any:
        """The zarr array of a key ('acts/resid_post/3', 'token_ids', ...)."""
        with self._lock:
            if key not in self._arrays:
                if key not in self.spec.array_keys:
                    raise StoreError(f"{self.path} has no array {key!r}")
                self._arrays[key] = zarr.open_array(str(self.path / key), mode="r")
            return self._arrays[key]

    def _check_key(self, layer: int, site: str) -> str:
        if layer not in self.spec.layers or site not in self.spec.sites:
            raise StoreError(
                f"{self.path} has no activations for layer {layer} site {site!r}; it holds layers "
                f"{list(self.spec.layers)} and sites {list(self.spec.sites)}"
            )
        return acts_key(layer, site)

    def acts(self, layer: int, site: str) -> Any:
        """The zarr array [tokens_target, d_model] (stored dtype); rows >= committed_tokens are not data."""
        return self.array(self._check_key(layer, site))

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.committed_tokens:
            raise StoreError(
                f"token range [{start}, {stop}) outside the {self.committed_tokens} committed tokens"
            )

    def read_raw(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of an array in the stored dtype (bf16 as uint16 bits)."""
        self._check_range(start, stop)
        # zarr reads an absent shard file as fill values (zeros): a lost file must be an error, never data.
        for shard in range(start // self.spec.shard_tokens, math.ceil(stop / self.spec.shard_tokens)):
            self._require_file(key, self.shard_path(key, shard))
        return self.array(key)[start:stop]

    def _require_file(self, key: str, path: Path) -> None:
        if not path.is_file():
            raise StoreError(
                f"{key}: committed shard file {path} is missing; run `actcache verify {self.path}`, then rerun the "
                "harvest command to write it again"
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
        index = self._shard_index(key, shard, path, per_shard)
        offset, nbytes = (int(v) for v in index[j])
        if offset == 2**64 - 1:
            raise StoreError(f"{key} chunk {chunk} is missing from {path}; run `actcache verify {self.path}`")
        try:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), nbytes, offset)
        except FileNotFoundError:
            self._require_file(key, path)
            raise
        try:
            return decoder.decode(data)[: stop - start]
        except ValueError as e:
            raise StoreError(
                f"{key} chunk {chunk} in {path}: {e}; run `actcache verify {self.path}`"
            ) from None

    def _decoder(self, key: str) -> ChunkDecoder | None:
        with self._lock:
            if key not in self._decoders:
                try:
                    meta = json.loads((self.path / key / "zarr.json").read_text())
                    self._decoders[key] = ChunkDecoder(meta)
                except NotImplementedError:
                    self._decoders[key] = None
            return self._decoders[key]

    def _shard_index(self, key: str, shard: int, path: Path, per_shard: int) -> np.ndarray:
        cached = self._indexes.get((key, shard))
        if cached is not None:
            return cached
        size = per_shard * 16 + 4
        self._require_file(key, path)
        try:
            with open(path, "rb") as f:
                f.seek(-size, os.SEEK_END)
                tail = f.read(size)
        except OSError:  # shorter than its index: truncated
            tail = b""
        index = parse_shard_index(tail, per_shard)
        if index is None:
            raise StoreError(f"shard index of {path} is damaged; run `actcache verify {self.path}`")
        self._indexes[(key, shard)] = index
        return index

    def stored_bytes(self, key: str) -> int:
        """Bytes on disk of the shard files of an array that hold committed rows."""
        n_shards = math.ceil(self.committed_tokens / self.spec.shard_tokens)
        paths = (self.shard_path(key, i) for i in range(n_shards))
        return sum(p.stat().st_size for p in paths if p.exists())

    def shard_path(self, key: str, shard_index: int) -> Path:
        """File of one shard of an array (zarr v3 default chunk key encoding 'c/i/0')."""
        coords = (shard_index, 0) if key.startswith("acts/") else (shard_index,)
        return self.path / key / "c" / "/".join(str(c) for c in coords)


class StoreWriter:
    """Appends whole shards and commits them; see the module docstring for the crash-safety argument."""

    def __init__(self, path: Path, spec: StoreSpec, commit: dict[str, Any]) -> None:
        self.path = path
        self.spec = spec
        self.committed_tokens: int = int(commit["committed_tokens"])
        self.complete: bool = bool(commit.get("complete", False))
        self.stats: dict[str, RunningStats] = {
            k: RunningStats.from_json(v) for k, v in commit.get("stats", {}).items()
        }
        self._store = Store(path, _read_root_attrs(path))
        self._written: dict[str, dict[int, int]] = {k: {} for k in spec.array_keys}  # key -> shard -> rows
        self._digests: dict[str, dict[int, tuple[int, str]]] = {k: {} for k in spec.array_keys}
        self.manifest: dict[str, Any] | None = commit.get("manifest")
        """None for a format-1 store (resumed without a manifest)."""
        self.store_id: str | None = self._store.store_id
        self.repairing: set[int] = set()
        """Committed shards the harvest rewrites because the manifest does not prove them (`damaged_shards`)."""
        self._zarr_store = DigestingLocalStore(path)
        self._arrays: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.lock: StoreLock | None = None

    @classmethod
    def create_or_resume(
        cls, path: str | os.PathLike, spec: StoreSpec, overwrite: bool = False
    ) -> StoreWriter:
        """A new store, or the existing one if its spec is equal (resume from committed_tokens)."""
        path = Path(path)
        spec.validate()
        lock = _acquire(path)
        try:
            writer = cls._create_or_resume(path, spec, overwrite)
        except BaseException:
            lock.release()
            raise
        writer.lock = lock
        return writer

    @classmethod
    def _create_or_resume(cls, path: Path, spec: StoreSpec, overwrite: bool) -> StoreWriter:
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):
            if not is_store(path) and not (path / "zarr.json").exists():
                raise StoreError(
                    f"{path} exists and is not an actcache store; choose another --out or remove it"
                )
            attrs = _read_root_attrs(path)  # raises on newer format versions, even with overwrite
            if overwrite:
                log.info("removing existing store %s (--overwrite)", path)
                shutil.rmtree(path)
            else:
                old = StoreSpec.from_json(attrs["spec"])
                if old != spec:
                    raise StoreError(
                        f"{path} holds a store with a different spec ({'; '.join(old.diff(spec))}); rerun the "
                        "same command to resume, or pass --overwrite to replace it"
                    )
                writer = cls(path, spec, _read_commit(path))
                log.info("resuming store %s at %d committed tokens", path, writer.committed_tokens)
                return writer
        _create(path, spec)
        return cls(path, spec, _read_commit(path))

    def _array(self, key: str) -> Any:
        with self._lock:
            if key not in self._arrays:
                # write_empty_chunks is a runtime setting, not stored metadata: without it zarr omits
                # all-zero chunks (e.g. flags), and verify could not tell an omitted chunk from a lost one.
                arr = zarr.open_array(store=self._zarr_store, path=key, mode="r+")
                self._arrays[key] = arr.with_config({"write_empty_chunks": True})
            return self._arrays[key]

    def write_shard(self, start: int, arrays: Mapping[str, Any]) -> None:
        """Write one whole shard (rows [start, start + n), n <= shard_tokens) of some or all array keys.

        Thread-safe for distinct shards. Activations may be torch tensors or numpy (bf16: uint16 bits or floats).
        The data stays invisible to readers until commit() covers it.
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
            # A torn shard from a killed run may sit here; remove it so zarr never reads it back.
            path = self._store.shard_path(key, shard)
            path.unlink(missing_ok=True)
            self._array(key)[start : start + n] = stored
            # The digest of the bytes zarr handed to the file (no re-read); read back only where zarr wrote by
            # a path the digesting store does not see.
            digest = self._zarr_store.pop_digest(path.relative_to(self.path).as_posix()) or file_digest(path)
            with self._lock:
                self._written[key][shard] = n
                self._digests[key][shard] = digest

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
        for shard_files in self._files_between(first, last):
            with open(shard_files, "rb") as f:
                os.fsync(f.fileno())
        merged = {k: v.copy() for k, v in self.stats.items()}
        for key, update in (stats_update or {}).items():
            key = acts_key(*key) if isinstance(key, tuple) else key
            merged.setdefault(key, RunningStats(spec.d_model)).merge(update)
        complete = ends_short or tokens >= spec.tokens_target
        manifest = self._extend_manifest(first, last, tokens)
        record: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": self._store.format_version,
            "committed_tokens": int(tokens),
            "complete": complete,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stats": {k: v.to_json() for k, v in merged.items()},
        }
        if manifest is not None:
            record = seal(record | {"store_id": self.store_id, "manifest": manifest})
        write_json_atomic(self.path / COMMIT_FILE, record)
        self.committed_tokens, self.stats, self.complete = int(tokens), merged, complete
        self.manifest = manifest

    def _extend_manifest(self, first: int, last: int, tokens: int) -> dict[str, Any] | None:
        """Write (fsynced) the manifest records of shards [first, last) and return the commit's manifest entry."""
        if self.manifest is None:
            return None
        chain = str(self.manifest["chain"])
        for shard in range(first, last):
            rows = min(self.spec.shard_tokens, tokens - shard * self.spec.shard_tokens)
            digests = {key: self._digests[key][shard] for key in self.spec.array_keys}
            record = ShardRecord.make(chain, shard, rows, digests)
            write_record(self.path, record)
            chain = record.chain
        if last > first:
            _fsync_dir(self.path / MANIFEST_DIR)
        return {**self.manifest, "shards": last, "chain": chain}

    def damaged_shards(self, deep: bool = False) -> list[tuple[int, str]]:
        """`damaged_shards` of this store; those the harvest rewrites."""
        return damaged_shards(self._store, deep)

    def confirm_repair(self, shard: int) -> None:
        """After a damaged committed shard was written again: its bytes must equal the manifest's record."""
        record = read_record(self.path, shard)
        for key in self.spec.array_keys:
            got = self._digests[key].get(shard)
            if got != record.arrays[key]:
                raise StoreError(
                    f"{self.path}: shard {shard} of {key} harvested again differs from the committed one "
                    f"({got} != {record.arrays[key]}): the model, corpus or software changed; pass --overwrite to "
                    "harvest the store again"
                )
        self.repairing.discard(shard)
        log.info("repaired shard %d of %s bit-exactly", shard, self.path)

    def _files_between(self, first: int, last: int) -> list[Path]:
        return [
            p
            for key in self.spec.array_keys
            for shard in range(first, last)
            if (p := self._store.shard_path(key, shard)).exists()
        ]

    def finish(self) -> None:
        """Mirror the commit record into the root group's attributes (for plain zarr users); atomic."""
        meta_path = self.path / "zarr.json"
        meta = json.loads(meta_path.read_text())
        attrs = meta["attributes"]["actcache"]
        attrs["committed_tokens"] = self.committed_tokens
        attrs["stats"] = {k: v.to_json() for k, v in self.stats.items()}
        write_json_atomic(meta_path, meta)
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
    from actcache.manifest import check_chain, meta_digests

    spec = store.spec
    problem = check_chain(store.path, spec, store.store_id, store.manifest, store.committed_tokens)
    if problem is None:
        current = meta_digests(store.path, spec.array_keys)
        edited = [k for k in spec.array_keys if current.get(k) != store.manifest["meta"].get(k)]
        if edited:
            problem = f"the metadata of {edited[0]} ({edited[0]}/zarr.json) was edited"
    if problem is not None:
        raise StoreError(
            f"{store.path}: {problem}; the committed data cannot be trusted: run `actcache verify {store.path}`, "
            "then --overwrite to harvest it again"
        )
    damaged: list[tuple[int, str]] = []
    for shard in range(int(store.manifest["shards"])):
        record = read_record(store.path, shard)
        for key in spec.array_keys:
            path = store.shard_path(key, shard)
            size, crc = record.arrays[key]
            if not path.is_file():
                why = f"{key} shard file {path} is missing"
            elif path.stat().st_size != size:
                why = f"{key} shard file {path} has {path.stat().st_size} bytes, the manifest records {size}"
            elif deep and file_digest(path)[1] != crc:
                why = f"{key} shard file {path} differs from the manifest (crc32c)"
            else:
                continue
            damaged.append((shard, why))
            break
    return damaged


def _acquire(path: Path) -> StoreLock:
    from actcache.lock import LockHeld

    try:
        return StoreLock(path).acquire()
    except LockHeld as e:
        raise StoreError(str(e)) from None


def _create(path: Path, spec: StoreSpec) -> None:
    """Create the group and every array in a temporary folder, then rename it into place (atomic)."""
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if path.exists():
        path.rmdir()  # an empty folder
    path.parent.mkdir(parents=True, exist_ok=True)
    # Derived from the spec, not random: two harvests of one spec are bit-identical stores (the content digests
    # of the manifest tell their bytes apart if they ever differ).
    store_id = sha256_hex(canonical(spec.to_json()))[:32]
    attrs = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "store_id": store_id,
        "spec": spec.to_json(),
        "commit_file": COMMIT_FILE,
    }
    group = zarr.open_group(str(tmp), mode="w", attributes={"actcache": attrs})
    codec = get_codec(spec.codec)
    stored = STORED_DTYPE[spec.dtype]
    common = dict(fill_value=0, config={"write_empty_chunks": True})
    for key in spec.acts_keys:
        layer, site = parse_acts_key(key)
        group.create_array(
            key,
            shape=(spec.tokens_target, spec.d_model),
            dtype=stored,
            chunks=(spec.chunk_tokens, spec.d_model),
            shards=(spec.shard_tokens, spec.d_model),
            compressors=codec.chunk_codecs(
                stored.itemsize, spec.chunk_tokens * spec.d_model * stored.itemsize
            ),
            dimension_names=("token", "d_model"),
            attributes={"dtype": spec.dtype, "layer": layer, "site": site},
            **common,
        )
    meta_codec = get_codec(META_CODEC)
    for key, dtype in TOKEN_ARRAYS.items():
        group.create_array(
            key,
            shape=(spec.tokens_target,),
            dtype=dtype,
            chunks=(spec.chunk_tokens,),
            shards=(spec.shard_tokens,),
            compressors=meta_codec.chunk_codecs(dtype.itemsize, spec.chunk_tokens * dtype.itemsize),
            dimension_names=("token",),
            **common,
        )
    from actcache.manifest import meta_digests

    meta = meta_digests(tmp, spec.array_keys)
    start = genesis(store_id, spec.to_json(), meta)
    (tmp / MANIFEST_DIR).mkdir()
    write_json_atomic(
        tmp / COMMIT_FILE,
        seal(
            {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "committed_tokens": 0,
                "complete": False,
                "stats": {},
                "store_id": store_id,
                "manifest": {"shards": 0, "chain": start, "genesis": start, "meta": meta},
            }
        ),
    )
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    log.info("created store %s (%d arrays)", path, len(spec.array_keys))


def make_synthetic_store(
    path: str | os.PathLike,
    *,
    tokens: int = 8192,
    d_model: int = 32,
    context: int = 128,
    layers: tuple[int, ...] = (0,),
    sites: tuple[str, ...] = ("resid_post",),
    dtype: str = "bfloat16",
    chunk_tokens: int | None = None,
    shard_tokens: int | None = None,
    codec: str = "",
    seed: int = 0,
    commit_tokens: int | None = None,
) -> Store:
    """A store of random activations, for tests and benchmarks (no model needed).

    Window w occupies rows [w*context, (w+1)*context); its first token is BOS (flag bit 0), doc_ids = w,
    positions = 0..context-1, token_ids random. Rows are N(0, 1) + a per-layer offset.
    """
    import torch

    from actcache.codecs import DEFAULT_CODEC

    default_chunk, default_shard = plan_chunks(d_model, context, dtype, len(layers) * len(sites))
    chunk = chunk_tokens or default_chunk
    spec = StoreSpec(
        model="synthetic", revision=None, dtype=dtype, layers=layers, sites=sites, d_model=d_model,
        context=context, corpus="synthetic", tokenizer="synthetic", tokens_target=tokens, chunk_tokens=chunk,
        shard_tokens=shard_tokens or (default_shard if chunk == default_chunk else 8 * math.lcm(chunk, context)),
        codec=codec or DEFAULT_CODEC, harvest_config={"seed": seed},
    )  # fmt: skip
    writer = StoreWriter.create_or_resume(path, spec, overwrite=True)
    gen = torch.Generator().manual_seed(seed)
    commit_at = tokens if commit_tokens is None else commit_tokens
    for start in range(0, tokens, spec.shard_tokens):
        n = min(spec.shard_tokens, tokens - start)
        pos_N = np.arange(start, start + n) % context
        arrays: dict[str, Any] = {
            "token_ids": torch.randint(0, 50_000, (n,), generator=gen).numpy(),
            "doc_ids": np.arange(start, start + n) // context,
            "positions": pos_N,
            "flags": (pos_N == 0).astype(np.uint8) * FLAG_BOS,
        }
        stats = {}
        for key in spec.acts_keys:
            layer, _ = parse_acts_key(key)
            x_ND = torch.randn(n, d_model, generator=gen) + 0.1 * layer
            arrays[key] = x_ND
            # Statistics of the values as stored (after rounding to dtype), excluding BOS like the reader.
            stored_ND = from_stored(to_stored(x_ND, dtype), dtype, torch.float32)
            stats[key] = RunningStats(d_model).update(stored_ND, keep=pos_N != 0)
        writer.write_shard(start, arrays)
        if start + n <= commit_at:
            writer.commit(start + n, stats)
    writer.finish()
    writer.close()
    return Store.open(path)
