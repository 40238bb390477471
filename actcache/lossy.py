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
_WIDE = {2: np.uint32, 4: np.uint64}

DEFAULT_KEEP_BITS = 2
"""The recommended lossy setting (docs/benchmarks.md, "Lossy mode")."""
KEEP_BITS_RATIO = {7: 0.70, 4: 0.52, 3: 0.46, 2: 0.40, 1: 0.36, 0: 0.29}
"""Measured stored / raw bf16 size with blosc-zstd1-shuffle on SmolLM2 (plan_bytes's estimate)."""


def round_mantissa(stored: np.ndarray, dtype: str, keep_bits: int) -> np.ndarray:
    """`stored` (the stored dtype's array: bf16 as uint16 bits) with all but `keep_bits` mantissa bits rounded
    away, round-to-nearest-even (a carry into the exponent is the correct rounding). NaN/Inf stay NaN/Inf."""
    drop = MANTISSA_BITS[dtype] - keep_bits
    if drop <= 0:
        return stored
    size = STORED_DTYPE[dtype].itemsize
    bits = np.ascontiguousarray(stored).view(_UINT[size])
    wide = bits.astype(_WIDE[size])
    odd = (wide >> drop) & 1
    rounded = ((wide + ((1 << (drop - 1)) - 1) + odd) >> drop) << drop
    out = rounded.astype(_UINT[size])
    exp_mask = _exponent_mask(dtype)
    special = (bits & exp_mask) == exp_mask  # NaN / Inf: keep as they are (the harvest refuses them anyway)
    if special.any():
        out[special] = bits[special]
    return out.view(stored.dtype)


def _exponent_mask(dtype: str) -> int:
    size = STORED_DTYPE[dtype].itemsize * 8
    return ((1 << (size - 1 - MANTISSA_BITS[dtype])) - 1) << MANTISSA_BITS[dtype]


def as_float32(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored array -> float32 (bit-exact for bf16 and fp16)."""
    if dtype == "bfloat16":
        return (np.ascontiguousarray(stored).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


def rounding_error(
    original: np.ndarray, rounded: np.ndarray, dtype: str, keep: np.ndarray | None = None
) -> tuple[float, float, float]:
    """(sum of squared errors, sum of squared values, sum of squared deviations from the rows' mean) of a
    rounding over the rows `keep` selects (the harvest passes "neither BOS nor padding": BOS rows hold massive
    activations that would swamp the variance), in float64. Summed over shards, the first over the second is the
    relative error, over the third the error per variance (the FVU the rounding alone costs; actcache info)."""
    a = as_float32(original, dtype)
    d = as_float32(rounded, dtype) - a
    if keep is not None:
        a, d = a[keep], d[keep]
    sq_err = float(np.einsum("ij,ij->", d, d, dtype=np.float64))
    sq = float(np.einsum("ij,ij->", a, a, dtype=np.float64))
    mean = a.mean(axis=0, dtype=np.float64) if len(a) else np.zeros(a.shape[1])
    return sq_err, sq, sq - len(a) * float(mean @ mean)
