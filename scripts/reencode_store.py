"""Re-encode some (layer, site) arrays of a store into a new store with the same tokens and layout, optionally in
the lossy mode (--keep-bits N): a lossy store without running the model again (docs/benchmarks.md, "Lossy mode").

The new store has the source's spec (model, corpus, windows, chunk and shard sizes, codec, harvest config) cut to
the chosen layers and sites, its per-token arrays are copied, its statistics are those of the values it stores
(BOS and padding excluded, like the harvest's), and its commit record holds the rounding error (lossy mode). The
source is only read. `actcache harvest --keep-bits N` writes the same bytes from the model.

Usage: python scripts/reencode_store.py SRC OUT --layers 15 --sites resid_post [--keep-bits 2] [--overwrite]
"""

from __future__ import annotations

import argparse
import math
import sys

from actcache.lossy import as_float32, round_mantissa
from actcache.spec import FLAG_BOS, FLAG_PAD, TOKEN_ARRAYS, StoreSpec, acts_key
from actcache.stats import RunningStats
from actcache.store import Store, StoreWriter


def reencode(
    src: Store, out: str, layers: list[int], sites: list[str], keep_bits: int | None, overwrite: bool
) -> Store:
    """The new store (see the module docstring)."""
    grid = {acts_key(layer, site) for layer in layers for site in sites}
    aliases = {a: t for a, t in src.spec.aliases.items() if a in grid and t in grid}  # equal sites: once
    spec = src.spec.to_json() | {"layers": layers, "sites": sites, "aliases": aliases, "keep_bits": keep_bits}
    spec["harvest_config"] = spec["harvest_config"] | {"reencoded_from": src.store_id}
    new = StoreSpec.from_json(spec)
    writer = StoreWriter.create_or_resume(out, new, overwrite=overwrite)
    n, step = src.committed_tokens, new.shard_tokens
    try:
        for shard in range(writer.committed_tokens // step, math.ceil(n / step)):
            start, stop = shard * step, min(n, (shard + 1) * step)
            arrays = {name: src.read(name, start, stop) for name in TOKEN_ARRAYS}
            keep = (arrays["flags"] & (FLAG_BOS | FLAG_PAD)) == 0
            stats = {}
            for key in new.acts_keys:
                arrays[key] = src.read_raw(key, start, stop)
                # Statistics of what the writer stores: the values rounded as it rounds them.
                stored = (
                    arrays[key] if keep_bits is None else round_mantissa(arrays[key], new.dtype, keep_bits)
                )
                stats[key] = RunningStats(new.d_model).update(as_float32(stored, new.dtype), keep)
            writer.write_shard(start, arrays, keep)
            writer.commit(stop, stats)
            print(f"  shard {shard}: rows {start}..{stop}", file=sys.stderr, flush=True)
        writer.finish()
    finally:
        writer.close()
    return Store.open(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--layers", default="15")
    ap.add_argument("--sites", default="resid_post")
    ap.add_argument("--keep-bits", type=int, default=None)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    src = Store.open(args.src)
    layers = [int(x) for x in args.layers.split(",")]
    store = reencode(src, args.out, layers, args.sites.split(","), args.keep_bits, args.overwrite)
    keys = store.spec.acts_keys
    raw = store.committed_tokens * store.spec.d_model * 2 * len(keys)
    stored = sum(store.stored_bytes(k) for k in keys)
    print(f"{args.out}: {store.committed_tokens} tokens, {len(keys)} arrays, {stored / raw:.3f} of raw bf16")
    for key, sums in store.rounding.items():
        print(f"  {key}: rounding error / variance {sums[0] / sums[2]:.3e}, relative {sums[0] / sums[1]:.3e}")


if __name__ == "__main__":
    main()
