"""The lossy mode's cost to an SAE (docs/benchmarks.md, "Lossy mode"): one (layer, site) of a store re-encoded
losslessly and with --keep-bits N (scripts/reencode_store.py: identical tokens and layout), SAEs of each variant
trained on both (same tokens, budget, seed), all evaluated on the LOSSLESS store's held-out tokens (`sae eval`;
the run trained on the lossy store is evaluated from a copy whose recorded store identity is dropped, since it
names the lossy store). Prints a markdown table: bytes/token, FVU, delta LM loss side by side.

Usage: python scripts/bench_lossy.py --src stores/demo --work /tmp/lossy [--layer 15] [--site resid_post]
           [--keep-bits 2] [--variants topk,jumprelu] [--l0 32] [--width 8x] [--tokens 0] [--seeds 0,1,2]
           [--extra-tokens jumprelu=153600]
With several seeds each (variant, store) pair trains once per seed; the summary gives each arm's mean and standard
deviation over the seeds and the mean of the per-seed differences (lossy - lossless, same seed).
Steps whose output exists are skipped (rerun to continue).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from actcache.store import Store


def sh(*cmd: str) -> None:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def sae(*args: str) -> None:
    sh(sys.executable, "-c", "from sae_cli.cli import app; app()", *args)


def eval_copy(run: Path) -> Path:
    """A copy of a run without its recorded store identity (so `sae eval --store` accepts another store)."""
    copy = run.with_name(run.name + "-on-lossless")
    if not copy.exists():
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoint"))
        cfg = json.loads((copy / "cfg.json").read_text())
        cfg["training"].pop("store_identity", None)
        (copy / "cfg.json").write_text(json.dumps(cfg, indent=1))
    return copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--site", default="resid_post")
    ap.add_argument("--keep-bits", type=int, default=2)
    ap.add_argument("--variants", default="topk,jumprelu")
    ap.add_argument("--l0", default="32")
    ap.add_argument("--width", default="8x")
    ap.add_argument("--tokens", type=int, default=0, help="training tokens (0: sae train's default)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, one run per seed and arm")
    ap.add_argument("--extra-tokens", default="", help="per-variant budgets, e.g. jumprelu=153600")
    args = ap.parse_args()
    work = Path(args.work)
    budgets = dict(kv.split("=") for kv in args.extra_tokens.split(",") if kv)
    stores = {"lossless": work / "lossless", f"keep-bits {args.keep_bits}": work / f"keep{args.keep_bits}"}
    script = Path(__file__).with_name("reencode_store.py")
    for name, path in stores.items():
        if not path.exists():
            bits = [] if name == "lossless" else ["--keep-bits", str(args.keep_bits)]
            sh(
                sys.executable,
                str(script),
                args.src,
                str(path),
                "--layers",
                str(args.layer),
                "--sites",
                args.site,
                *bits,
            )
    seeds = [int(x) for x in args.seeds.split(",")]
    rows = []
    for variant in args.variants.split(","):
        tokens = budgets.get(variant, str(args.tokens))
        for seed in seeds:
            for name, path in stores.items():
                suffix = "" if seed == 0 else f"-s{seed}"  # seed 0 keeps the single-seed runs' names
                run = work / "runs" / f"{variant}-{path.name}{suffix}"
                if not (run / "sae.safetensors").exists():
                    sae("train", variant, "--store", str(path), "--layer", str(args.layer), "--site", args.site,
                        "--l0-target", args.l0, "--width", args.width, "--tokens", tokens, "--seed", str(seed),
                        "--device", "cpu", "--out", str(run), "--overwrite")  # fmt: skip
                target = run if name == "lossless" else eval_copy(run)
                if not (target / "eval.json").exists():
                    sae("eval", str(target), "--store", str(stores["lossless"]), "--device", "cpu")
                rows.append((variant, seed, name, path, json.loads((target / "eval.json").read_text())))
    d = Store.open(stores["lossless"]).spec.d_model
    print(
        "| variant | seed | trained on | bytes/token | / raw bf16 | / raw fp32 | L0 | FVU | delta LM loss "
        "| FVU vs lossless | delta LM loss vs lossless |"
    )
    print("| --- " * 11 + "|")
    base = {}
    for variant, seed, name, path, ev in rows:
        store = Store.open(path)
        key = f"acts/{args.site}/{args.layer}"
        per_token = store.stored_bytes(key) / store.committed_tokens
        base.setdefault((variant, seed), ev)
        b = base[(variant, seed)]
        print(
            f"| {variant} | {seed} | {name} | {per_token:.0f} | {per_token / (2 * d):.3f} | {per_token / (4 * d):.3f} "
            f"| {ev['l0']:.1f} | {ev['fvu']:.4f} | {ev['delta_lm_loss']:.4f} | {ev['fvu'] / b['fvu'] - 1:+.2%} "
            f"| {ev['delta_lm_loss'] / b['delta_lm_loss'] - 1:+.2%} |"
        )
    if len(seeds) > 1:
        print("\n| variant | metric | lossless mean (sd) | lossy mean (sd) | lossy / lossless - 1 (means) "
              "| per-seed differences, mean (sd) |")  # fmt: skip
        print("| --- " * 6 + "|")
        for variant in dict.fromkeys(v for v, *_ in rows):
            for metric in ("fvu", "delta_lm_loss"):
                lossless, lossy = (
                    [ev[metric] for v, _, n, _, ev in rows if v == variant and n == arm] for arm in stores
                )
                diffs = [(b - a) / a for a, b in zip(lossless, lossy, strict=True)]
                print(
                    f"| {variant} | {metric} | {statistics.mean(lossless):.4f} ({statistics.stdev(lossless):.4f}) "
                    f"| {statistics.mean(lossy):.4f} ({statistics.stdev(lossy):.4f}) "
                    f"| {statistics.mean(lossy) / statistics.mean(lossless) - 1:+.2%} "
                    f"| {statistics.mean(diffs):+.2%} ({statistics.stdev(diffs):.2%}) |"
                )


if __name__ == "__main__":
    main()
