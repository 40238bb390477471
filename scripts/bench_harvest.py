"""Harvest throughput against a plain forward pass of the same model over the same tokens, and stored bytes.

Default: the embedded SmolLM2-135M on the embedded corpus, 8192 tokens (32 windows of 256), all 30 layers x
4 sites in bf16. The plain forward and the harvest alternate (``--repeats`` rounds) in one process, so load
from other jobs hits both alike; each is reported as wall-clock tokens/s and tokens per process-CPU-second
(all threads, the writers' included). "tail": the wait after the last forward batch for the last shard's
compression, writes and commit (nothing overlaps it; in a one-shard run that is the whole compression).

    python scripts/bench_harvest.py [--tokens 8192] [--context 256] [--batch-size 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from actcache.harvest import HarvestConfig, plan_harvest, run_harvest
from actcache.models import load_model
from actcache.pipeline import Pipeline
from actcache.store import Store


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layers", default="all")
    ap.add_argument("--sites", default="resid_pre,resid_post,mlp_out,attn_out")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--shard-tokens", type=int, default=None, help="default: the store's plan")
    ap.add_argument("--out", default=None, help="store folder (default: a temporary folder, removed)")
    args = ap.parse_args()

    cfg = HarvestConfig(
        model=args.model, layers=args.layers, sites=args.sites, tokens=args.tokens, context=args.context,
        dtype=args.dtype, batch_size=args.batch_size, device="cpu", shard_tokens=args.shard_tokens,
    )  # fmt: skip
    plan = plan_harvest(cfg)
    spec = plan.spec
    print(f"plan: {plan.n_windows} windows x {args.context} = {spec.tokens_target} tokens, "
          f"{len(spec.acts_keys)} arrays, shard {spec.shard_tokens}, chunk {spec.chunk_tokens}, codec {spec.codec}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    t = time.perf_counter()
    model = load_model(plan.source, "cpu", torch.float32)
    print(f"model loaded in {time.perf_counter() - t:.1f} s")

    from actcache.harvest import _windows_from

    ids = np.stack([w.token_ids_C for w in _windows_from(plan, 0)]).astype(np.int64)
    batches = [torch.from_numpy(ids[i : i + args.batch_size]) for i in range(0, len(ids), args.batch_size)]

    def plain_forward() -> None:
        with torch.inference_mode():
            for ids_BC in batches:
                model(input_ids=ids_BC, use_cache=False)

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_harvest_"))
    store_path = root / "store"

    tails: list[float] = []
    close = Pipeline.close

    def timed_close(self: Pipeline) -> None:  # the wait after the forward: the last shard's writes and commit
        t0 = time.perf_counter()
        close(self)
        tails.append(time.perf_counter() - t0)

    Pipeline.close = timed_close

    def harvest() -> None:
        shutil.rmtree(store_path, ignore_errors=True)
        run_harvest(plan, store_path, model=model, workers=args.workers)

    plain_forward()  # warm-up (allocator, oneDNN kernels)
    rows = {"forward": [], "harvest": []}
    for r in range(args.repeats):
        for name, fn in (("forward", plain_forward), ("harvest", harvest)):
            wall, cpu = _timed(fn)
            rows[name].append((wall, cpu))
            tail = f", tail after the forward {tails[-1]:.2f} s" if name == "harvest" else ""
            print(f"round {r}: {name:8s} {wall:7.1f} s wall, {cpu:7.1f} CPU-s, "
                  f"{spec.tokens_target / wall:7.1f} tok/s, {spec.tokens_target / cpu:7.1f} tok/CPU-s{tail}")  # fmt: skip

    n = spec.tokens_target
    fw = statistics.median(n / w for w, _ in rows["forward"])
    hv = statistics.median(n / w for w, _ in rows["harvest"])
    fc = statistics.median(n / c for _, c in rows["forward"])
    hc = statistics.median(n / c for _, c in rows["harvest"])
    print(f"\nmedian tokens/s: forward {fw:.1f}, harvest {hv:.1f}, ratio {hv / fw:.3f}")
    print(f"median tokens/CPU-s: forward {fc:.1f}, harvest {hc:.1f}, ratio {hc / fc:.3f}")

    store = Store.open(store_path)
    d = spec.d_model
    print(f"\nbytes per token per array (d_model {d}; raw bf16 {2 * d}, raw fp32 {4 * d}):")
    print("| site | stored bytes/token (mean over layers) | vs raw bf16 | vs raw fp32 |")
    print("| --- | --- | --- | --- |")
    for site in spec.sites:  # the arrays on disk (an alias of resid_post L has none: stored once)
        stored = [f"acts/{site}/{layer}" for layer in spec.layers if f"acts/{site}/{layer}" in spec.acts_keys]
        per_layer = [store.stored_bytes(key) / n for key in stored]
        b = float(np.mean(per_layer))
        print(f"| {site} | {b:.0f} (min {min(per_layer):.0f}, max {max(per_layer):.0f}) "
              f"| {b / (2 * d):.3f} | {b / (4 * d):.3f} |")  # fmt: skip
    total = sum(store.stored_bytes(k) for k in spec.array_keys)
    print(f"whole store: {total / n:.0f} bytes/token ({total / 1e6:.1f} MB for {n} tokens), {len(spec.acts_keys)} "
          f"activation arrays for {len(spec.grid_keys)} (layer, site) keys ({len(spec.aliases)} equal keys stored once)")  # fmt: skip
    if not args.out:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
