"""The run path's part of the end-to-end objectives (`--objective e2e|e2e+ds`): the checks before anything is
read or built, the batch size in whole windows, and what the run builds instead of the token reader: the store's
model (loaded once, frozen), a `Tail` per SAE layer, the window reader and the `E2EObjective`
(sae_cli/e2e.py). Every refusal is a ConfigError: one line naming the fix."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from actcache.store import FLAG_PAD

from .config import ConfigError, LoopConfig, parse_layers
from .e2e import E2EObjective, SiteTail, WindowTokens, kl_peak_bytes

Key = tuple[int, str]
MATCH_TOLERANCE = 0.05
"""Largest relative error between the live model's activation at the SAE's site and the store's (as `sae eval`
warns): above it, the model is not the one that wrote the store."""


def is_e2e(objectives: Iterable[str]) -> bool:
    return any(o != "local" for o in objectives)


def check(store: Any, plans: Sequence[Any], loop: LoopConfig) -> None:
    """Before anything is read: the arrays the tail starts from (sites.e2e_start), a supported architecture,
    the downstream layers after the SAE's and inside the model. `plans`: MemberPlans (key, objective)."""
    members = [p for p in plans if p.objective != "local"]
    if not members:
        return
    from actcache.tail import SUPPORTED

    spec = store.spec
    for p in members:
        start_key(store, p.key, p.objective)
    model_type = (spec.harvest_config or {}).get("model_type")
    if model_type is not None and model_type not in SUPPORTED:
        raise ConfigError(
            f"architecture {model_type!r} is not supported by the e2e tail (supported: {', '.join(SUPPORTED)}); "
            "train it with --objective local"
        )
    ds = ds_layers(loop, [p.objective for p in members])
    low = min(p.key[0] for p in members if p.objective == "e2e+ds") if ds else 0
    for ly in ds:
        if ly <= low:
            raise ConfigError(f"--ds-layers {ly}: downstream layers must come after the SAE's layer {low}")
    if ds:
        from actcache.models import load_config, n_layers_of, resolve_model

        n_layers = n_layers_of(load_config(resolve_model(spec.model, spec.revision)))
        if max(ds) >= n_layers:
            raise ConfigError(f"--ds-layers {max(ds)} is outside the model (layers 0-{n_layers - 1})")


def start_key(store: Any, key: Key, objective: str) -> Key:
    """The stored array the tail starts from for an SAE at `key` (e2e.SiteTail): the SAE's own array for
    resid_post and resid_pre; for mlp_out and attn_out of layer L, the residual stream before block L
    (resid_pre L, else resid_post L-1). ConfigError naming what to harvest."""
    layer, site = key
    if site in ("resid_post", "resid_pre"):
        return key
    spec = store.spec
    need = [(layer, "resid_pre")] + ([(layer - 1, "resid_post")] if layer > 0 else [])
    for ly, s in need:
        if ly in spec.layers and s in spec.sites:
            return (ly, s)
    arrays = " or ".join(f"acts/{s}/{ly}" for ly, s in need)
    raise ConfigError(
        f"--objective {objective} on {site} of layer {layer} needs {arrays} (the residual stream block {layer} "
        f"starts from) and {store.path} has layers {list(spec.layers)}, sites {list(spec.sites)}; harvest "
        f"--layers {layer} --sites resid_pre,{site}"
    )


def ds_layers(loop: LoopConfig, objectives: Iterable[str]) -> tuple[int, ...]:
    return parse_layers(loop.ds_layers) if "e2e+ds" in set(objectives) else ()


def kl_coef(loop: LoopConfig, objective: str) -> float:
    """--kl-coef, else e2e_sae's: 1 (gpt2_e2e.yaml) for e2e, 0.5 (gpt2_e2e_recon.yaml) for e2e+ds."""
    if loop.kl_coef is not None:
        return float(loop.kl_coef)
    return 0.5 if objective == "e2e+ds" else 1.0


