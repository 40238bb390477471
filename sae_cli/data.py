"""The store as the trainer and the evaluation see it: train/eval split, readers, the normalisation sample,
ordered evaluation batches and LM windows (on top of actcache.reader)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from actcache.reader import ActivationReader, iter_windows, split_ranges
from actcache.store import FLAG_BOS, FLAG_PAD, Store, StoreError

from .config import LoopConfig, resolve_loop
from .splice import Window

Key = tuple[int, str]
EVAL_FRACTION, EVAL_MAX_TOKENS = 0.1, 1 << 20


class DataError(Exception):
    """The store cannot serve the request (missing layer/site, too small); one line naming the fix."""


def open_store(path: str | Path) -> Store:
    try:
        return Store.open(path)
    except StoreError as e:
        raise DataError(str(e)) from None


def check_keys(store: Store, keys: list[Key]) -> None:
    """DataError naming the layers and sites the store holds when one of `keys` is missing."""
    for layer, site in keys:
        try:
            store.acts(layer, site)
        except StoreError as e:
            raise DataError(str(e)) from None


def run_identity(
    store: Store,
    ranges: tuple[tuple[int, int], ...],
    resumed: dict | None = None,
    what: str = "the run",
    fix: str = "pass that store with --store, or start a new run",
) -> dict | None:
    """The store identity a run records: at a fresh start (`resumed` None), `Store.identity` up to the end of the
    last range the run reads. Resumed (`resumed`: what the run recorded, train_config.json's "resolved" or
    sweep.json): its "store_identity" after checking that `store` is that store (DataError naming both), or None
    for a run recorded before identities existed (not checked)."""
    try:
        if resumed is None:  # the absolute path: the error on a mismatch names it wherever the run is resumed
            return {**store.identity(max(hi for _, hi in ranges)), "path": str(store.path.resolve())}
        recorded = resumed.get("store_identity")
        store.check_identity(recorded, what, fix)
        return recorded
    except StoreError as e:
        raise DataError(str(e)) from None


def check_finite(x_BD: Tensor, index_B: Tensor | None, store: Store, key: Key) -> None:
    """DataError naming the array and the store token when a batch read from `store` holds NaN/Inf."""
    ok_B = torch.isfinite(x_BD).all(dim=1)
    if bool(ok_B.all()):
        return
    bad = int((~ok_B).nonzero()[0, 0])
    where = f" at store token {int(index_B[bad])}" if index_B is not None else ""
    raise DataError(
        f"{store.path} holds NaN/Inf in acts/{key[1]}/{key[0]}{where}; run `actcache verify {store.path}`; if it "
        "passes, the model wrote them: harvest again in fp32"
    )


def default_eval_tokens(store: Store) -> int:
    """10 % of the store (at most 1M tokens), at least one window, whole windows."""
    ctx = store.spec.context
    n_windows = store.committed_tokens // ctx
    return ctx * max(1, min(EVAL_MAX_TOKENS // ctx, math.ceil(EVAL_FRACTION * n_windows)))


def split(store: Store, eval_tokens: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(train_range, eval_range): whole windows at the end of the store are held out; training never reads them."""
    try:
        return split_ranges(store, eval_tokens or default_eval_tokens(store))
    except StoreError as e:
        raise DataError(str(e)) from None


CALIBRATION_FRACTION, CALIBRATION_MAX_TOKENS = 0.1, 16384


