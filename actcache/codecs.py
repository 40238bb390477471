"""Codec pipelines of the store's arrays, and the lossless bf16 <-> uint16 mapping.

zarr v3 has no bfloat16 data type, so bf16 activations are stored as their uint16 bit pattern and the store's
metadata records dtype "bfloat16"; `to_stored` / `from_stored` convert bit-exactly. Every inner chunk of every
shard ends in a crc32c checksum (the `crc32c` codec is the last codec of the chunk pipeline).

The candidate pipelines below were measured on real SmolLM2-135M bf16 activations by
scripts/bench_codecs.py (docs/benchmarks.md, "Store codecs"); DEFAULT_CODEC is the one chosen there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

# Stored numpy dtype per logical activation dtype (bf16 -> its bit pattern).
STORED_DTYPE = {
    "bfloat16": np.dtype(np.uint16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}
DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
}


def canonical_dtype(dtype: str) -> str:
    """'bf16' -> 'bfloat16' etc.; raises ValueError naming the choices."""
    name = DTYPE_ALIASES.get(str(dtype).removeprefix("torch."), str(dtype).removeprefix("torch."))
    if name not in STORED_DTYPE:
        raise ValueError(f"unknown activation dtype {dtype!r}; choose one of bfloat16, float16, float32")
    return name


@dataclass(frozen=True)
class Codec:
    """One named compression pipeline for the activation arrays (bytes -> bytes codecs before the crc32c)."""

    name: str
    """Registry key, recorded in StoreSpec.codec."""
    make: Callable[[int, int], list[Any]]
    """(itemsize, chunk bytes) -> the zarr bytes-to-bytes codecs (without the checksum)."""
    bf16_ratio: float
    """Measured stored/raw size on SmolLM2 bf16 activations (plan_bytes uses it; 1.0 when unmeasured)."""

    def chunk_codecs(self, itemsize: int, chunk_bytes: int) -> list[Any]:
        """The inner-chunk bytes->bytes pipeline: compressor(s) then crc32c (a checksum on every chunk)."""
        return [*self.make(itemsize, chunk_bytes), Crc32cCodec()]


def _blosc(
    cname: str, clevel: int, shuffle: str, whole_chunk: bool = True
) -> Callable[[int, int], list[Any]]:
    # Blosc's automatic block size is small (tens of KiB at low clevels); zstd then restarts its statistics
    # every block and the byte-shuffled exponent plane of bf16 compresses far worse (ratio 0.79 vs 0.70 on
    # SmolLM2, docs/benchmarks.md). One block per chunk keeps blosc's shuffle and gives zstd the whole plane.
    def make(itemsize: int, chunk_bytes: int) -> list[Any]:
        blocksize = chunk_bytes if whole_chunk else 0
        return [
            BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle, typesize=itemsize, blocksize=blocksize)
        ]

    return make


def _shuffle_zstd(level: int) -> Callable[[int, int], list[Any]]:
    def make(itemsize: int, chunk_bytes: int) -> list[Any]:
        from zarr.codecs.numcodecs import Shuffle  # zarr >= 3.1.3; not in the zarr v3 core spec

        return [Shuffle(elementsize=itemsize), ZstdCodec(level=level)]

    return make


def _zstd(level: int) -> Callable[[int, int], list[Any]]:
    return lambda itemsize, chunk_bytes: [ZstdCodec(level=level)]


CODECS: dict[str, Codec] = {
    c.name: c
    for c in [
        Codec("none", lambda itemsize, chunk_bytes: [], 1.0),
        Codec("zstd-1", _zstd(1), 0.79),
        Codec("zstd-3", _zstd(3), 0.79),
        Codec("zstd-9", _zstd(9), 0.79),
        Codec("blosc-lz4-shuffle", _blosc("lz4", 5, "shuffle"), 0.92),
        Codec("blosc-lz4-bitshuffle", _blosc("lz4", 5, "bitshuffle"), 0.84),
        Codec("blosc-zstd1-shuffle", _blosc("zstd", 1, "shuffle"), 0.70),
        Codec("blosc-zstd3-shuffle", _blosc("zstd", 3, "shuffle"), 0.71),
        Codec("blosc-zstd1-bitshuffle", _blosc("zstd", 1, "bitshuffle"), 0.78),
        Codec("blosc-zstd1-shuffle-autoblock", _blosc("zstd", 1, "shuffle", whole_chunk=False), 0.79),
        Codec("blosc-zstd3-shuffle-autoblock", _blosc("zstd", 3, "shuffle", whole_chunk=False), 0.76),
        Codec("shuffle-zstd1", _shuffle_zstd(1), 0.70),
    ]
}
DEFAULT_CODEC = "blosc-zstd1-shuffle"

# The small per-token arrays (token_ids, doc_ids, positions, flags) always use this pipeline: byte-shuffled
# zstd turns slowly varying integers (positions, doc ids) into long runs.
META_CODEC = "blosc-zstd3-shuffle"


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")
    return CODECS[name]


def to_stored(x: Any, dtype: str) -> np.ndarray:
    """Activations (torch tensor of any float dtype, or numpy) -> the stored numpy array, bit-exact for bf16.

    numpy uint16 input to a bfloat16 store is taken as the bf16 bit pattern already.
    """
    dtype = canonical_dtype(dtype)
    stored = STORED_DTYPE[dtype]
    if hasattr(x, "detach"):  # torch.Tensor
        import torch

        t = x.detach().cpu()
        if dtype == "bfloat16":
            return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        return t.to(getattr(torch, dtype)).contiguous().numpy()
    arr = np.asarray(x)
    if dtype == "bfloat16":
        if arr.dtype == np.uint16:
            return np.ascontiguousarray(arr)
        import torch

        return to_stored(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), dtype)
    return np.ascontiguousarray(arr, dtype=stored)


def from_stored(raw: np.ndarray, dtype: str, out: Any = None) -> Any:
    """Stored numpy array -> torch tensor of `out` dtype (default: the logical dtype), bit-exact."""
    import torch

    dtype = canonical_dtype(dtype)
    if dtype == "bfloat16":
        t = torch.from_numpy(np.ascontiguousarray(raw).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(raw))
    return t if out is None or t.dtype == out else t.to(out)


def crc32c_matches(payload: Any, stored: Any) -> bool:
    """Whether 4 stored bytes are the little-endian crc32c of payload (both bytes-like / uint8 arrays)."""
    import google_crc32c

    payload = np.frombuffer(payload, dtype=np.uint8) if not isinstance(payload, np.ndarray) else payload
    return np.uint32(google_crc32c.value(payload)).astype("<u4").tobytes() == bytes(stored)


class ChecksumError(ValueError):
    """A stored chunk's crc32c does not match its bytes."""


