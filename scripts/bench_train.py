"""Training speed, side by side: our trainer against SAELens and EleutherAI sparsify on the same activations.

Run from the repository root in the peers virtualenv (it holds sae-lens, eai-sparsify and our package):

    .venv-peers/bin/python scripts/bench_train.py                      # or: make peers (see the report)

For every width (default 4608 = 8x and 16384 latents at d_in 576, batch 4096, k 32) and every variant it
times warm-up + timed steps of
  - ours: our real `sae_cli.trainer.Trainer` (the per-step work `sae train` runs: scale, training_loss,
    backward, the host sync, decoder-gradient projection, clipping, Adam, renormalisation, dead-latent
    counters), fed from an in-memory reader that hands out the same batches as the peers get;
  - SAELens 6.x: `SAETrainer.step` on its TopK / JumpReLU / BatchTopK / standard (ReLU) / Gated training SAEs;
  - sparsify 1.x: `SparseCoder` TopK with the step of its trainer (scripts/peers.py).
Tokens/s = batch / median step time after the warm-up steps. With a store, a last run trains our TopK from
the store through `ActivationReader` and reports the share of the time spent waiting on the reader (goal < 5 %).

The activations are real SmolLM2 layer-15 resid_post tokens from --store (default stores/demo) when it
exists, else synthetic (a sparse mix of random directions; printed in the header).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

# Ours -> the peers' counterpart. Variants absent here get only our column.
SAELENS_OF = {
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "batchtopk",
    "relu": "relu",
    "gated": "gated",
}
SPARSIFY_OF = {"topk": "topk"}
# The targets we set ourselves (issue: training speed): ratio ours / peer.
TARGETS = {
    "topk": ("sparsify", 1.0),
    "jumprelu": ("SAELens", 2.0),
    "batchtopk": ("SAELens", 2.0),
    "relu": ("SAELens", 2.0),
    "gated": ("SAELens", 2.0),
}


def race(
    contenders: dict[str, Any],
    pool: list[Tensor],
    warmup: int,
    steps: int,
    before_step: Callable[[Any, Tensor], object] | None = None,
) -> dict[str, list[tuple[float, float]] | str]:
    """Interleave the contenders step by step on the same batches (so that other jobs on the machine slow
    them alike); per timed step (wall seconds, process CPU seconds), or the error (one line) of a contender
    that failed. CPU time (all threads of this process) does not count time spent waiting for a core."""
    times: dict[str, list[tuple[float, float]] | str] = {name: [] for name in contenders}
    for i in range(warmup + steps):
        x = pool[i % len(pool)]
        for name, c in contenders.items():
            if isinstance(times[name], str):
                continue
            if before_step is not None:
                before_step(c, x)  # untimed
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                c.step(x)
            except Exception as e:  # a peer's mode that does not run here is a result, not a crash
                times[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                continue
            if i >= warmup:
                times[name].append((time.perf_counter() - t0, time.process_time() - c0))  # type: ignore[union-attr]
    return times


@torch.no_grad()
def start_at_l0(contender: Any, x_BD: Tensor, k: int) -> bool:
    """(--hold-l0, called before every step, outside the timing.) Move a steered SAE (JumpReLU, ReLU, Gated; ours or SAELens's) to the sparse regime it trains in: each
    latent's threshold (JumpReLU theta, or a shift of the ReLU / gate bias) is set to its (1 - k/d_sae) quantile
    of the pre-activations on x, so that L0 is about k from the first step. Without this the first steps run at
    the init L0 (about half the latents), which favours no one but hides what sparse paths would gain.
    Returns False for contenders with nothing to move (TopK-like rules fix L0 themselves)."""

    def quantile_F(pre_BF: Tensor) -> Tensor:
        n = pre_BF.shape[0]
        return pre_BF.kthvalue(max(1, min(n, round(n * (1 - k / pre_BF.shape[1])))), dim=0).values

    if isinstance(contender, peers.OursAdapter):
        m = contender.trainer.members[0]
        sae, x = m.sae, x_BD * m.scale
        if sae.cfg.variant == "jumprelu":
            sae.theta_F.copy_(quantile_F(sae.pre_acts(x)).clamp_min(1e-6))
        elif sae.cfg.variant == "relu":
            sae.b_enc_F.sub_(quantile_F(x @ sae.W_enc_FD.T + sae.b_enc_F))
        elif sae.cfg.variant == "gated":
            sae.b_enc_F.sub_(quantile_F(sae.gate_and_mag(x)[0]))
        else:
            return False
        return True
    if isinstance(contender, peers.SAELensPeer):
        sae, scale = contender.sae, contender.trainer.activation_scaler.scaling_factor or 1.0
        x_in = sae.process_sae_in(x_BD * scale)
        if contender.variant == "jumprelu":
            sae.threshold.copy_(quantile_F(x_in @ sae.W_enc + sae.b_enc).clamp_min(1e-6))
        elif contender.variant == "relu":
            sae.b_enc.sub_(quantile_F(x_in @ sae.W_enc + sae.b_enc))
        elif contender.variant == "gated":
            sae.b_gate.sub_(quantile_F(x_in @ sae.W_enc + sae.b_gate))
        else:
            return False
        return True
    return False


def profile(
    contenders: dict[str, Any],
    pool: list[Tensor],
    steps: int,
    before_step: Callable[[Any, Tensor], object] | None = None,
    rows: int = 18,
) -> str:
    """torch.profiler table (ops by self CPU time) of `steps` steps of each contender after one warm-up step
    (`before_step`, if any, runs before the warm-up step and before the profiled ones, outside the profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = []
    for name, c in contenders.items():
        if before_step is not None:
            before_step(c, pool[0])
        c.step(pool[0])
        if before_step is not None:
            before_step(c, pool[1 % len(pool)])
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps):
                c.step(pool[(i + 1) % len(pool)])
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        out.append(f"### {name}: {steps} step(s)\n{table}")
    return "\n".join(out)


def reader_share(
    store: str, key: tuple[int, str], d_sae: int, k: int, batch: int, steps: int
) -> dict[str, float]:
    """Our TopK trained from the store the way `sae train` does it (sae_cli.data's reader and sample, the real
    `Trainer.run`): the share of the loop's wall time spent blocked on the ActivationReader."""
    from sae_cli import data
    from sae_cli.config import LoopConfig, MemberConfig
    from sae_cli.trainer import Trainer, plan_member

    st = data.open_store(store)
    loop = LoopConfig(tokens=steps * batch, batch_size=batch, device="cpu")
    train_range, _ = data.split(st, loop.eval_tokens)
    reader = data.train_reader(st, [key], loop, train_range)
    sample = data.sample(st, [key], loop, train_range)
    with tempfile.TemporaryDirectory() as tmp:
        plan = plan_member(MemberConfig("topk", key[0], key[1], str(d_sae), k), st.d_model, Path(tmp) / "s")
        trainer = Trainer([plan], loop, reader, Path(tmp) / "run", steps * batch, device="cpu")
        trainer.start(sample)
        trainer.run()
        loop_s = trainer.elapsed_s  # the training loop only: no final checkpoint / save
    return {
        "loop_s": loop_s,
        "wait_s": reader.wait_seconds,
        "share": reader.wait_seconds / loop_s,
        "tok_s": steps * batch / loop_s,
    }


def tok_s(batch: int, per_step: list[float]) -> float:
    return batch / statistics.median(per_step) if per_step else float("nan")


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return "failed" if v != v else f"{v:,.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--store", default="stores/demo", help="actcache store (synthetic data if it does not exist)"
    )
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--site", default="resid_post")
    ap.add_argument("--widths", default="4608,16384", help="comma-separated d_sae values")
    ap.add_argument("--k", type=int, default=32, help="k / L0 target")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--variants", default="all", help="our variants to time (comma list or 'all')")
    ap.add_argument("--no-ours", action="store_true", help="time the peers only")
    ap.add_argument("--no-peers", action="store_true", help="time ours only")
    ap.add_argument(
        "--saelens-sparse-topk",
        action="store_true",
        help="also time SAELens TopK with use_sparse_activations",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="print torch.profiler op tables per contender instead of the race",
    )
    ap.add_argument(
        "--hold-l0",
        action="store_true",
        help="time steered SAEs (jumprelu, relu, gated) at L0 ~ k: thresholds re-set before each step, untimed",
    )
    ap.add_argument("--reader-steps", type=int, default=8, help="steps of the reader-wait run (0: skip)")
    ap.add_argument(
        "--synthetic", action="store_true", help="use synthetic activations even if the store exists"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    key = (args.layer, args.site)
    n_pool = max(2, min(args.warmup + args.steps, 4))
    pool, source = peers.activation_pool(args.store, key, args.batch, n_pool, synthetic=args.synthetic)
    scale = peers.saelens_scaling_factor(pool, pool[0].shape[1])
    print(peers.header("bench_train", sys.argv, source, args.threads))

    if args.no_ours:
        ours_variants: list[str] = []
    else:
        from sae_cli.registry import variant_names

        ours_variants = variant_names() if args.variants == "all" else args.variants.split(",")
    peer_rows = [] if args.no_peers or args.variants != "all" else list(SAELENS_OF)
    rows_variants = list(dict.fromkeys([*ours_variants, *peer_rows]))

    widths = [int(w) for w in args.widths.split(",")]
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    t_start = time.perf_counter()
    for d_sae in widths:
        for variant in rows_variants:
            n = args.warmup + args.steps
            d_in = pool[0].shape[1]
            cfg = peers.PeerConfig(d_in=d_in, d_sae=d_sae, k=args.k, total_steps=n, batch_size=args.batch)
            contenders: dict[str, Any] = {}
            if variant in ours_variants:
                contenders["ours"] = peers.OursAdapter(variant, d_sae, args.k, key, pool[0], n, args.batch)
            if not args.no_peers and variant in SAELENS_OF:
                contenders["saelens"] = peers.make_peer("saelens", SAELENS_OF[variant], cfg, scale)
            if not args.no_peers and variant in SPARSIFY_OF:
                contenders["sparsify"] = peers.make_peer("sparsify", SPARSIFY_OF[variant], cfg, scale)
            if args.saelens_sparse_topk and not args.no_peers and variant == "topk":
                sparse_cfg = dataclasses.replace(cfg, topk_sparse=True)
                contenders["saelens_sparse"] = peers.make_peer("saelens", "topk", sparse_cfg, scale)
            hold = (lambda c, x: start_at_l0(c, x, args.k)) if args.hold_l0 else None
            if args.profile:
                print(profile(contenders, pool, args.steps, hold), flush=True)
                continue
            times = race(contenders, pool, args.warmup, args.steps, before_step=hold)
            del contenders
            row: dict[str, Any] = {"variant": variant, "d_sae": d_sae}
            for name, t in times.items():
                if isinstance(t, str):
                    errors.append(f"{name} {variant} d_sae {d_sae} failed: {t}")
                    row[name] = float("nan")
                else:
                    row[name] = tok_s(args.batch, [w for w, _ in t])
                    row[f"{name}_cpu"] = tok_s(args.batch, [c for _, c in t])
            results.append(row)
            print(
                f"  {variant:>14} d_sae {d_sae}: "
                + ", ".join(
                    f"{k} {fmt(v)} tok/s"
                    for k, v in row.items()
                    if k not in ("variant", "d_sae") and "_cpu" not in k
                ),
                flush=True,
            )
    if results:
        print()
        print(markdown_table(results))
    for line in errors:
        print(f"- {line}")
    print(f"\n(benchmark wall time {time.perf_counter() - t_start:.0f} s)")

    if args.reader_steps > 0 and not args.no_ours and source.startswith("store"):
        r = reader_share(args.store, key, widths[0], args.k, args.batch, args.reader_steps)
        print(
            f"\nReader wait (our TopK d_sae {widths[0]}, {args.reader_steps} steps from {args.store} via ActivationReader): "
            f"{r['wait_s']:.2f} s of {r['loop_s']:.1f} s = {100 * r['share']:.1f} % (goal < 5 %); {r['tok_s']:,.0f} tok/s end to end"
        )
    return 0


def _ok(v: float | None) -> bool:
    return v is not None and v == v and v > 0


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per (variant, width): wall tokens/s of each library, ours / peer as wall-time and CPU-time ratios
    (CPU time leaves out waiting for a core, steadier on a shared machine), and our target."""
    lines = [
        "| variant | d_sae | ours tok/s | SAELens tok/s | sparsify tok/s | ratio (wall) | ratio (CPU time) | target (wall) |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in results:
        r = dict(r)
        sl_text = fmt(r.get("saelens"))
        if "saelens_sparse" in r:
            # Compare with SAELens's faster setting, and show both.
            sl_text = f"{fmt(r.get('saelens'))} (sparse acts: {fmt(r['saelens_sparse'])})"
            for suffix in ("", "_cpu"):
                alt = r.get(f"saelens_sparse{suffix}")
                if _ok(alt) and alt > (r.get(f"saelens{suffix}") or 0.0):
                    r[f"saelens{suffix}"] = alt
        ratio: dict[str, list[str]] = {"": [], "_cpu": []}
        for suffix in ratio:
            ours = r.get(f"ours{suffix}")
            for peer, label in (("saelens", "SAELens"), ("sparsify", "sparsify")):
                theirs = r.get(f"{peer}{suffix}")
                if _ok(ours) and _ok(theirs):
                    ratio[suffix].append(f"{ours / theirs:.2f}x {label}")
        target = ""
        if r["variant"] in TARGETS and _ok(r.get("ours")):
            peer, want = TARGETS[r["variant"]]
            have = r.get({"SAELens": "saelens", "sparsify": "sparsify"}[peer])
            if _ok(have):
                target = f">= {want:g}x {peer}: {'met' if r['ours'] / have >= want else 'NOT met'}"
        lines.append(
            f"| {r['variant']} | {r['d_sae']} | {fmt(r.get('ours'))} | {sl_text} | {fmt(r.get('sparsify'))} | "
            f"{', '.join(ratio[''])} | {', '.join(ratio['_cpu'])} | {target} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
