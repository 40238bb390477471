"""The store's opt-in lossy mode: activations rounded to fewer mantissa bits before compression
(`StoreSpec.keep_bits`, `actcache harvest --keep-bits N`; docs/store-format.md, "Lossy mode").

Rounding is round-to-nearest-even on the stored bit pattern (bf16 as uint16, fp16, fp32), so the rounded values
are ordinary values of the stored dtype: every reader decodes them as it decodes a lossless store. The cleared
low mantissa bits are constant zeros after the byte shuffle, which zstd stores in almost nothing (on SmolLM2
bf16 activations, keep 2 bits: 0.39 of raw bf16 against 0.70 lossless; docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np

from actcache.codecs import STORED_DTYPE

MANTISSA_BITS = {"bfloat16": 7, "float16": 10, "float32": 23}
"""Explicit mantissa bits of each stored dtype."""
_UINT = {2: np.uint16, 4: np.uint32}

DEFAULT_KEEP_BITS = 2
"""The recommended lossy setting (docs/benchmarks.md, "Lossy mode")."""
KEEP_BITS_RATIO = {7: 0.70, 4: 0.52, 3: 0.46, 2: 0.40, 1: 0.36, 0: 0.29}
"""Measured stored / raw bf16 size with blosc-zstd1-shuffle on SmolLM2 (plan_bytes's estimate)."""


def round_mantissa(stored: np.ndarray, dtype: str, keep_bits: int) -> np.ndarray:
    """`stored` (the stored dtype's array: bf16 as uint16 bits) with all but `keep_bits` mantissa bits rounded
    away, round-to-nearest-even (a carry into the exponent is the correct rounding), except that a finite value
    never becomes Inf (the largest ones are rounded down). Inf stays Inf, NaN stays the same NaN."""
    drop = MANTISSA_BITS[dtype] - keep_bits
    if drop <= 0:
        return stored
    uint = _UINT[STORED_DTYPE[dtype].itemsize]
    bits = np.ascontiguousarray(stored).view(uint)
    # In the stored width (the sum wraps only for NaN patterns, restored below): bits + (half - 1) + odd.
    out = (bits >> uint(drop)) & uint(1)
    out += bits
    out += uint((1 << (drop - 1)) - 1)
    out &= uint(~((1 << drop) - 1) & np.iinfo(uint).max)
    sign_off = uint(np.iinfo(uint).max >> 1)
    inf = uint(_exponent_mask(dtype))
    # Rare: a NaN (whose sum may have wrapped) stays as it was; a finite value that rounded up to Inf is rounded
    # down instead (the largest value with `keep_bits` bits), so that a store never holds an Inf the model did not.
    special = ((bits & sign_off) > inf) | ((out & sign_off) >= inf)
    if special.any():
        was = bits[special]
        out[special] = np.where(
            (was & sign_off) >= inf, was, was & uint(~((1 << drop) - 1) & np.iinfo(uint).max)
        )
    return out.view(stored.dtype)


def _exponent_mask(dtype: str) -> int:
    size = STORED_DTYPE[dtype].itemsize * 8
    return ((1 << (size - 1 - MANTISSA_BITS[dtype])) - 1) << MANTISSA_BITS[dtype]


def as_float32(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored array -> float32 (bit-exact for bf16 and fp16)."""
    if dtype == "bfloat16":
        return (np.ascontiguousarray(stored).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


ERROR_ROW_STRIDE = 8
"""The rounding error is measured on every 8th row (of those `keep` selects): an estimate from ~1000 rows per
shard at an eighth of the cost of all rows (which cost more CPU than the compression itself)."""


def rounding_error(
    original: np.ndarray, rounded: np.ndarray, dtype: str, keep: np.ndarray | None = None
) -> tuple[float, float, float]:
    """(sum of squared errors, sum of squared values, sum of squared deviations from the rows' mean) of a
    rounding over every ERROR_ROW_STRIDE-th row of those `keep` selects (the harvest passes "neither BOS nor
    padding": BOS rows hold massive activations that would swamp the variance), in float64. Summed over shards,
    the first over the second is the relative error, over the third the error per variance (the fraction of
    variance the rounding alone loses; actcache info shows it)."""
    rows = np.arange(len(original)) if keep is None else np.flatnonzero(keep)
    rows = rows[::ERROR_ROW_STRIDE]
    a = as_float32(original[rows], dtype).astype(np.float64)
    d = as_float32(rounded[rows], dtype) - a
    mean = a.mean(axis=0) if len(a) else np.zeros(a.shape[1])
    sq = float(np.einsum("ij,ij->", a, a))
    return float(np.einsum("ij,ij->", d, d)), sq, sq - len(a) * float(mean @ mean)