class ChunkDecoder:
    """Decodes one stored inner chunk of a sharded array straight from its bytes, without zarr's machinery.

    zarr's generic read path costs ~1 ms of CPU and several thread hops per chunk, more than the decompression
    itself (docs/benchmarks.md, "Reader"); the reader decodes chunks in its own threads with this instead.
    Built from the array's zarr.json sharding configuration; raises NotImplementedError for a pipeline it does
    not know (the caller then falls back to zarr).
    """

    def __init__(self, array_meta: dict[str, Any]) -> None:
        import numcodecs

        (sharding,) = array_meta["codecs"]
        if sharding["name"] != "sharding_indexed":
            raise NotImplementedError(sharding["name"])
        conf = sharding["configuration"]
        self.chunk_shape = tuple(conf["chunk_shape"])
        self.dtype = np.dtype(array_meta["data_type"]).newbyteorder("<")
        self.steps: list[Any] = []  # bytes->bytes codecs in encode order; "crc32c" marks a checksum
        for codec in conf["codecs"]:
            name, cfg = codec["name"], codec.get("configuration", {})
            if name == "bytes":
                if cfg.get("endian", "little") != "little" and self.dtype.itemsize > 1:
                    raise NotImplementedError("big-endian chunks")
            elif name == "crc32c":
                self.steps.append("crc32c")
            elif name == "blosc":
                self.steps.append(numcodecs.Blosc())  # blosc frames describe themselves
            elif name == "zstd":
                self.steps.append(numcodecs.Zstd())
            elif name == "numcodecs.shuffle":
                self.steps.append(numcodecs.Shuffle(elementsize=cfg["elementsize"]))
            else:
                raise NotImplementedError(name)

    def decode(self, data: bytes) -> np.ndarray:
        """Stored chunk bytes -> the chunk array (chunk_shape, stored dtype); ChecksumError on a bad crc32c."""
        buf: Any = data
        for step in reversed(self.steps):
            if step == "crc32c":
                u8 = np.frombuffer(buf, dtype=np.uint8)
                if not crc32c_matches(u8[:-4], u8[-4:]):
                    raise ChecksumError("chunk checksum (crc32c) mismatch")
                buf = u8[:-4]
            else:
                buf = step.decode(buf)
        return np.frombuffer(buf, dtype=self.dtype).reshape(self.chunk_shape)
