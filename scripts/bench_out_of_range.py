"""Out-of-range tokens on a real store: how trained SAEs reconstruct the massive-norm tokens of a store, with and
without their out-of-range rule (cfg.json `passthrough_norm`, docs/variants.md "Tokens outside the training
range").

    python scripts/bench_out_of_range.py --store stores/demo RUN [RUN ...]

The store's tokens (layer/site of the first run; BOS and padding dropped) are scanned whole; a token is massive
when its norm exceeds --ratio x the median token norm. For each SAE folder: on the massive tokens, the per-token
FVU ||x - x_hat||^2 / ||x - mean||^2 (mean over every scanned token; 1 = no better than predicting the mean): its
maximum, mean and the count above 1; and the FVU over the run's held-out tokens together with the massive ones
(what `sae eval` reports as the FVU over all tokens when its held-out range holds them), each with the rule and
without it (--no-passthrough).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sae_cli import io
from sae_cli.data import eval_batches, open_store
from sae_cli.metrics import fvu


def scan(store, key: tuple[int, str], batch: int = 8192) -> torch.Tensor:
    return torch.cat(list(eval_batches(store, key, (0, store.committed_tokens), batch, drop_bos=True)))


def row(
    folder: Path, x_ND: torch.Tensor, massive_N: torch.Tensor, held_ND: torch.Tensor, mean_D
) -> list[str]:
    sae = io.load_sae(folder)
    x_MD = x_ND[massive_N]
    both = torch.cat([held_ND, x_MD])
    cells = [
        sae.cfg.variant,
        f"{sae.cfg.l0_target:g}",
        str(io.read_cfg(folder)["training"].get("max_norm_ratio")),
    ]
    cut = sae.cfg.passthrough_norm
    cells.append("-" if cut is None else f"{cut:.4g}")
    for rule in (False, True):
        with torch.no_grad():
            acts_MF, x_hat_MD = sae.reconstruct(x_MD, passthrough=rule)
            _, x_hat_all = sae.reconstruct(both, passthrough=rule)
        tok_M = (x_MD - x_hat_MD).pow(2).sum(-1) / (x_MD - mean_D).pow(2).sum(-1)
        l0 = float((acts_MF != 0).sum(-1).float().mean())
        cells += [f"{float(tok_M.max()):.3g}", f"{float(tok_M.mean()):.3g}", str(int((tok_M > 1).sum()))]
        cells += [f"{l0:.0f}", f"{fvu(both, x_hat_all):.4f}"]
    return cells


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--store", required=True)
    ap.add_argument("--ratio", type=float, default=10.0, help="massive: norm above this x the median")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    store = open_store(args.store)
    training = io.read_cfg(args.runs[0])["training"]
    key = (int(training["layer"]), str(training["site"]))
    x_ND = scan(store, key)
    norm_N = x_ND.norm(dim=-1)
    median = float(norm_N.median())
    massive_N = norm_N > args.ratio * median
    lo, hi = (int(v) for v in training["eval_range"])
    held_ND = torch.cat(list(eval_batches(store, key, (lo, hi), 8192, drop_bos=True)))
    ratios = (norm_N[massive_N] / median).tolist()
    print(
        f"store {args.store} {key}: {len(x_ND):,} tokens (BOS dropped), median norm {median:.4g}; "
        f"{int(massive_N.sum())} massive (> {args.ratio:g}x): {', '.join(f'{r:.0f}x' for r in sorted(ratios))}; "
        f"held-out {lo}..{hi}: {len(held_ND):,} tokens"
    )
    head = "| variant | L0 target | max_norm_ratio | passthrough_norm |"
    for label in ("no rule", "rule"):
        head += f" max tok FVU ({label}) | mean tok FVU | tok FVU > 1 | L0 on them | FVU held-out + massive |"
    print(head)
    print("|" + " --- |" * 4 + " ---: |" * 10)
    mean_D = x_ND.mean(0)
    for folder in args.runs:
        print("| " + " | ".join(row(folder, x_ND, massive_N, held_ND, mean_D)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
