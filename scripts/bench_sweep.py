"""What a sweep saves, measured: SmolLM2-135M, layer 15 resid_post, 4 members (topk and jumprelu at L0 32 and 64,
width 8x), the same training tokens for every run.

(a) harvest (layer 15 resid_post only) + ONE sweep from the store, against the 4 members trained ON THE FLY, one
    run each, as sparsify and dictionary_learning train: the model runs over the same windows with a hook on
    layer 15 (the forward stops there) and feeds our trainer. Goal: ours <= 0.5 of theirs.
(b) ONE sweep against the 4 members run one by one from the store (a solo run is `sae train`'s path): the ratio
    (goal <= 0.9 on CPU) and the share of the training time the loop waited for data.
(c) batching: a training step (forward + backward) of each equal-shape pair (topk 32/64, jumprelu 32/64) as a
    loop over members (the trainer's path) against the stacked step of sae_cli/batched.py; plus the encoder
    matmul alone, 2 x mm against one bmm.

Model loading is timed once and left out of (a) (every on-the-fly run would load the model again: leaving it out
favours on-the-fly). Evaluation is left out of every figure. Results: a Markdown table on stdout, JSON in
WORK/bench_sweep.json; docs/benchmarks.md, "Sweeps".

    python scripts/bench_sweep.py [--tokens 20480] [--train-tokens 16384] [--parts a,b,c] [--work /tmp/bench_sweep]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from actcache.corpus import FLAG_BOS, FLAG_PAD, corpus_windows
from actcache.harvest import HarvestConfig, plan_harvest, run_harvest
from actcache.models import load_model
from actcache.reader import Batch
from actcache.sites import find_blocks
from sae_cli import sweep as sw
from sae_cli.batched import jumprelu_group_loss, stack_params, topk_group_loss
from sae_cli.config import LoopConfig, MemberConfig
from sae_cli.registry import get_variant
from sae_cli.trainer import Trainer, input_scale, plan_member
from sae_cli.variants.base import StepState

VARIANTS, L0S, WIDTH, SITE = ("topk", "jumprelu"), (32.0, 64.0), "8x", "resid_post"


# ---- the on-the-fly source (what sparsify / dictionary_learning do) ---------------------------------------------
class _Stop(Exception):
    pass


class OnTheFlySource:
    """Batches of layer-`layer` residual-stream activations computed by the model as training asks for them:
    `windows_per_forward` context windows per forward, stopped after block `layer`; BOS and padding dropped (as
    our reader does); no shuffling beyond the window order (sparsify's default). Fulfils the trainer's Reader
    protocol (no resume). `take_sample` runs the first forwards early for the normalisation/init sample; their
    rows are then the first training rows (no forward runs twice)."""

    def __init__(self, model, arch, windows: list, layer: int, batch_size: int, windows_per_forward: int = 8):
        self.model, self.windows, self.batch_size, self.wpf = model, windows, batch_size, windows_per_forward
        self.block = find_blocks(model, arch)[layer]
        self.key = (layer, SITE)
        self.forward_s = 0.0
        self._done: list[torch.Tensor] = []
        self._rest: Iterator[torch.Tensor] | None = None

    def _forwards(self) -> Iterator[torch.Tensor]:
        """[n, d] kept rows of each forward, in window order."""
        captured: dict[str, torch.Tensor] = {}

        def hook(module, args, output):
            captured["x"] = output[0] if isinstance(output, tuple | list) else output
            raise _Stop  # the forward ends after this block

        for w0 in range(0, len(self.windows), self.wpf):
            group = self.windows[w0 : w0 + self.wpf]
            ids = torch.from_numpy(np.stack([w.token_ids_C for w in group]).astype(np.int64))
            keep = torch.from_numpy((np.stack([w.flags_C for w in group]) & (FLAG_BOS | FLAG_PAD)) == 0)
            t0 = time.perf_counter()
            handle = self.block.register_forward_hook(hook)
            try:
                with torch.inference_mode():
                    self.model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
            finally:
                handle.remove()
            self.forward_s += time.perf_counter() - t0
            yield captured.pop("x").reshape(-1, captured_dim(self.model))[keep.reshape(-1)].float().clone()

    def take_sample(self, n: int) -> torch.Tensor:
        self._rest = self._forwards()
        while sum(len(x) for x in self._done) < n:
            x = next(self._rest, None)
            if x is None:
                break
            self._done.append(x)
        return torch.cat(self._done)[:n]

    def __iter__(self) -> Iterator[Batch]:
        rows = itertools.chain(self._done, self._rest if self._rest is not None else self._forwards())
        buf: list[torch.Tensor] = []
        n = 0
        for x in rows:
            buf.append(x)
            n += len(x)
            while n >= self.batch_size:
                cat = torch.cat(buf)
                yield Batch({self.key: cat[: self.batch_size]}, torch.zeros(0, dtype=torch.int64), None)
                buf, n = [cat[self.batch_size :]], n - self.batch_size

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError("the on-the-fly source cannot resume")


def captured_dim(model) -> int:
    return int(model.config.hidden_size)


LAYER = 15


def on_the_fly_run(
    model, arch, windows, member: MemberConfig, loop: LoopConfig, tokens: int, out: Path
) -> dict:
    """One member trained from the model's activations, the way a trainer without a cache runs."""
    t0, c0 = time.perf_counter(), time.process_time()
    plan = plan_member(member, captured_dim(model), out / "sae")
    src = OnTheFlySource(model, arch, windows, LAYER, loop.batch_size)
    sample = src.take_sample(loop.norm_sample_tokens)
    trainer = Trainer([plan], loop, src, out, tokens, device="cpu")
    trainer.start({src.key: sample})
    result = trainer.run()
    return {
        "member": plan.name,
        "seconds": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "forward_s": src.forward_s,
        "steps": result.step,
        "tokens": result.tokens,
    }


# ---- helpers ------------------------------------------------------------------------------------------------
def machine() -> str:
    name = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    return f"{os.cpu_count()} CPUs, {name.split(':', 1)[-1].strip()}, torch {torch.__version__}, {platform.python_version()}"


def loadavg() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def members() -> list[MemberConfig]:
    return [
        MemberConfig(variant=v, layer=LAYER, site=SITE, width=WIDTH, l0_target=k)
        for v in VARIANTS
        for k in L0S
    ]


def sweep_cfg(store: Path, loop: LoopConfig, variants=VARIANTS, l0s=L0S) -> sw.SweepConfig:
    return sw.SweepConfig(
        store=str(store), variants=tuple(variants), layers=(LAYER,), sites=(SITE,), l0_targets=tuple(l0s),
        widths=(WIDTH,), loop=loop,
    )  # fmt: skip


def timed_sweep(cfg: sw.SweepConfig, out: Path, tokens: int) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    prep = sw.prepare_sweep(cfg, out, tokens=tokens, device="cpu", overwrite=True)
    sw.start_training(prep)
    t1 = time.perf_counter()
    result = prep.trainer.run()
    t2 = time.perf_counter()
    return {
        "members": [p.name for p in prep.plans],
        "seconds": t2 - t0,
        "cpu_s": time.process_time() - c0,
        "setup_s": t1 - t0,
        "train_s": t2 - t1,
        "wait_s": prep.reader.wait_seconds,
        "steps": result.step,
        "tokens": result.tokens,
    }


def warm_up() -> None:
    """One small SAE step and optimizer first, so that no measured run pays the first-call costs (oneDNN, lazy
    imports: the first torch.optim.Adam imports torch._dynamo, 2.3 s, which the first timed run used to pay)."""
    sae = get_variant("topk")(plan_member(MemberConfig(width="64"), 32, "/nonexistent").sae_cfg)
    sae.init_from_data(torch.randn(256, 32))
    sae.training_loss(torch.randn(256, 32), StepState(0, 1, 0.0)).loss.backward()
    torch.optim.Adam(sae.parameters()).step()


# ---- (c) batching ----------------------------------------------------------------------------------------------
def bench_batching(store: Path, loop: LoopConfig, reps: int) -> dict:
    from sae_cli import data

    st = data.open_store(store)
    train_range, _ = data.split(st, loop.eval_tokens)
    x = data.sample(st, [(LAYER, SITE)], LoopConfig(norm_sample_tokens=loop.batch_size), train_range)
    x_BD = x[(LAYER, SITE)]
    x_BD = x_BD * input_scale(x_BD)
    d = st.d_model
    out = {}
    for variant in VARIANTS:
        saes = []
        for k in L0S:
            opts = {"decoder_norm": "unit"} if variant == "topk" else {}  # the batched TopK step is unit-norm
            member = MemberConfig(variant=variant, width=WIDTH, l0_target=k, options=opts)
            plan = plan_member(member, d, "/nonexistent")
            sae = get_variant(variant)(plan.sae_cfg)
            sae.init_from_data(x_BD)
            saes.append(sae)
        coefs = [0.002, 0.001]
        dead = torch.zeros(len(saes), saes[0].cfg.d_sae, dtype=torch.bool)
        p = stack_params(saes)

        def loop_step(saes=saes, coefs=coefs, dead=dead):
            for m, sae in enumerate(saes):
                sae.zero_grad(set_to_none=True)
                sae.training_loss(x_BD, StepState(0, 100, coefs[m], dead_F=dead[m])).loss.backward()

        def batched_step(saes=saes, coefs=coefs, dead=dead, p=p, variant=variant):
            for t in p.values():
                t.grad = None
            if variant == "topk":
                g = topk_group_loss(p, x_BD, [s.k for s in saes], dead, k_aux=saes[0].k_aux)
            else:
                g = jumprelu_group_loss(p, x_BD, torch.tensor(coefs), saes[0].opts.bandwidth)
            g.loss.backward()

        W = [s.W_enc_FD.detach() for s in saes]
        W_MFD = torch.stack(W)

        def mm_loop(W=W):
            for w in W:
                x_BD @ w.T

        def bmm(W_MFD=W_MFD):
            torch.bmm(x_BD.expand(W_MFD.shape[0], -1, -1), W_MFD.transpose(1, 2))

        out[variant] = interleaved(
            {"loop": loop_step, "batched": batched_step, "mm_x2": mm_loop, "bmm": bmm}, reps
        )
    return out


def interleaved(fns: dict, reps: int) -> dict:
    """Median and min seconds of each function, run in turn (`reps` rounds after a warm-up round)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps + 1):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            if r:
                times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v)} for k, v in times.items()}


# ---- main -------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20480, help="Tokens harvested (the store; 10 %% held out).")
    ap.add_argument("--train-tokens", type=int, default=16384, help="Training tokens of every run.")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--parts", default="a,b,c")
    ap.add_argument("--reps", type=int, default=5, help="Rounds of the batching measurement (c).")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_sweep"))
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "store"
    loop = LoopConfig(batch_size=args.batch_size, log_every=1000)
    T = args.train_tokens
    res: dict = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "args": vars(args) | {"work": str(args.work)},
    }
    res["loadavg_start"] = loadavg()
    print(f"# bench_sweep: {res['machine']}; load average {res['loadavg_start']}", flush=True)

    cfg = HarvestConfig(
        model="smollm2-135m", layers=str(LAYER), sites=SITE, tokens=args.tokens, context=args.context, dtype="bf16",
        device="cpu", batch_size=8,
    )  # fmt: skip
    plan = plan_harvest(cfg)
    model = None
    if "a" in parts or not store.exists():
        t0 = time.perf_counter()
        model = load_model(plan.source, "cpu", torch.float32)
        res["model_load_s"] = time.perf_counter() - t0
        print(f"model load {res['model_load_s']:.1f} s (left out of every figure)", flush=True)
        warm_up()
        t0, c0 = time.perf_counter(), time.process_time()
        h = run_harvest(plan, store, overwrite=True, model=model)
        res["harvest_s"] = time.perf_counter() - t0
        res["harvest_cpu_s"] = time.process_time() - c0
        res["harvest_tokens"] = h.tokens_committed
        print(
            f"harvest {h.tokens_committed} tokens (layer {LAYER} {SITE}) {res['harvest_s']:.1f} s", flush=True
        )

    # The sweep runs between the solo runs (b), so that a drifting machine load biases neither side.
    runs = [(v, k) for v in VARIANTS for k in L0S] if "b" in parts else []
    order = runs[:2] + [None] + runs[2:] if parts & {"a", "b"} else []
    res["solo"] = []
    for run in order:
        if run is None:
            res["sweep"] = timed_sweep(sweep_cfg(store, loop), args.work / "sweep", T)
            print(f"sweep of 4: {res['sweep']}", flush=True)
            if "b" in parts:  # what running the members concurrently (one intra-op thread each) buys
                seq = dataclasses.replace(loop, member_threads=False)
                res["sweep_sequential"] = timed_sweep(sweep_cfg(store, seq), args.work / "sweep-seq", T)
                print(f"sweep of 4, members one after another: {res['sweep_sequential']}", flush=True)
        else:
            r = timed_sweep(
                sweep_cfg(store, loop, (run[0],), (run[1],)), args.work / f"solo-{run[0]}-{run[1]:g}", T
            )
            res["solo"].append(r)
            print(f"solo: {r}", flush=True)
    if "b" in parts:
        res["b_ratio"] = res["sweep"]["seconds"] / sum(r["seconds"] for r in res["solo"])
        res["b_ratio_cpu"] = res["sweep"]["cpu_s"] / sum(r["cpu_s"] for r in res["solo"])
        res["b_wait_share"] = res["sweep"]["wait_s"] / res["sweep"]["train_s"]

    if "a" in parts:
        windows = list(itertools.islice(
            corpus_windows(cfg.dataset, plan.tokenizer, plan.rule, cfg.context, cfg.text_field), plan.n_windows
        ))  # fmt: skip
        res["on_the_fly"] = []
        for m in members():
            out = args.work / f"otf-{m.variant}-{m.l0_target:g}"
            r = on_the_fly_run(model, plan.arch, windows, m, loop, T, out)
            res["on_the_fly"].append(r)
            print(f"on the fly: {r}", flush=True)
        ours = res["harvest_s"] + res["sweep"]["seconds"]
        theirs = sum(r["seconds"] for r in res["on_the_fly"])
        res["a_ratio"] = ours / theirs
        ours_cpu = res["harvest_cpu_s"] + res["sweep"]["cpu_s"]
        res["a_ratio_cpu"] = ours_cpu / sum(r["cpu_s"] for r in res["on_the_fly"])

    if "c" in parts:
        res["batching"] = bench_batching(store, loop, args.reps)
        print(f"batching: {json.dumps(res['batching'])}", flush=True)

    res["loadavg_end"] = loadavg()
    (args.work / "bench_sweep.json").write_text(json.dumps(res, indent=1))
    report(res)


def report(res: dict) -> None:
    print(f"\nmachine: {res['machine']}; load average {res['loadavg_start']} -> {res['loadavg_end']}")
    if "a_ratio" in res:
        otf = res["on_the_fly"]
        print("\n| (a) | wall s | CPU s |\n| --- | --- | --- |")
        print(
            f"| harvest, layer {LAYER} {SITE}, {res['harvest_tokens']} tokens | {res['harvest_s']:.1f} | {res['harvest_cpu_s']:.1f} |"
        )
        print(
            f"| one sweep of 4 from the store (setup + training) | {res['sweep']['seconds']:.1f} | {res['sweep']['cpu_s']:.1f} |"
        )
        ours = (res["harvest_s"] + res["sweep"]["seconds"], res["harvest_cpu_s"] + res["sweep"]["cpu_s"])
        print(f"| **ours: harvest + sweep** | **{ours[0]:.1f}** | **{ours[1]:.1f}** |")
        for r in otf:
            print(
                f"| on the fly: {r['member']} (forward {r['forward_s']:.1f} s wall) | {r['seconds']:.1f} | {r['cpu_s']:.1f} |"
            )
        theirs = (sum(r["seconds"] for r in otf), sum(r["cpu_s"] for r in otf))
        print(f"| **on the fly, 4 runs** | **{theirs[0]:.1f}** | **{theirs[1]:.1f}** |")
        print(f"| **ratio ours / on the fly** | **{res['a_ratio']:.2f}** | **{res['a_ratio_cpu']:.2f}** |")
    if "b_ratio" in res:
        print("\n| (b) | wall s | CPU s | waiting for data |\n| --- | --- | --- | --- |")
        s = res["sweep"]
        share = f"{s['wait_s']:.1f} s = {100 * res['b_wait_share']:.1f} % of training"
        print(
            f"| one sweep of 4 (members concurrent, 1 thread each) | {s['seconds']:.1f} | {s['cpu_s']:.1f} | {share} |"
        )
        if "sweep_sequential" in res:
            q = res["sweep_sequential"]
            print(
                f"| one sweep of 4, members one after another | {q['seconds']:.1f} | {q['cpu_s']:.1f} | {q['wait_s']:.1f} s |"
            )
        for r in res["solo"]:
            print(f"| solo {r['members'][0]} | {r['seconds']:.1f} | {r['cpu_s']:.1f} | {r['wait_s']:.1f} s |")
        print(
            f"| **ratio sweep / 4 solo runs** | **{res['b_ratio']:.2f}** | **{res['b_ratio_cpu']:.2f}** | |"
        )
    if "batching" in res:
        print("\n| (c) step of 2 equal-shape members | loop | batched | encoder 2 x mm | 1 x bmm |")
        print("| --- | --- | --- | --- | --- |")
        for v, t in res["batching"].items():
            cells = " | ".join(
                f"{1000 * t[k]['median_s']:.0f} ms" for k in ("loop", "batched", "mm_x2", "bmm")
            )
            print(f"| {v} (median) | {cells} |")


if __name__ == "__main__":
    main()
