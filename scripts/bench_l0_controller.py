"""Where a steered variant lands under different L0-controller settings, on a real store.

Trains one variant at two L0 targets per setting, all members in one loop from the same batches (the trainer's
API, as `sae sweep`), then measures the L0 and FVU of each on held-out tokens. A setting is `name:gain:horizon`:
the factor on the controller's integral gain and its prediction horizon in steps (sae_cli/l0_control.py).

    python scripts/bench_l0_controller.py --store stores/quality --variant relu \
        --settings default:1:50,h200:1:200,g05h100:0.5:100 --targets 32,64 --tokens 1048576 --batch-size 2048

Results: docs/benchmarks.md, "Quality" (the ReLU rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

from sae_cli import data
from sae_cli.config import LoopConfig, MemberConfig, resolve_loop
from sae_cli.l0_control import L0Controller
from sae_cli.metrics import ReconstructionMetrics
from sae_cli.trainer import Trainer, plan_member


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="stores/quality")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--site", default="resid_post")
    ap.add_argument("--variant", default="relu")
    ap.add_argument("--width", default="4x")
    ap.add_argument("--settings", default="default:1:50,h200:1:200,g05h100:0.5:100")
    ap.add_argument("--targets", default="32,64")
    ap.add_argument("--tokens", type=int, default=1048576)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens measured")
    args = ap.parse_args()
    key = (args.layer, args.site)
    store = data.open_store(args.store)
    train_range, eval_range = data.split(store, 0)
    loop = resolve_loop(
        LoopConfig(batch_size=args.batch_size, tokens=args.tokens), train_range[1] - train_range[0]
    )
    settings = [(n, float(g), float(h)) for n, g, h in (s.split(":") for s in args.settings.split(","))]
    targets = [float(t) for t in args.targets.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        plans, chosen = [], []
        for name, gain, horizon in settings:
            for t in targets:
                member = MemberConfig(args.variant, key[0], key[1], args.width, t, name=f"{name}-{t:g}")
                plans.append(plan_member(member, store.d_model, Path(tmp) / member.name))
                chosen.append((gain, horizon))
        reader = data.train_reader(store, [key], loop, train_range)
        trainer = Trainer(plans, loop, reader, tmp, loop.tokens)
        trainer.start(data.sample(store, [key], loop, train_range))
        for m, (gain, horizon) in zip(trainer.members, chosen, strict=True):
            cfg = m.controller.cfg
            m.controller = L0Controller(dataclasses.replace(cfg, k_i=cfg.k_i * gain, horizon=horizon))

        def progress(p) -> None:
            if p.rows and p.step % 50 == 0:
                cells = " ".join(
                    f"{r['member']} L0 {r['l0']:.0f} lambda {r['sparsity_coef']:.2g}" for r in p.rows
                )
                print(f"step {p.step}: {cells}", flush=True)

        trainer.callback = progress
        trainer.run()
        print(
            "\n| setting | target | held-out L0 | error | FVU | dead % |\n| --- | ---: | ---: | ---: | ---: | ---: |"
        )
        for m in trainer.members:
            sae = m.sae.eval()
            met = ReconstructionMetrics(store.d_model, sae.cfg.d_sae)
            lo = eval_range[0]
            with torch.no_grad():
                for x in data.eval_batches(
                    store, key, (lo, min(eval_range[1], lo + args.eval_tokens)), 4096, True
                ):
                    x = x.float() * m.scale
                    acts = sae.encode(x)
                    met.update(x, sae.decode(acts), acts)
            r, t = met.result(), sae.cfg.l0_target
            print(
                f"| {m.plan.name} | {t:g} | {r['l0']:.2f} | {100 * (r['l0'] / t - 1):+.1f} % | {r['fvu']:.4f} | {r['dead_pct']:.2f} |"
            )


if __name__ == "__main__":
    main()
