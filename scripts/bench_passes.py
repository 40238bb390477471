"""CPU training passes with a fast path against what ran before it, same inputs, interleaved:

- dense steps at init (about half the latents active): JumpReLU, ReLU, Gated, forward + backward of
  `training_loss` (kernels/threshold_dense.py);
- the exact L0 shift over a [B, F] margin (`l0_control.exact_shift`, the final trim; the selection
  over `kernels.top_candidates`);
- AuxK over 48 % dead latents, forward + backward (`_common.aux_residual_loss` through the TopK encoder kernel).

    python scripts/bench_passes.py [--batch 4096] [--d-in 576] [--d-sae 4608] [--reps 5] [--threads 2]

Median (min) milliseconds per call, before (the eager reference, or for AuxK its previous form) and now;
results in docs/benchmarks.md ("Kernels").
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from sae_cli.config import MemberConfig
from sae_cli.l0_control import exact_shift
from sae_cli.registry import get_variant
from sae_cli.trainer import plan_member
from sae_cli.variants import _common as C
from sae_cli.variants.base import StepState


def step_fn(variant: str, x_BD: torch.Tensor, d_sae: int) -> Callable[[], None]:
    plan = plan_member(MemberConfig(variant=variant, width=str(d_sae), l0_target=32), x_BD.shape[1], "/none")
    torch.manual_seed(0)
    sae = get_variant(variant)(plan.sae_cfg)
    sae.init_from_data(x_BD)
    state = StepState(0, 100, 1e-3, dead_F=torch.zeros(d_sae, dtype=torch.bool))

    def run() -> None:
        sae.zero_grad(set_to_none=True)
        sae.training_loss(x_BD, state).loss.backward()

    return run


def aux_fn(
    x_BD: torch.Tensor, d_sae: int, dead_share: float = 0.48, dense_backward: bool = False
) -> Callable[[], None]:
    g = torch.Generator().manual_seed(1)
    d = x_BD.shape[1]
    W_enc = (torch.randn(d_sae, d, generator=g) / d**0.5).requires_grad_(True)
    W_dec = (torch.randn(d_sae, d, generator=g) / d**0.5).requires_grad_(True)
    b_enc = torch.zeros(d_sae, requires_grad=True)
    dead = torch.rand(d_sae, generator=g) < dead_share
    res = torch.randn(x_BD.shape, generator=g)

    def run() -> None:
        if (
            dense_backward
        ):  # the form before 2026-11-22: a dense encoder over the dead rows, autograd backward
            idx_E = dead.nonzero().squeeze(-1)
            pre_BE = torch.relu(x_BD @ W_enc[idx_E].T + b_enc[idx_E])
            vals, local = pre_BE.topk(d // 2, dim=-1, sorted=False)
            C._residual_fvu(idx_E[local], vals, W_dec, res).backward()
        else:
            C.aux_residual_loss(x_BD, W_enc, b_enc, W_dec, dead, res, d // 2).backward()

    return run


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - t0)


def with_kernels(mode: str, fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        os.environ["SAE_KERNELS"] = mode
        try:
            fn()
        finally:
            os.environ.pop("SAE_KERNELS", None)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument(
        "--aux-batch", type=int, default=1024, help="Batch of the AuxK pass (part (b) of the sweeps)."
    )
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x_BD = torch.randn(args.batch, args.d_in, generator=g) / args.d_in**0.5
    margin_BF = torch.randn(args.batch, args.d_sae, generator=g)
    aux_x = x_BD[: args.aux_batch]
    # (name, (before, now)): before = the eager reference (SAE_KERNELS=eager) or the previous form
    cases: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}
    for variant in ("jumprelu", "relu", "gated"):
        step = step_fn(variant, x_BD, args.d_sae)
        cases[f"{variant} step at init, batch {args.batch} (eager reference)"] = (
            with_kernels("eager", step),
            step,
        )
    shift = lambda: exact_shift(margin_BF, 32.0)  # noqa: E731
    cases[f"exact L0 shift (target 32), [{args.batch}, {args.d_sae}] (full kthvalue)"] = (
        with_kernels("eager", shift),
        shift,
    )
    cases[f"AuxK, 48 % dead, k_aux {args.d_in // 2}, batch {args.aux_batch} (dense encoder backward)"] = (
        aux_fn(aux_x, args.d_sae, dense_backward=True),
        aux_fn(aux_x, args.d_sae),
    )
    print(
        f"# {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, d_in {args.d_in}, d_sae {args.d_sae}; load average {os.getloadavg()[0]:.1f}"
    )
    print("\n| pass (before) | before ms | now ms | speed-up |\n| --- | --- | --- | --- |")
    for name, fns in cases.items():
        times: list[list[float]] = [[], []]
        for r in range(args.reps + 1):
            for i, fn in enumerate(fns):
                t = timed(fn)
                if r:  # round 0 warms up
                    times[i].append(t)
        b, n = statistics.median(times[0]), statistics.median(times[1])
        print(
            f"| {name} | {b:.0f} ({min(times[0]):.0f}) | {n:.0f} ({min(times[1]):.0f}) | {b / n:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
