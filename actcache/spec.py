"""What defines a store (StoreSpec), its constants and errors, and the planning of its chunk and shard sizes
(docs/store-format.md). No I/O here."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actcache.codecs import STORED_DTYPE, canonical_dtype, get_codec
from actcache.lossy import KEEP_BITS_RATIO, MANTISSA_BITS

SITES = ("resid_pre", "resid_post", "mlp_out", "attn_out")
FLAG_BOS, FLAG_PAD = 1, 2
FORMAT_NAME = "actcache-store"
FORMAT_VERSION = 3
"""3: equal sites are stored once (StoreSpec.aliases) and activations may be rounded (StoreSpec.keep_bits); 2: a
manifest binds every committed shard's bytes to its position (actcache/manifest.py); the store has an id.
Format-2 stores open, read, resume and verify as before; format-1 stores open, read and resume; verify checks
their chunk checksums only."""
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
    aliases: dict = field(default_factory=dict)
    """Activation keys stored once under another key that holds the same tensor ('acts/resid_pre/16' ->
    'acts/resid_post/15'; actcache.sites.equal_sites): no array of their own (format 3)."""
    keep_bits: int | None = None
    """Lossy mode: mantissa bits kept (round-to-nearest-even) before compression; None: lossless (format 3)."""

    def __post_init__(self) -> None:
        # Normalise so that a spec built from the CLI equals the one read back from JSON.
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "sites", tuple(str(s) for s in self.sites))
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        object.__setattr__(self, "harvest_config", json.loads(json.dumps(self.harvest_config)))
        object.__setattr__(self, "aliases", {str(k): str(v) for k, v in sorted(self.aliases.items())})
        if self.keep_bits is not None:
            object.__setattr__(self, "keep_bits", int(self.keep_bits))

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
        grid = set(self.grid_keys)
        for alias, target in self.aliases.items():
            if alias not in grid or target not in grid or target in self.aliases or alias == target:
                raise StoreError(f"bad alias {alias} -> {target}: both must be stored (layer, site) keys")
        if self.keep_bits is not None and not 0 <= self.keep_bits <= MANTISSA_BITS[self.dtype]:
            raise StoreError(
                f"keep_bits {self.keep_bits} is outside 0..{MANTISSA_BITS[self.dtype]} for {self.dtype}; "
                f"choose e.g. --keep-bits 2 (or omit it for a lossless store)"
            )

    @property
    def grid_keys(self) -> list[str]:
        """Every (layer, site) key the store answers for, aliases included."""
        return [acts_key(layer, site) for layer in self.layers for site in self.sites]

    @property
    def acts_keys(self) -> list[str]:
        """The activation arrays on disk: every (layer, site) key but the aliases."""
        return [k for k in self.grid_keys if k not in self.aliases]

    def stored_key(self, key: str) -> str:
        """The array that holds `key` (itself, or the key it is an alias of)."""
        return self.aliases.get(key, key)

    @property
    def array_keys(self) -> list[str]:
        return [*self.acts_keys, *TOKEN_ARRAYS]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"], d["sites"] = list(self.layers), list(self.sites)
        # Absent when unused: a format-2 spec serialises (and so digests: store id, genesis) as it did.
        if not self.aliases:
            del d["aliases"]
        if self.keep_bits is None:
            del d["keep_bits"]
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoreSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def diff(self, other: StoreSpec) -> list[str]:
        """Names of the fields that differ, each with both values (a field only one side records included)."""
        a, b = self.to_json(), other.to_json()
        out = []
        for k in dict.fromkeys([*a, *b]):
            va, vb = a.get(k), b.get(k)
            if va == vb:
                continue
            if k == "aliases":  # format 3 stores equal sites once: say so rather than list 29 pairs
                out.append(
                    f"equal sites stored once: {len(va or {})} != {len(vb or {})} aliases (format 2 vs 3)"
                )
            elif isinstance(va, dict) and isinstance(vb, dict):  # harvest_config: only the keys that differ
                keys = sorted(set(va) | set(vb))
                out += [
                    f"{k}.{sub}: {va.get(sub)!r} != {vb.get(sub)!r}"
                    for sub in keys
                    if va.get(sub) != vb.get(sub)
                ]
            else:
                out.append(f"{k}: {va!r} != {vb!r}")
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
    if spec.keep_bits is not None:  # measured on SmolLM2 (docs/benchmarks.md, "Lossy mode")
        ratio = min(ratio, KEEP_BITS_RATIO.get(spec.keep_bits, ratio))
    acts = spec.tokens_target * spec.d_model * itemsize * len(spec.acts_keys) * ratio
    # Per-token arrays: 17 raw bytes per token, which compress to well under half.
    per_token = spec.tokens_target * sum(d.itemsize for d in TOKEN_ARRAYS.values()) * 0.5
    # crc32c (4 B) per inner chunk + 16 B index entry per chunk; metadata files.
    n_chunks = math.ceil(spec.tokens_target / spec.chunk_tokens) * len(spec.array_keys)
    return int(acts * 1.02 + per_token + n_chunks * 20 + 4096 * (len(spec.array_keys) + 4))
