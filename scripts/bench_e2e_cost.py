"""The cost of one end-to-end step from the cache against the whole model's forward + backward, same tokens,
interleaved in one process (issue: e2e SAEs; aim: at most the share of layers after L plus the LM head).

Contenders, on the same batch of whole windows of the store (layer L resid_post, a TopK SAE at L0 32):
- `ours`: what `sae train --objective e2e` does per member and step: SAE forward, blocks L+1.. from the stored
  residual with the reconstruction spliced in, the chunked KL against the clean distribution (from the store's
  last-layer resid_post when it holds it: final norm + head only, else one no-grad tail pass), backward to the
  SAE, Adam step;
- `lm_train_step`: the literal whole-model forward + backward: the LM loss with weight gradients;
- `full`: one forward + backward of the whole model on the same tokens with the same SAE spliced in at layer L
  by a hook (model frozen, gradient to the SAE only), the same chunked KL against the same clean distribution,
  Adam step: what an implementation that runs the whole model does at least (e2e_sae and sparsify also run a
  clean whole-model forward per step, `full+clean`).

    python scripts/bench_e2e_cost.py --store stores/demo --layer 15 [--windows 4] [--reps 5] [--threads 2]

Prints one JSON line of medians (seconds per step) and the ratios; docs/benchmarks.md records them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from actcache.models import load_store_model, store_arch
from actcache.reader import iter_windows
from actcache.sites import find_blocks, hook_site
from actcache.store import Store
from actcache.tail import Tail
from sae_cli.config import MemberConfig
from sae_cli.e2e import E2EBatch, E2EObjective, SiteTail, chunked_kl, kl_chunk_positions
from sae_cli.objective import ObjectiveContext
from sae_cli.registry import get_variant
from sae_cli.trainer import input_scale, plan_member
from sae_cli.variants.base import StepState


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="stores/demo")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--width", default="8x")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = Store.open(args.store)
    key = (args.layer, "resid_post")
    model = load_store_model(store.spec, "cpu")
    model.requires_grad_(False)
    arch = store_arch(store.spec)
    n_layers = len(find_blocks(model, arch))
    keys = [key] + ([(n_layers - 1, "resid_post")] if n_layers - 1 in store.spec.layers else [])
    wb = next(iter(iter_windows(store, keys, (0, store.committed_tokens), windows=args.windows)))
    batch = E2EBatch.of(wb, [key])
    x_raw = batch.acts[key].float()
    c = input_scale(x_raw)
    plan = plan_member(MemberConfig(variant="topk", width=args.width, l0_target=32), store.d_model, "/none")
    torch.manual_seed(0)
    sae = get_variant("topk")(plan.sae_cfg)
    sae.init_from_data(x_raw * c)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    objective = E2EObjective({key: SiteTail(Tail(model, arch, args.layer), key)}, vocab=vocab)
    ctx = ObjectiveContext(key, c, batch, 0)
    state = StepState(0, 100, 0.0, objective=objective, context=ctx)
    tail = objective.tails[key]
    clean = objective.clean(batch, key)  # computed once: cached per batch, as in training

    def ours() -> None:
        out = sae.training_loss(x_raw * c, state)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    ids = wb.token_ids.long()
    train, target = batch.train_WC, batch.target_WC1
    block = find_blocks(model, arch)[args.layer]
    chunk = kl_chunk_positions(vocab)

    def full() -> None:
        x_hat = sae(x_raw * c) / c

        def swap(x: torch.Tensor) -> torch.Tensor:
            out = x.clone()
            out[train] = x_hat.to(out.dtype)
            return out

        handle = hook_site(block, arch, "resid_post", swap, replace=True)
        try:
            h = model.model(input_ids=ids).last_hidden_state  # blocks 0..n-1 + final norm
        finally:
            handle.remove()
        n = int(target.sum())
        kl = chunked_kl(h[:, :-1][target], clean.ref_ND, tail.head, clean.ref_head, chunk) / n
        opt.zero_grad(set_to_none=True)
        kl.backward()
        opt.step()

    @torch.no_grad()
    def clean_pass() -> None:
        model(input_ids=ids)

    params = [p for p in model.parameters()]

    def lm_step() -> None:  # the literal "forward + backward of the whole model": LM loss, weight gradients
        for p in params:
            p.requires_grad_(True)
        try:
            model(input_ids=ids, labels=ids).loss.backward()
        finally:
            for p in params:
                p.grad = None
                p.requires_grad_(False)

    timed: dict[str, Callable[[], None]] = {
        "ours": ours, "full": full, "clean_forward": clean_pass, "lm_train_step": lm_step,
    }  # fmt: skip
    for fn in timed.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in timed}
    for _ in range(args.reps):
        for name, fn in timed.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    share = (n_layers - 1 - args.layer) / n_layers
    print(
        json.dumps(
            {
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                f"{args.threads} threads",
                "store": str(store.path),
                "layer": args.layer,
                "n_layers": n_layers,
                "tokens": int(ids.numel()),
                "clean_from_store": (n_layers - 1, "resid_post") in wb.acts,
                "median_s": med,
                "min_s": {k: min(v) for k, v in times.items()},
                "ours_over_full": med["ours"] / med["full"],
                "ours_over_full_plus_clean": med["ours"] / (med["full"] + med["clean_forward"]),
                "ours_over_lm_train_step": med["ours"] / med["lm_train_step"],
                "blocks_after_L_share": share,
            }
        )
    )


if __name__ == "__main__":
    main()
