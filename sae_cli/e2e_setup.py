"""The run path's part of the end-to-end objectives (`--objective e2e|e2e+ds`): the checks before anything is
read or built, the batch size in whole windows, and what the run builds instead of the token reader: the store's
model (loaded once, frozen), a `Tail` per SAE layer, the window reader and the `E2EObjective`
(sae_cli/e2e.py). Every refusal is a ConfigError: one line naming the fix."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from actcache.store import FLAG_PAD

from .config import ConfigError, LoopConfig, parse_layers
from .e2e import E2EObjective, WindowTokens, kl_peak_bytes

Key = tuple[int, str]
MATCH_TOLERANCE = 0.05
"""Largest relative error between the live model's activation at the SAE's site and the store's (as `sae eval`
warns): above it, the model is not the one that wrote the store."""


def is_e2e(loop: LoopConfig) -> bool:
    return loop.objective != "local"


def check(store: Any, keys: list[Key], loop: LoopConfig) -> None:
    """Before anything is read: only resid_post sites, arrays the store holds, a supported architecture, the
    downstream layers after the SAE's and inside the model."""
    if not is_e2e(loop):
        return
    from actcache.tail import SUPPORTED

    spec = store.spec
    for layer, site in keys:
        if site != "resid_post":
            raise ConfigError(
                f"--objective {loop.objective} on {site} is not built yet: train on resid_post (harvest it with "
                f"--sites resid_post) or use --objective local"
            )
        if layer not in spec.layers or site not in spec.sites:
            raise ConfigError(
                f"--objective {loop.objective} needs acts/resid_post/{layer} and {store.path} has layers "
                f"{list(spec.layers)}, sites {list(spec.sites)}; harvest it with --layers {layer} --sites resid_post"
            )
    model_type = (spec.harvest_config or {}).get("model_type")
    if model_type is not None and model_type not in SUPPORTED:
        raise ConfigError(
            f"architecture {model_type!r} is not supported by the e2e tail (supported: {', '.join(SUPPORTED)}); "
            "train it with --objective local"
        )
    ds = ds_layers(loop)
    low = min(layer for layer, _ in keys)
    for ly in ds:
        if ly <= low:
            raise ConfigError(f"--ds-layers {ly}: downstream layers must come after the SAE's layer {low}")
    if ds:
        from actcache.models import load_config, n_layers_of, resolve_model

        n_layers = n_layers_of(load_config(resolve_model(spec.model, spec.revision)))
        if max(ds) >= n_layers:
            raise ConfigError(f"--ds-layers {max(ds)} is outside the model (layers 0-{n_layers - 1})")


def ds_layers(loop: LoopConfig) -> tuple[int, ...]:
    return parse_layers(loop.ds_layers) if loop.objective == "e2e+ds" else ()


def kl_coef(loop: LoopConfig) -> float:
    """--kl-coef, else e2e_sae's: 1 (gpt2_e2e.yaml) for e2e, 0.5 (gpt2_e2e_recon.yaml) for e2e+ds."""
    if loop.kl_coef is not None:
        return float(loop.kl_coef)
    return 0.5 if loop.objective == "e2e+ds" else 1.0


def window_loop(loop: LoopConfig, context: int) -> LoopConfig:
    """Batches of whole windows: the batch size becomes a multiple of the context (at least one window)."""
    if not is_e2e(loop):
        return loop
    windows = max(1, loop.batch_size // context)
    return dataclasses.replace(loop, batch_size=windows * context)


def build(
    store: Any, keys: list[Key], loop: LoopConfig, train_range: tuple[int, int], device: torch.device
) -> tuple[WindowTokens, E2EObjective, dict[str, Any]]:
    """The store's model (loaded once, frozen: no parameter requires a gradient), a Tail per SAE layer, the
    window reader (the SAE's arrays, plus the last layer's and the downstream layers' resid_post when the store
    holds them: the clean side then comes from the store) and the objective; with a summary for the record."""
    from actcache.models import load_store_model, store_arch
    from actcache.reader import WindowReader
    from actcache.tail import Tail, TailError

    model = quiet_load(lambda: load_store_model(store.spec, str(device)))
    model.requires_grad_(False)
    arch = store_arch(store.spec)
    try:
        tails = {layer: Tail(model, arch, layer) for layer in sorted({k[0] for k in keys})}
        n_layers = next(iter(tails.values())).n_layers
    except TailError as e:
        raise ConfigError(str(e)) from None
    ds = ds_layers(loop)
    check_match(model, arch, store, keys[0], train_range)
    held = set(store.spec.layers) if "resid_post" in store.spec.sites else set()
    extra = [(ly, "resid_post") for ly in sorted({n_layers - 1, *ds} & held)]
    read = list(dict.fromkeys([*keys, *extra]))
    windows = max(1, loop.batch_size // store.spec.context)
    reader = WindowReader(store, read, windows, seed=loop.seed, token_range=train_range, loop=True)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    dtype = next(model.parameters()).dtype
    objective = E2EObjective(
        tails,
        device=device,
        dtype=dtype,
        kl_coef=kl_coef(loop),
        ds_layers=ds,
        ds_coef=loop.ds_coef,
        vocab=vocab,
    )
    summary = {
        "objective": objective.name,
        "kl_coef": objective.kl_coef,
        **({"ds_layers": list(ds), "ds_coef": objective.ds_coef} if ds else {}),
        "windows_per_batch": windows,
        "clean_from_store": [f"acts/{s}/{ly}" for ly, s in extra],
        "kl_chunk_positions": objective.chunk,
        "kl_peak_bytes": kl_peak_bytes(vocab),
        "blocks_per_step": n_layers - 1 - min(tails),
    }
    return WindowTokens(reader, keys), objective, summary


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
