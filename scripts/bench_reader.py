"""Reader throughput (docs/benchmarks.md, "Reader"): decoded GB/s and shuffled tokens/s on `threads` cores.

Builds a ~500k-token, d 576, bf16 store with the default codec in /tmp. Rows are the real SmolLM2-135M
residual-stream rows cached by scripts/bench_codecs.py (tiled), so that chunks decode at the real compression
ratio; without that cache, N(0, 1) rows are used (and said so).

Usage: python scripts/bench_reader.py [--tokens 491520] [--threads 2] [--batch 4096] [--mix-chunks 64]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from actcache.codecs import DEFAULT_CODEC
from actcache.reader import ActivationReader
from actcache.store import FLAG_BOS, Store, StoreSpec, StoreWriter, plan_chunks

CACHE = Path("/tmp/actcache_bench/smollm2_acts_bf16.npz")
KEY = (0, "resid_post")


def build_store(path: Path, tokens: int, d_model: int, context: int) -> tuple[Store, str]:
    rows_source = "N(0,1) rows"
    real = None
    if CACHE.exists():
        acts = np.load(CACHE)["acts"]  # [layers, tokens, 576] bf16 bits
        real = acts.reshape(-1, acts.shape[-1])
        d_model = real.shape[1]
        rows_source = f"real SmolLM2-135M resid_post rows ({len(real):,} distinct, tiled)"
    chunk, shard = plan_chunks(d_model, context, "bfloat16", 1)
    spec = StoreSpec(
        model="bench", revision=None, dtype="bfloat16", layers=(0,), sites=("resid_post",), d_model=d_model,
        context=context, corpus="bench", tokenizer="bench", tokens_target=tokens, chunk_tokens=chunk,
        shard_tokens=shard, codec=DEFAULT_CODEC, harvest_config={"rows": rows_source},
    )  # fmt: skip
    if path.exists():
        try:
            store = Store.open(path)
            if store.spec == spec and store.committed_tokens == tokens:
                return store, rows_source
        except Exception:
            pass
    writer = StoreWriter.create_or_resume(path, spec, overwrite=True)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, tokens, shard):
        n = min(shard, tokens - start)
        if real is not None:
            x = real[np.arange(start, start + n) % len(real)]
        else:
            x = torch.randn(n, d_model, generator=gen).to(torch.bfloat16)
        pos = np.arange(start, start + n) % context
        z = np.zeros(n, np.int32)
        writer.write_shard(
            start,
            {
                "acts/resid_post/0": x,
                "token_ids": z,
                "doc_ids": z,
                "positions": pos,
                "flags": (pos == 0) * FLAG_BOS,
            },
        )
    writer.commit(tokens, {})
    writer.finish()
    return Store.open(path), rows_source


def decode_gbs(store: Store, threads: int, fast: bool) -> tuple[float, float]:
    """Read every chunk of the key once with `threads` workers: (decoded GB/s wall, decoded GB per CPU-second).

    fast: Store.read_chunk (the reader's path); else zarr's generic read of the same rows.
    """
    ct, n = store.spec.chunk_tokens, store.committed_tokens
    key = "acts/resid_post/0"

    def read(c: int) -> int:
        if fast:
            return store.read_chunk(key, c).nbytes
        return store.read_raw(key, c * ct, min(n, c * ct + ct)).nbytes

    t0, c0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, range(-(-n // ct))))
    return total / (time.perf_counter() - t0) / 1e9, total / (time.process_time() - c0) / 1e9


def shuffled_rate(
    store: Store, threads: int, batch: int, mix_chunks: int, step_s: float
) -> tuple[float, ...]:
    """One epoch of shuffled batches with a fake train step: (tokens/s, tokens per CPU-s, wait fraction, tokens)."""
    reader = ActivationReader(store, [KEY], batch, threads=threads, mix_chunks=mix_chunks, loop=False, seed=0)
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for b in reader:
        n += len(b.index)
        if step_s:
            time.sleep(step_s)  # a GPU step: the consumer thread idles, as it would in cuda synchronize
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n / wall, n / cpu, reader.wait_seconds / wall, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=491_520)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--mix-chunks", type=int, default=64)
    ap.add_argument("--path", default="/tmp/actcache_bench/reader_store")
    args = ap.parse_args()
    torch.set_num_threads(1)  # intra-op threads spin against the reader threads on 2 cores
    store, rows = build_store(Path(args.path), args.tokens, 576, args.context)
    spec = store.spec
    cpu = subprocess.run(
        "lscpu | grep 'Model name'", shell=True, capture_output=True, text=True
    ).stdout.split(":")[-1]
    load = open("/proc/loadavg").read().split()[0]
    stored = store.stored_bytes("acts/resid_post/0")
    raw = spec.tokens_target * spec.d_model * 2
    print(
        f"# {spec.tokens_target:,} tokens x d {spec.d_model} bf16, {rows}, codec {spec.codec} (ratio {stored / raw:.3f})"
    )
    print(
        f"# chunk {spec.chunk_tokens} tokens, threads {args.threads}, batch {args.batch}, mix_chunks {args.mix_chunks}"
    )
    print(f"# machine: {platform.machine()} {cpu.strip()}, load average at start {load}")
    for fast in (True, False, True, False):
        wall, per_cpu = decode_gbs(store, args.threads, fast)
        path = "Store.read_chunk (reader path)" if fast else "zarr Array[...] (generic path)"
        print(f"decode {path}, {args.threads} threads: {wall:.2f} GB/s wall, {per_cpu:.2f} GB per CPU-second")
    for step_s in (0.0, 0.0, 0.01):
        rate, per_cpu, wait, n = shuffled_rate(store, args.threads, args.batch, args.mix_chunks, step_s)
        label = "no consumer work" if not step_s else f"consumer step {step_s * 1e3:.0f} ms/batch"
        print(
            f"shuffled epoch ({label}): {n:,} tokens, {rate:,.0f} tokens/s wall, {per_cpu:,.0f} tokens per "
            f"CPU-second, consumer waiting {wait:.0%} of the time"
        )


if __name__ == "__main__":
    main()
