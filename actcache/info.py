"""The table of `actcache info`: one row per array of a store (aliases, sizes, statistics, rounding error)."""

from __future__ import annotations

import numpy as np

from actcache.spec import TOKEN_ARRAYS, acts_key
from actcache.view import Store


def size_text(n: float) -> str:
    """Bytes in B / KiB / MiB / GiB / TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:,.1f} TiB"


def rounding_per_variance(st: Store, key: str) -> float | None:
    """Lossy mode: the squared rounding error over the data's variance (the fraction of variance the rounding
    alone loses, all committed rows), from the commit record; None for a lossless store."""
    sums = st.rounding.get(st.spec.stored_key(key))
    if st.spec.keep_bits is None or not sums:
        return None
    return sums[0] / sums[2] if sums[2] > 0 else float("nan")


def info_rows(st: Store) -> list[dict[str, str]]:
    """Every array of the store in rows of text, then a total; an alias row names the array that holds it (the
    raw size of its rows counts in the total, its stored bytes are those of that array, counted once)."""
    spec, n = st.spec, st.committed_tokens
    lossy = spec.keep_bits is not None
    out: list[dict[str, str]] = []
    total_stored = total_raw = 0
    keys = [(acts_key(layer, site), (layer, site)) for layer, site in st.keys]
    for key, layer_site in [*keys, *((k, None) for k in TOKEN_ARRAYS)]:
        itemsize = st.array(key).dtype.itemsize
        width = spec.d_model if layer_site else 1
        alias = spec.aliases.get(key)
        raw, stored = n * width * itemsize, 0 if alias else st.stored_bytes(key)
        total_raw, total_stored = total_raw + raw, total_stored + stored
        row = {
            "array": key + (f" = {alias}" if alias else ""),
            "shape": f"{n:,} x {width}" if layer_site else f"{n:,}",
            "dtype": spec.dtype if layer_site else str(TOKEN_ARRAYS[key]),
            "stored": "(alias)" if alias else size_text(stored),
            "ratio": "-" if alias or not raw else f"{stored / raw:.3f}",
            "mean ||x||^2": "",
            "|mean|": "",
            "stats count": "",
        }
        if layer_site:
            s = st.running_stats(*layer_site)
            if s.count:
                row["mean ||x||^2"] = f"{s.mean_sq_norm:.4g}"
                row["|mean|"] = f"{float(np.linalg.norm(s.mean)):.4g}"
                row["stats count"] = f"{s.count:,}"
        if lossy:
            err = rounding_per_variance(st, key) if layer_site else None
            row["rounding err / var"] = "" if err is None else f"{err:.2e}"
        out.append(row)
    total = dict.fromkeys(out[0], "")
    total.update(
        array="total", stored=size_text(total_stored), ratio=f"{total_stored / max(total_raw, 1):.3f}"
    )
    return [*out, total]
