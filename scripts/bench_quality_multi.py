"""The quality benchmark over several stores, with and without massive-norm tokens in training: one command runs
scripts/bench_quality.py (ours and the peers side by side on the same batches, evaluated by the same code) for
every (store, --max-norm-ratio) pair and prints one table.

    SPARSIFY_DISABLE_TRITON=1 .venv-peers/bin/python scripts/bench_quality_multi.py \\
        --stores stores/demo,stores/pystdlib --ratios 0,10 --k 32,64 --width 2304 -- --no-saelens-topk

Arguments after `--` go to every bench_quality.py run (e.g. --tokens, --batch, --ours-variants). Each run's rows
are also written to OUT/<store>-r<ratio>.json (--out, default bench-quality-multi/).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality  # noqa: E402


def run_one(store: str, ratio: float, args: argparse.Namespace, extra: list[str]) -> list[dict]:
    out = Path(args.out) / f"{Path(store).name}-r{ratio:g}.json"
    argv = [
        "--store", store, "--k", args.k, "--width", str(args.width), "--max-norm-ratio", str(ratio),
        "--ours", "--jumprelu", args.jumprelu, "--json", str(out), *extra,
    ]  # fmt: skip
    t0 = time.perf_counter()
    bench_quality.main(argv)  # prints its header (machine, commit, argv), progress and its own table
    print(f"  {store} ratio {ratio:g}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(out.read_text())["rows"]


def table(results: list[tuple[str, float, list[dict]]]) -> str:
    lines = [
        "| store | massive tokens in training | SAE | L0 | FVU (all held-out) | FVU w/o massive | worst token FVU "
        "| tokens FVU > 1 | alive % | train s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for store, ratio, rows in results:
        kept = "kept" if ratio == 0 else f"dropped (> {ratio:g}x median)"
        for r in rows:
            lines.append(
                f"| {Path(store).name} | {kept} | {r['name']} | {r['l0']:.1f} | {r['fvu']:.4f} | "
                f"{r['fvu_typical']:.4f} | {r['fvu_token_max']:.3g} | {r['tokens_fvu_over_1']} | "
                f"{100 - r['dead_pct']:.1f} | {r['train_s']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stores", default="stores/demo")
    ap.add_argument("--ratios", default="0,10", help="--max-norm-ratio values (0: massive tokens kept)")
    ap.add_argument("--k", default="32,64")
    ap.add_argument("--width", type=int, default=2304)
    ap.add_argument("--jumprelu", default="", help="SAELens JumpReLU entries (bench_quality.py --jumprelu)")
    ap.add_argument("--out", default="bench-quality-multi")
    args = ap.parse_args(own)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = []
    for store in args.stores.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            results.append((store, ratio, run_one(store, ratio, args, extra)))
            print(table(results[-1:]), flush=True)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