def window_loop(loop: LoopConfig, context: int, objectives: Iterable[str]) -> LoopConfig:
    """Batches of whole windows: the batch size becomes a multiple of the context (at least one window)."""
    if not is_e2e(objectives):
        return loop
    windows = max(1, loop.batch_size // context)
    return dataclasses.replace(loop, batch_size=windows * context)


def build(
    store: Any, plans: Sequence[Any], loop: LoopConfig, train_range: tuple[int, int], device: torch.device
) -> tuple[WindowTokens, dict[str, E2EObjective], dict[str, Any]]:
    """The store's model (loaded once, frozen: no parameter requires a gradient), a Tail per SAE start, the
    window reader (every member's arrays and the arrays the tails start from, plus the last layer's and the
    downstream layers' resid_post when the store holds them: the clean side then comes from the store) and one
    objective per end-to-end objective name; with a summary for the record. Local members of the run train on
    the same window batches (their tokens: neither BOS nor padding)."""
    from actcache.models import load_store_model, store_arch
    from actcache.reader import WindowReader
    from actcache.tail import Tail, TailError

    keys = list(dict.fromkeys(p.key for p in plans))
    e2e = [p for p in plans if p.objective != "local"]
    names = sorted({p.objective for p in e2e})
    model = quiet_load(lambda: load_store_model(store.spec, str(device)))
    model.requires_grad_(False)
    arch = store_arch(store.spec)
    starts = {p.key: start_key(store, p.key, p.objective) for p in e2e}
    try:
        tails = {
            key: SiteTail(Tail(model, arch, SiteTail.start_layer(key)), key, start, arch)
            for key, start in starts.items()
        }
    except TailError as e:
        raise ConfigError(str(e)) from None
    n_layers = next(iter(tails.values())).n_layers
    ds = ds_layers(loop, names)
    check_match(model, arch, store, e2e[0].key, train_range)
    held = set(store.spec.layers) if "resid_post" in store.spec.sites else set()
    extra = [(ly, "resid_post") for ly in sorted({n_layers - 1, *ds} & held)]
    read = list(dict.fromkeys([*keys, *starts.values(), *extra]))
    windows = max(1, loop.batch_size // store.spec.context)
    reader = WindowReader(store, read, windows, seed=loop.seed, token_range=train_range, loop=True)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    dtype = next(model.parameters()).dtype
    objectives = {
        name: E2EObjective(
            tails,
            device=device,
            dtype=dtype,
            kl_coef=kl_coef(loop, name),
            ds_layers=ds if name == "e2e+ds" else (),
            ds_coef=loop.ds_coef,
            vocab=vocab,
        )
        for name in names
    }
    first = objectives[names[0]]
    summary = {
        "objectives": names,
        "kl_coef": {name: obj.kl_coef for name, obj in objectives.items()},
        **({"ds_layers": list(ds), "ds_coef": loop.ds_coef} if ds else {}),
        "windows_per_batch": windows,
        "tail_starts": {f"{s}/{ly}": f"acts/{ss}/{sl}" for (ly, s), (sl, ss) in starts.items()},
        "clean_from_store": [f"acts/{s}/{ly}" for ly, s in extra],
        "kl_chunk_positions": first.chunk,
        "kl_peak_bytes": kl_peak_bytes(vocab),
        "blocks_per_step": n_layers - 1 - min(t.tail.layer for t in tails.values()),
    }
    return WindowTokens(reader, keys), objectives, summary


def quiet_load(load: Callable[[], Any]) -> Any:
    """`load()` without transformers' progress bar (a refusal after the load stays one line)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load()
    finally:
        if was:
            hf_logging.enable_progress_bar()


@torch.no_grad()
def check_match(model: Any, arch: Any, store: Any, key: Key, token_range: tuple[int, int]) -> None:
    """One window of the training range through the whole model: its activation at the SAE's site must equal
    the store's (relative error <= MATCH_TOLERANCE), else the model is not the one that wrote the store."""
    from actcache.reader import iter_windows

    from .splice import hook_site

    wb = next(iter(iter_windows(store, [key], token_range, windows=1)), None)
    if wb is None:
        return
    device = next(model.parameters()).device
    with hook_site(model, arch, key[0], key[1], lambda x: x, None) as seen:
        model(input_ids=wb.token_ids.to(device).long())
    live, stored = seen["x"].float().cpu(), wb.acts[key].float()
    on = (wb.flags.long() & FLAG_PAD) == 0
    err = float((live - stored)[on].norm() / stored[on].norm().clamp_min(1e-30))
    if not math.isfinite(err) or err > MATCH_TOLERANCE:
        raise ConfigError(
            f"the model {store.spec.model} does not reproduce {store.path}: its acts/{key[1]}/{key[0]} differ "
            f"from the store's by {100 * err:.1f} % (relative); e2e training needs the model that wrote the store"
        )
