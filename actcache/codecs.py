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
    make: Callable[[int], list[Any]]
    """itemsize -> the zarr bytes-to-bytes codecs (without the checksum)."""
    bf16_ratio: float
    """Measured stored/raw size on SmolLM2 bf16 activations (plan_bytes uses it; 1.0 when unmeasured)."""

    def chunk_codecs(self, itemsize: int) -> list[Any]:
        """The inner-chunk bytes->bytes pipeline: compressor(s) then crc32c (a checksum on every chunk)."""
        return [*self.make(itemsize), Crc32cCodec()]


def _blosc(cname: str, clevel: int, shuffle: str) -> Callable[[int], list[Any]]:
    return lambda itemsize: [BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle, typesize=itemsize)]


def _shuffle_zstd(level: int) -> Callable[[int], list[Any]]:
    def make(itemsize: int) -> list[Any]:
        from zarr.codecs.numcodecs import Shuffle  # zarr >= 3.1.3

        return [Shuffle(elementsize=itemsize), ZstdCodec(level=level)]

    return make


CODECS: dict[str, Codec] = {
    c.name: c
    for c in [
        Codec("none", lambda itemsize: [], 1.0),
        Codec("zstd-1", lambda itemsize: [ZstdCodec(level=1)], 1.0),
        Codec("zstd-3", lambda itemsize: [ZstdCodec(level=3)], 1.0),
        Codec("zstd-9", lambda itemsize: [ZstdCodec(level=9)], 1.0),
        Codec("blosc-lz4-shuffle", _blosc("lz4", 5, "shuffle"), 1.0),
        Codec("blosc-lz4-bitshuffle", _blosc("lz4", 5, "bitshuffle"), 1.0),
        Codec("blosc-zstd1-shuffle", _blosc("zstd", 1, "shuffle"), 1.0),
        Codec("blosc-zstd3-shuffle", _blosc("zstd", 3, "shuffle"), 1.0),
        Codec("blosc-zstd1-bitshuffle", _blosc("zstd", 1, "bitshuffle"), 1.0),
        Codec("blosc-zstd3-bitshuffle", _blosc("zstd", 3, "bitshuffle"), 1.0),
        Codec("shuffle-zstd1", _shuffle_zstd(1), 1.0),
        Codec("shuffle-zstd3", _shuffle_zstd(3), 1.0),
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
