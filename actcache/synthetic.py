"""`make_synthetic_store`: a store of random activations, for tests and benchmarks (no model needed)."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from actcache.codecs import from_stored, to_stored
from actcache.spec import FLAG_BOS, StoreSpec, parse_acts_key, plan_chunks
from actcache.stats import RunningStats
from actcache.view import Store
from actcache.writer import StoreWriter


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
    scale: float = 1.0,
) -> Store:
    """A store of random activations, for tests and benchmarks (no model needed).

    Window w occupies rows [w*context, (w+1)*context); its first token is BOS (flag bit 0), doc_ids = w,
    positions = 0..context-1, token_ids random. Rows are `scale` * N(0, 1) + a per-layer offset.
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
            x_ND = scale * torch.randn(n, d_model, generator=gen) + 0.1 * layer
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