def calibration_split(
    store: Store, train_range: tuple[int, int], loop: LoopConfig, calibrates: bool = True
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(train_range, calibration_range): whole windows held back from the end of the training range for the final
    threshold calibration (LoopConfig.calibration_tokens; the range is empty when nothing is held back). `loop`
    is resolved (tokens known). A run that reads its range more than once fits its thresholds to tokens it has
    memorised, which fire fewer latents than new ones (docs/variants.md, "Running inference thresholds").
    `calibrates`: whether any member sets a threshold at the end; when none does (TopK), the automatic rule holds
    nothing back (on the demo store the 10 % held back cost TopK 16 % of held-out FVU: docs/benchmarks.md)."""
    lo, hi = train_range
    ctx = store.spec.context
    n = loop.calibration_tokens
    if n == 0 and calibrates and loop.tokens > hi - lo:
        n = min(CALIBRATION_MAX_TOKENS, int(CALIBRATION_FRACTION * (hi - lo)))
    n_windows = math.ceil(n / ctx) if n > 0 else 0
    if n_windows and n_windows >= (hi - lo) // ctx:
        if loop.calibration_tokens:
            raise DataError(
                f"cannot hold back {loop.calibration_tokens} calibration tokens ({n_windows} windows of {ctx}) from "
                f"{(hi - lo) // ctx} training windows; lower calibration_tokens or harvest more"
            )
        n_windows = 0  # automatic on a store of one window: calibrate on the normalisation sample
    cut = hi - n_windows * ctx
    return (lo, cut), (cut, hi)


class Ranges(NamedTuple):
    train: tuple[int, int]
    calibration: tuple[int, int]
    eval: tuple[int, int]


def _range(value: object) -> tuple[int, int]:
    lo, hi = (int(v) for v in value)  # type: ignore[union-attr]
    if not 0 <= lo <= hi:
        raise ValueError(f"bad range {value!r}")
    return lo, hi


def plan_ranges(
    store: Store, loop: LoopConfig, saved: dict | None = None, calibrates: bool = True
) -> tuple[Ranges, LoopConfig]:
    """The token ranges of a run and its resolved loop (automatic batch size and length filled in). Fresh
    (`saved` None): split off the eval windows, resolve the loop on the training range, hold back the calibration
    windows. Resumed (`saved`: the run's recorded "train_range", "eval_range", "calibration_range", "batch_size",
    "tokens"): the ranges and length of the run being resumed, even if the store grew since; explicit loop
    values win."""
    if saved is not None:
        try:
            train, ev = _range(saved["train_range"]), _range(saved["eval_range"])
            calib = _range(saved.get("calibration_range", (train[1], train[1])))
            resolved = dataclasses.replace(
                loop,
                batch_size=loop.batch_size or int(saved["batch_size"]),
                tokens=loop.tokens or int(saved["tokens"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(
                f"the run's recorded token ranges are damaged ({type(e).__name__}: {e}); pass --overwrite to start "
                "over"
            ) from None
        return Ranges(train, calib, ev), resolved
    train, ev = split(store, loop.eval_tokens)
    resolved = resolve_loop(loop, train[1] - train[0])
    train, calib = calibration_split(store, train, resolved, calibrates)
    return Ranges(train, calib, ev), resolved


def calibration_sample(
    store: Store,
    keys: list[Key],
    loop: LoopConfig,
    train_range: tuple[int, int],
    calibration_range: tuple[int, int],
    norm_sample: dict[Key, Tensor] | None = None,
    *,
    finite: bool = False,
) -> dict[Key, Tensor]:
    """The tokens `Trainer` calibrates on: all of the held-back range (BOS / outlier filters as in training), or,
    when it is empty, the normalisation sample: `norm_sample` when the caller has it, else read again (`sample`
    is seeded: the same on --resume). `finite`: DataError naming the array and token at a NaN/Inf (check_finite)."""
    lo, hi = calibration_range
    if hi <= lo:
        return (
            norm_sample if norm_sample is not None else sample(store, keys, loop, train_range, finite=finite)
        )
    reader = ActivationReader(
        store,
        keys,
        8192,
        shuffle=False,
        token_range=calibration_range,
        drop_bos=loop.drop_bos,
        max_norm_ratio=_max_norm(loop),
        threads=loop.threads,
        loop=False,
    )
    parts: dict[Key, list[Tensor]] = {k: [] for k in keys}
    for batch in reader:
        for k in keys:
            if finite:
                check_finite(batch.acts[k], batch.index, store, k)
            parts[k].append(batch.acts[k])
    if not parts[keys[0]]:
        return sample(store, keys, loop, train_range, finite=finite)
    return {k: torch.cat(v) for k, v in parts.items()}


def _max_norm(loop: LoopConfig) -> float | None:
    return loop.max_norm_ratio if loop.max_norm_ratio > 0 else None


def train_reader(
    store: Store,
    keys: list[Key],
    loop: LoopConfig,
    token_range: tuple[int, int],
    rank: int = 0,
    world_size: int = 1,
) -> ActivationReader:
    """Shuffled, looping (several epochs when the run is longer than the store), seeded. Rank `rank` of
    `world_size` reads its share of the chunks and `loop.batch_size / world_size` tokens per batch."""
    if loop.batch_size % world_size:
        raise DataError(
            f"the batch of {loop.batch_size} tokens does not split over {world_size} processes; pass a --batch-size "
            f"that is a multiple of {world_size}"
        )
    return ActivationReader(
        store,
        keys,
        loop.batch_size // world_size,
        rank=rank,
        world_size=world_size,
        seed=loop.seed,
        shuffle=True,
        token_range=token_range,
        drop_bos=loop.drop_bos,
        max_norm_ratio=_max_norm(loop),
        mix_chunks=loop.mix_chunks,
        threads=loop.threads,
        loop=True,
    )


def sample(
    store: Store, keys: list[Key], loop: LoopConfig, token_range: tuple[int, int], *, finite: bool = False
) -> dict[Key, Tensor]:
    """About `norm_sample_tokens` shuffled training tokens per key (another seed than training's stream), the
    same tokens the training sees (BOS / outlier filters applied): the normalisation and init sample. `finite`:
    DataError naming the array and the store token at a NaN/Inf (check_finite) instead of a NaN scale."""
    n = loop.norm_sample_tokens
    reader = ActivationReader(
        store,
        keys,
        min(n, 8192),
        seed=loop.seed + 1_000_003,
        shuffle=True,
        token_range=token_range,
        drop_bos=loop.drop_bos,
        max_norm_ratio=_max_norm(loop),
        mix_chunks=loop.mix_chunks,
        threads=loop.threads,
        loop=False,
    )
    parts: dict[Key, list[Tensor]] = {k: [] for k in keys}
    got = 0
    for batch in reader:
        for k in keys:
            if finite:
                check_finite(batch.acts[k], batch.index, store, k)
            parts[k].append(batch.acts[k])
        got += len(batch.index)
        if got >= n:
            break
    if got == 0:
        raise DataError(
            f"no training tokens in range {token_range} of {store.path} after dropping BOS/padding"
        )
    return {k: torch.cat(v)[:n] for k, v in parts.items()}


def store_scale(store: Store, key: Key) -> float:
    """c from the store's running statistics (all tokens, BOS included: massive BOS norms make it small)."""
    msn = float(store.stats(*key)["mean_sq_norm"])
    if not math.isfinite(msn):
        raise DataError(
            f"the statistics of acts/{key[1]}/{key[0]} in {store.path} are {msn} (the data holds NaN/Inf); run "
            f"`actcache verify {store.path}`"
        )
    if not msn > 0:
        raise DataError(f"the store has no statistics for layer {key[0]} {key[1]}; use normalize = sample")
    return 1.0 / math.sqrt(msn)


def eval_batches(
    store: Store, key: Key, token_range: tuple[int, int], batch_size: int, drop_bos: bool, max_tokens: int = 0
) -> Iterator[Tensor]:
    """Held-out activations in store order (no shuffle, one pass), BOS/padding dropped as in training."""
    for x_BD, _ in indexed_eval_batches(store, key, token_range, batch_size, drop_bos, max_tokens):
        yield x_BD


def indexed_eval_batches(
    store: Store, key: Key, token_range: tuple[int, int], batch_size: int, drop_bos: bool, max_tokens: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    """`eval_batches` with each token's index in the store ([B] int64) beside its activations."""
    reader = ActivationReader(
        store, [key], batch_size, shuffle=False, token_range=token_range, drop_bos=drop_bos, loop=False
    )
    seen = 0
    for batch in reader:
        x_BD, index_B = batch.acts[key], batch.index
        check_finite(x_BD, batch.index, store, key)
        if max_tokens:
            x_BD, index_B = x_BD[: max_tokens - seen], index_B[: max_tokens - seen]
        seen += len(x_BD)
        yield x_BD, index_B
        if max_tokens and seen >= max_tokens:
            return


def lm_windows(
    store: Store, key: Key, token_range: tuple[int, int], windows: int, max_tokens: int = 0
) -> Iterator[Window]:
    """Whole held-out windows for splicing: token ids, positions to keep (BOS, padding), the stored activations."""
    seen = 0
    for wb in iter_windows(store, [key], token_range, windows=windows):
        flags = wb.flags.long()
        yield Window(
            token_ids_WT=wb.token_ids,
            keep_WT=(flags & (FLAG_BOS | FLAG_PAD)) != 0,
            valid_WT=(flags & FLAG_PAD) == 0,
            stored_WTD=wb.acts[key],
        )
        seen += wb.token_ids.numel()
        if max_tokens and seen >= max_tokens:
            return
