"""`sae inspect`'s pass against `sae eval`'s reconstruction pass on the same tokens, interleaved in one process
(the machine may be shared: the ratio of medians is the figure, not the wall times).

    python scripts/bench_inspect.py --run runs/demo-jumprelu --store stores/demo [--reps 3]

Ranges: the run's held-out range and the whole store. The eval pass is `sae eval`'s loop (sae_cli/evaluate.py):
the store-order reader without BOS, encode, decode, ReconstructionMetrics; the inspect pass is
sae_cli/inspect/scan.py's `scan` (encode, the per-latent statistics and top-N / sample buffers)."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from actcache.store import Store
from sae_cli import io
from sae_cli.data import eval_batches
from sae_cli.evaluate import held_out_range
from sae_cli.inspect.scan import ScanConfig, scan
from sae_cli.metrics import ReconstructionMetrics


def eval_pass(store: Store, sae, key, rng, batch_size: int = 4096) -> int:
    metrics = ReconstructionMetrics(sae.cfg.d_in, sae.cfg.d_sae)
    n = 0
    with torch.no_grad():
        for x_BD in eval_batches(store, key, rng, batch_size, True):
            acts_BF = sae.encode(x_BD)
            metrics.update(x_BD, sae.decode(acts_BF), acts_BF)
            n += len(x_BD)
    metrics.result()
    return n


def inspect_pass(store: Store, sae, key, rng) -> int:
    (s,) = scan(store, key, rng, [sae.encode], [sae.cfg.d_sae], ScanConfig())
    return s.tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    store = Store.open(args.store)
    cfg = io.read_cfg(args.run)["training"]
    key = (int(cfg["layer"]), cfg["site"])
    sae = io.load_sae(args.run)
    ranges = {"held-out": held_out_range(cfg, store, 0), "whole store": (0, store.committed_tokens)}
    out = {"threads": torch.get_num_threads()}
    for name, rng in ranges.items():
        times: dict[str, list[float]] = {"eval": [], "inspect": []}
        tokens = {}
        for _ in range(args.reps):
            for what, fn in (("eval", eval_pass), ("inspect", inspect_pass)):
                t0 = time.perf_counter()
                tokens[what] = fn(store, sae, key, rng)
                times[what].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[name] = {
            "range": list(rng),
            "tokens": tokens,
            "eval_s": times["eval"],
            "inspect_s": times["inspect"],
            "eval_tok_s": tokens["eval"] / med["eval"],
            "inspect_tok_s": tokens["inspect"] / med["inspect"],
            "ratio": (tokens["inspect"] / med["inspect"]) / (tokens["eval"] / med["eval"]),
        }
        print(name, json.dumps(out[name]), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
