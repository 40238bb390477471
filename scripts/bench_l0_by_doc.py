"""L0 and FVU per document over a whole store, for every SAE of a sweep (or single runs): how far a threshold's
L0 moves from document to document, on the training, calibration and held-out parts alike, and whether the
documents where a threshold SAE fires more are those a TopK SAE (fixed L0) reconstructs worse.

    python scripts/bench_l0_by_doc.py runs/sw-py [--store stores/pystdlib] [--json out.json]

Prints one row per (run, part): the part's L0, and min / median / max of the L0 over its documents of at least
1,024 tokens (a document cut by a part boundary counts on each side); then, per threshold SAE, the correlation over
documents of its L0 with the TopK SAE's FVU. Results in docs/benchmarks.md ("L0 by document")."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from sae_cli import io
from sae_cli.by_document import MIN_TOKENS
from sae_cli.data import open_store
from sae_cli.evaluate import reconstruction_metrics

PARTS = ("train_range", "calibration_range", "eval_range")


def runs_in(paths: list[Path]) -> list[Path]:
    found = []
    for p in paths:
        found += [p] if (p / "cfg.json").is_file() else sorted(c.parent for c in p.glob("**/cfg.json"))
    return found


def per_part(run: Path, store_arg: str | None, batch: int) -> dict[str, list[dict]]:
    cfg = io.read_cfg(run)
    training = cfg["training"]
    store = open_store(store_arg or training["store"])
    key = (int(training["layer"]), str(training["site"]))
    sae = io.load_sae(run, "cpu")
    drop_bos = bool(training.get("drop_bos", True))
    out = {}
    for part in PARTS:
        lo, hi = (int(v) for v in training.get(part) or (0, 0))
        if hi > lo:  # `sae eval`'s own pass over that range
            _, docs = reconstruction_metrics(
                sae, store, key, (lo, hi), batch, drop_bos, True, lambda *a: None
            )
            out[part] = docs.rows()
    return {"variant": sae.cfg.variant, "l0_target": sae.cfg.l0_target, "parts": out}


def pearson(a: list[float], b: list[float]) -> float:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    ta, tb = ta - ta.mean(), tb - tb.mean()
    return float((ta * tb).sum() / (ta.norm() * tb.norm()).clamp_min(1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--store", default=None)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    results = {str(r): per_part(r, args.store, args.batch) for r in runs_in(args.paths)}
    print("| variant | part | tokens | L0 | docs | L0 min / median / max over docs | docs within 5 % |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: |")
    for res in results.values():
        target = res["l0_target"]
        for part, rows in res["parts"].items():
            n = sum(r["tokens"] for r in rows)
            l0 = sum(r["l0"] * r["tokens"] for r in rows) / max(n, 1)
            big = [r["l0"] for r in rows if r["tokens"] >= MIN_TOKENS]
            spread = f"{min(big):.2f} / {statistics.median(big):.2f} / {max(big):.2f}" if big else "-"
            within = sum(abs(v - target) <= 0.05 * target for v in big)
            name = part.removesuffix("_range")
            print(f"| {res['variant']} | {name} | {n:,} | {l0:.2f} | {len(big)} | {spread} | {within} |")
    topk = next((r for r in results.values() if r["variant"] == "topk"), None)
    if topk is not None:
        print("\nPearson r over documents (all parts, >= 1,024 tokens): L0 of the SAE against TopK's FVU")
        ref = {(p, r["doc"]): r["fvu"] for p, rows in topk["parts"].items() for r in rows}
        for res in results.values():
            if res["variant"] == "topk":
                continue
            pairs = [
                (r["l0"], ref[(p, r["doc"])])
                for p, rows in res["parts"].items()
                for r in rows
                if r["tokens"] >= MIN_TOKENS and (p, r["doc"]) in ref
            ]
            if len(pairs) > 2:
                r_ = pearson([a for a, _ in pairs], [b for _, b in pairs])
                print(f"  {res['variant']}: r = {r_:+.2f} over {len(pairs)} documents")
        print("Pearson r over documents: L0 of the SAE against the document's RMS token norm")
        for res in results.values():
            rows = [r for rows in res["parts"].values() for r in rows if r["tokens"] >= MIN_TOKENS]
            if len(rows) > 2 and res["variant"] != "topk":
                r_ = pearson([r["l0"] for r in rows], [r["rms_norm"] for r in rows])
                print(f"  {res['variant']}: r = {r_:+.2f} over {len(rows)} documents")
    if args.json:
        args.json.write_text(json.dumps(io.json_safe(results), indent=1))


if __name__ == "__main__":
    main()
