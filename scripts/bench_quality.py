"""Quality at equal width, token budget and activations: SAELens (TopK, JumpReLU) and sparsify (TopK) against
ours, FVU and L0 on held-out tokens, all measured by the same code (sae_cli.metrics).

Run from the repository root in the peers virtualenv:

    .venv-peers/bin/python scripts/bench_quality.py --ours               # peers + ours trained here
    .venv-peers/bin/python scripts/bench_quality.py --ours-runs runs/a runs/b   # + finished `sae train` runs

Data: layer 15 resid_post of --store (default stores/demo). The held-out tokens are the last whole windows of
the store, exactly as `sae train`/`sae eval` hold them out (sae_cli.data.split; default 10 % of the store, at
most 1M tokens); training reads the rest, shuffled, BOS dropped, through one ActivationReader: every
contender is stepped on the same batch before the next batch is read, so all see identical data in identical
order. The evaluation also drops BOS (as `sae eval`); FVU is also given without massive-norm tokens.

Hyper-parameters (what we chose and why):
- width 8x = 4608; batch size and token budget as `sae train` chooses them for the store (sae_cli.config.
  resolve_loop: on the 40,960-token demo store 300 steps of 1024 tokens), the same for every contender;
- lr for every contender: 2e-4 / sqrt(d_sae / 2^14) (OpenAI / sparsify TopK heuristic; SAELens's default is
  3e-4, close at 4608 latents), linear warm-up over min(1000, 5 %) of the steps, linear decay to 0 over the
  last 20 % for SAELens (as ours does; sparsify's own schedule decays linearly over the whole run);
- SAELens inputs scaled by its ActivationScaler (E||c x|| = sqrt(d_in)), folded at the end as its fit() does;
- SAELens JumpReLU is steered to the target L0 with its own settings, one contender per --jumprelu entry
  (`parse_jumprelu`): mode "quadratic" = Gemma Scope 2's penalty coef * 2/target * (L0 - target)^2 with
  target_l0 = k (the mode SAELens offers for a target L0), "step" = DeepMind's coef * L0 (no target: L0
  lands where coef puts it); theta/bw = their `jumprelu_init_threshold` / `jumprelu_bandwidth` (defaults 0.01,
  0.05); scale "saelens" (their E||c x|| = sqrt(d_in)) or "unit" (E||c x||^2 = 1, the scale Gemma Scope's
  theta0 = bw = 0.001 assume, and ours). Coefficient warm-up over 5 % of the steps. The default entry is
  quadratic, coef 1, theta0 = bw = 0.001 on unit scale: with their scale and defaults the threshold, which Adam
  moves by about lr per step, cannot keep up with pre-activations 24x larger, and L0 stays in the thousands
  within a short run (docs/benchmarks.md, "Quality");
- sparsify TopK, one contender per --sparsify-optimizers entry: "signum" = sparsify's own defaults (its SignSGD
  inside schedule-free momentum 0.95, lr 5e-3 / sqrt(d_sae / 2^14), no schedule, AuxK off, evaluated at the
  schedule-free average); "adam" = the Adam settings above with AuxK alpha 1/32 (its default is 0) and a dead
  window of 10 % of the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

JUMPRELU_KEYS = {"mode": str, "coef": float, "theta": float, "bw": float, "scale": str, "lr": float}


def parse_jumprelu(spec: str) -> list[dict[str, Any]]:
    """SAELens JumpReLU settings: entries separated by ';', each `key=value,...` with keys mode (quadratic, step,
    tanh), coef (their l0_coefficient), theta (jumprelu_init_threshold), bw (jumprelu_bandwidth), lr, and scale
    (`saelens`: their E||c x|| = sqrt(d_in); `unit`: E||c x||^2 = 1, the scale Gemma Scope's values assume)."""
    out = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        entry: dict[str, Any] = {"mode": "quadratic", "coef": 1.0, "scale": "saelens"}
        for kv in item.split(","):
            key, _, value = kv.partition("=")
            if key not in JUMPRELU_KEYS or not value:
                raise SystemExit(
                    f"bad --jumprelu entry {item!r}: use key=value with keys {', '.join(JUMPRELU_KEYS)}"
                )
            entry[key] = JUMPRELU_KEYS[key](value)
        if entry["mode"] not in ("quadratic", "step", "tanh") or entry["scale"] not in ("saelens", "unit"):
            raise SystemExit(f"bad --jumprelu entry {item!r}: mode quadratic|step|tanh, scale saelens|unit")
        out.append(entry)
    return out


def build_contenders(
    args: argparse.Namespace, sample_BD: Tensor, scale: float, n_steps: int
) -> dict[str, peers.Peer]:
    from sae_cli.config import parse_options

    d_in = sample_BD.shape[1]
    key = (args.layer, args.site)
    unit_scale = float(1.0 / sample_BD.double().pow(2).sum(-1).mean().sqrt())
    warm = max(1, min(1000, int(0.05 * n_steps)))
    decay = int(0.2 * n_steps)
    out: dict[str, peers.Peer] = {}
    for k in args.k:
        base = peers.PeerConfig(
            d_in=d_in,
            d_sae=args.width,
            k=k,
            total_steps=n_steps,
            batch_size=args.batch,
            lr_warmup_steps=warm,
            lr_decay_steps=decay,
            sparsity_warmup_steps=warm,
            dead_window_steps=max(1, n_steps // 10),
            lr=args.lr or None,
        )
        if args.saelens_topk:
            out[f"SAELens topk k={k}"] = peers.make_peer("saelens", "topk", base, scale)
        for e in args.jumprelu:
            cfg = dataclasses.replace(base, jumprelu_mode=e["mode"], sparsity_coef=e["coef"])
            if "theta" in e:
                cfg = dataclasses.replace(cfg, jumprelu_init_threshold=e["theta"])
            if "bw" in e:
                cfg = dataclasses.replace(cfg, jumprelu_bandwidth=e["bw"])
            if "lr" in e:
                cfg = dataclasses.replace(cfg, lr=e["lr"])
            c = unit_scale if e["scale"] == "unit" else scale
            label = f"SAELens jumprelu {e['mode']} coef {e['coef']:g}"
            label += f" target {k}" if e["mode"] == "quadratic" else f" (k={k} run)"
            label += f", theta0 {cfg.jumprelu_init_threshold:g}, bw {cfg.jumprelu_bandwidth:g}"
            label += f", lr {cfg.resolved_lr():.2g}, {e['scale']} scale"
            out[label] = peers.make_peer("saelens", "jumprelu", cfg, c)
        for opt in args.sparsify_optimizers if args.sparsify else []:
            cfg = dataclasses.replace(base, sparsify_optimizer=opt)
            if opt == "signum":  # sparsify's own defaults: its lr rule, no schedule, AuxK off
                cfg = dataclasses.replace(cfg, aux_coef=0.0, lr=args.lr or None)
            out[f"sparsify topk k={k} ({opt})"] = peers.make_peer("sparsify", "topk", cfg, scale)
        if args.ours:
            for entry in args.ours_variants:
                entry, *extras = entry.split("+")  # VARIANT...+key=value: a variant option (beta1: Adam's)
                options = parse_options(extras)
                beta1 = options.pop("beta1", None)
                variant, _, optimizer = entry.partition(":")
                lr = None
                if "@" in variant:  # VARIANT@LR: ours at another peak lr
                    variant, _, lr_text = variant.partition("@")
                    lr = float(lr_text)
                overrides = {"max_norm_ratio": args.max_norm_ratio, "seed": args.seed}
                if optimizer:  # schedule-free: no decay (warm-up kept)
                    overrides["decay_fraction"] = 0.0
                label = f"ours {variant} l0={k}" + (f" ({optimizer})" if optimizer else "")
                label += f" (lr {lr:g})" if lr else ""
                label += "".join(f" +{e}" for e in extras)
                out[label] = peers.OursAdapter(
                    variant, args.width, k, key, sample_BD, n_steps, args.batch, loop_overrides=overrides,
                    optimizer=optimizer, lr=lr, options=options, beta1=beta1,
                )  # fmt: skip
    return out


def lm_metrics(
    contender: peers.Peer, store: Any, key: tuple[int, str], token_range: tuple[int, int], model: Any
) -> dict[str, float]:
    """delta LM loss, CE recovered, KL of splicing the contender's reconstruction into the model: the code
    `sae eval` runs (sae_cli.evaluate.lm_metrics), on the same held-out windows for every contender."""
    from sae_cli.evaluate import lm_metrics as splice

    return splice(
        [lambda x: contender.reconstruct(x.float())[0].to(x.dtype)], store, key, token_range, model=model
    )[0]


def evaluate(contender: peers.Peer, batches: list[Tensor], d_sae: int) -> dict[str, float]:
    """FVU, L0, dead % ... of the inference rule on the held-out batches: sae_cli.metrics, the code `sae eval` uses."""
    from sae_cli.metrics import ReconstructionMetrics
    from sae_cli.variants.base import SAE

    # Our SAEs say which tokens their out-of-range rule passes through (counted as `sae eval` counts them); the
    # peers have no such rule.
    ours = getattr(contender, "sae", None)
    passed = ours.passed_through if isinstance(ours, SAE) else lambda x_BD: None
    metrics = ReconstructionMetrics(batches[0].shape[1], d_sae)
    for x_BD in batches:
        x_hat_BD, acts_BF = contender.reconstruct(x_BD)
        metrics.update(x_BD, x_hat_BD, acts_BF, passed(x_BD))
    return metrics.result()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="stores/demo")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--site", default="resid_post")
    ap.add_argument("--width", type=int, default=4608, help="d_sae for every contender (8x of 576)")
    ap.add_argument("--k", default="32,64", help="comma-separated k / L0 targets")
    ap.add_argument("--tokens", type=int, default=0, help="training tokens per contender; 0: as `sae train`")
    ap.add_argument("--batch", type=int, default=0, help="tokens per step; 0: as `sae train`")
    ap.add_argument(
        "--eval-tokens", type=int, default=0, help="held-out tokens; 0: as `sae train` (10 %%, <= 1M)"
    )
    ap.add_argument(
        "--jumprelu",
        default="mode=quadratic,coef=1,theta=0.001,bw=0.001,scale=unit",
        help="SAELens JumpReLU settings: entries 'key=value,...' separated by ';' (see parse_jumprelu; empty: none)",
    )
    ap.add_argument(
        "--no-saelens-topk", dest="saelens_topk", action="store_false", help="leave SAELens TopK out"
    )
    ap.add_argument("--no-sparsify", dest="sparsify", action="store_false", help="leave sparsify TopK out")
    ap.add_argument(
        "--sparsify-optimizers",
        default="signum",
        help="sparsify TopK contenders: signum (its defaults: SignSGD + schedule-free), adam (ours' settings)",
    )
    ap.add_argument("--ours", action="store_true", help="also train ours here (library, same batches)")
    ap.add_argument(
        "--ours-variants",
        default="topk,jumprelu",
        help="our variants trained with --ours; VARIANT@LR: at peak lr LR; VARIANT:signum[@LR]: schedule-free "
        "SignSGD in place of our Adam; +KEY=VALUE (repeatable): a variant option, or beta1=B for Adam's beta1",
    )
    ap.add_argument(
        "--ours-runs", nargs="*", default=[], help="finished `sae train --out` folders to evaluate"
    )
    ap.add_argument(
        "--lm-tokens",
        type=int,
        default=0,
        help="also splice every SAE into the store's model on this many held-out tokens (delta LM loss, CE "
        "recovered; 0: skip)",
    )
    ap.add_argument(
        "--lr",
        type=float,
        default=0.0,
        help="lr of every peer (0: 2e-4 / sqrt(d_sae / 2^14)); e.g. the lr `sae train` resolved for ours",
    )
    ap.add_argument(
        "--save-peers",
        default="",
        help="folder: save each SAELens peer's inference weights there (<label>.safetensors) for inspection",
    )
    ap.add_argument(
        "--max-norm-ratio",
        type=float,
        default=0.0,
        help="drop training tokens above this multiple of the median norm for every contender (as `sae train "
        "--max-norm-ratio`; 0: keep them); evaluation always sees every held-out token",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    args.k = [int(k) for k in args.k.split(",")]
    args.jumprelu = parse_jumprelu(args.jumprelu)
    args.ours_variants = args.ours_variants.split(",")
    args.sparsify_optimizers = args.sparsify_optimizers.split(",")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from sae_cli import data
    from sae_cli.config import LoopConfig, resolve_loop

    if not Path(args.store).exists():
        raise SystemExit(f"no store at {args.store}: harvest one (make demo) or pass --store PATH")
    store = data.open_store(args.store)
    key = (args.layer, args.site)
    train_range, eval_range = data.split(store, args.eval_tokens)
    # The same automatic batch size and run length as `sae train` on this store (sae_cli.config.resolve_loop).
    loop = LoopConfig(
        batch_size=args.batch, tokens=args.tokens, eval_tokens=args.eval_tokens, seed=args.seed,
        max_norm_ratio=args.max_norm_ratio,
    )  # fmt: skip
    loop = resolve_loop(loop, train_range[1] - train_range[0])
    args.batch, args.tokens = loop.batch_size, loop.tokens
    n_steps = max(1, math.ceil(args.tokens / args.batch))
    sample_BD = data.sample(store, [key], loop, train_range)[key]
    scale = peers.saelens_scaling_factor([sample_BD], sample_BD.shape[1])
    eval_batches = list(data.eval_batches(store, key, eval_range, args.batch, drop_bos=True))
    n_eval = sum(len(x) for x in eval_batches)
    source = (
        f"store {args.store}: train tokens {train_range[0]}..{train_range[1]} (shuffled, BOS dropped), "
        f"held out {eval_range[0]}..{eval_range[1]} ({n_eval:,} tokens after dropping BOS); layer {key[0]} {key[1]}"
    )
    print(peers.header("bench_quality", sys.argv, source, args.threads))
    print(
        f"budget: {n_steps} steps x {args.batch} = {n_steps * args.batch:,} tokens per contender; width {args.width}"
    )

    model = None
    if args.lm_tokens:  # loaded first: a missing model fails before the training, not after it
        from sae_cli.evaluate import first_windows
        from sae_cli.sweep import load_lm

        model = load_lm(store, "cpu")
        lm_range = first_windows(eval_range, args.lm_tokens, store.spec.context)
    contenders = build_contenders(args, sample_BD, scale, n_steps)
    seconds = {name: 0.0 for name in contenders}
    reader = data.train_reader(store, [key], loop, train_range)
    t_start = time.perf_counter()
    for step, batch in zip(range(n_steps), reader, strict=False):
        x_BD = batch.acts[key]
        for name, c in contenders.items():
            t0 = time.perf_counter()
            c.step(x_BD)
            seconds[name] += time.perf_counter() - t0
        if (step + 1) % max(1, n_steps // 10) == 0 or step + 1 == n_steps:
            print(f"  step {step + 1}/{n_steps} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    for c in contenders.values():
        c.finish()
    if args.save_peers:
        from safetensors.torch import save_file

        Path(args.save_peers).mkdir(parents=True, exist_ok=True)
        for name, c in contenders.items():
            if isinstance(c, peers.SAELensPeer):
                state = {k: v.contiguous() for k, v in c.inference_sae.state_dict().items()}
                save_file(
                    state,
                    str(Path(args.save_peers) / f"{name.replace(' ', '_').replace('/', '_')}.safetensors"),
                )
    for folder in args.ours_runs:
        loaded = peers.LoadedSAE(folder)
        contenders[loaded.label] = loaded
        seconds[loaded.label] = math.nan

    rows = []
    for name, c in contenders.items():
        d_sae = c.sae.cfg.d_sae if isinstance(c, peers.LoadedSAE) else args.width
        row = {"name": name, "d_sae": d_sae, "train_s": seconds[name], **evaluate(c, eval_batches, d_sae)}
        if model is not None:
            row.update(lm_metrics(c, store, key, lm_range, model))
        rows.append(row)
        print(f"  evaluated {name}", flush=True)
    print()
    print(markdown_table(rows, n_steps * args.batch))
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({"argv": sys.argv, "source": source, "rows": rows}, indent=1))
    return 0


def markdown_table(rows: list[dict[str, Any]], tokens: int) -> str:
    lines = [
        f"| SAE ({tokens:,} training tokens) | d_sae | L0 | FVU | FVU w/o massive tokens | worst token FVU | "
        "tokens FVU > 1 | dead % | shrinkage | delta LM loss | CE recovered | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        train_s = "-" if r["train_s"] != r["train_s"] else f"{r['train_s']:.0f}"
        lm = f"{r['delta_lm_loss']:.4f} | {r['ce_recovered']:.4f}" if "delta_lm_loss" in r else "- | -"
        lines.append(
            f"| {r['name']} | {r['d_sae']} | {r['l0']:.1f} | {r['fvu']:.4f} | {r['fvu_typical']:.4f} | "
            f"{r['fvu_token_max']:.3g} | {r['tokens_fvu_over_1']} | {r['dead_pct']:.1f} | {r['shrinkage']:.3f} | {lm} | {train_s} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
