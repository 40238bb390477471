"""Whole context windows from an activation store: in store order (`iter_windows`, evaluation) or shuffled by
window (`WindowReader`, training on objectives that run the LM, such as the end-to-end KL).

WindowReader, deterministic for a seed:
  1. epoch e permutes the whole windows of the token range with rng(seed, e); rank r takes every world_size-th
     window of that permutation (disjoint, covering window sets, the same permutation on every rank);
  2. the rank's stream is the concatenation of its epochs (loop=True; a new order every epoch) cut into batches
     of `windows` windows; a batch may span an epoch boundary;
  3. a batch's windows are decoded by `threads` worker threads (each store chunk once per batch) while the
     previous batch is consumed.
The position is (epoch, offset into the rank's windows of that epoch): state_dict/load_state_dict resume the
exact same sequence of batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actcache.codecs import from_stored
from actcache.readutil import Key, as_range, check_keys, open_store
from actcache.store import Store, StoreError, acts_key


@dataclass
class WindowBatch:
    """Whole context windows in store order."""

    acts: dict[Key, torch.Tensor]
    """(layer, site) -> [n_windows, context, d_model]."""
    token_ids: torch.Tensor
    """[n_windows, context] int64."""
    flags: torch.Tensor
    """[n_windows, context] uint8 (bit 0 BOS, bit 1 pad)."""
    start: int
    """Global token index of the first window's first token."""

    @property
    def index(self) -> torch.Tensor:
        """[n_windows, context] int64 global token index of every token (as in `Windows`)."""
        return self.start + torch.arange(self.token_ids.numel(), dtype=torch.int64).reshape(
            self.token_ids.shape
        )


@dataclass
class Windows:
    """Whole context windows in shuffled order (a `WindowReader` batch)."""

    acts: dict[Key, torch.Tensor]
    """(layer, site) -> [n_windows, context, d_model] in the requested dtype."""
    token_ids: torch.Tensor
    """[n_windows, context] int64."""
    flags: torch.Tensor
    """[n_windows, context] uint8 (bit 0 BOS, bit 1 pad)."""
    index: torch.Tensor
    """[n_windows, context] int64 global token index of every token."""
    window: torch.Tensor
    """[n_windows] int64 global window index (window w holds tokens w*context .. (w+1)*context - 1)."""


class WindowReader:
    """Batches of `windows` whole context windows, shuffled by window; see the module docstring."""

    def __init__(
        self,
        store: Store,
        keys: Sequence[Key],
        windows: int,
        *,
        seed: int = 0,
        token_range: tuple[int, int] | range | None = None,
        rank: int = 0,
        world_size: int = 1,
        loop: bool = True,
        threads: int = 2,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.store = open_store(store)
        self.keys = check_keys(self.store, keys)
        if windows <= 0 or threads <= 0:
            raise StoreError("windows and threads must be positive")
        if not 0 <= rank < world_size:
            raise StoreError(f"rank {rank} must be in [0, world_size={world_size})")
        self.windows, self.seed, self.rank, self.world_size = windows, seed, rank, world_size
        self.loop, self.threads, self.dtype = loop, threads, dtype
        self._set_range(as_range(self.store, token_range))
        self.epoch = self.offset = 0
        self.windows_consumed = 0
        self.wait_seconds = 0.0

    def _set_range(self, token_range: tuple[int, int]) -> None:
        self.token_range = token_range
        ctx = self.store.spec.context
        lo, hi = token_range
        # Only windows that lie entirely inside the range (as iter_windows).
        self.first_window, self.end_window = math.ceil(lo / ctx), hi // ctx
        n = self.end_window - self.first_window
        if n < self.world_size:
            raise StoreError(
                f"{max(n, 0)} whole windows of {ctx} tokens in token range {lo}..{hi} cannot be shared by "
                f"{self.world_size} rank(s)"
            )

    @property
    def n_windows(self) -> int:
        """Whole windows in the token range (all ranks)."""
        return self.end_window - self.first_window

    # -- position -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch yielded; load_state_dict continues the same sequence."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "windows_consumed": self.windows_consumed,
            "seed": self.seed,
            "token_range": list(self.token_range),
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("seed", "rank", "world_size"):
            if state[name] != getattr(self, name):
                raise StoreError(
                    f"reader state has {name}={state[name]} but this reader has {getattr(self, name)}; "
                    "resume with the same reader settings"
                )
        # The range is part of the sequence: a store that grew since keeps the range of the checkpoint.
        self._set_range(as_range(self.store, state["token_range"]))
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.windows_consumed = int(state["windows_consumed"])

    # -- plan -----------------------------------------------------------------------------------------------

    def epoch_windows(self, epoch: int) -> np.ndarray:
        """This rank's global window indices of an epoch, in reading order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows) + self.first_window
        return order[self.rank :: self.world_size]

    def _plan(self, epoch: int, offset: int) -> Iterator[tuple[np.ndarray, int, int]]:
        """(window indices of a batch, epoch and offset just after it), from position (epoch, offset)."""
        parts: list[np.ndarray] = []
        n = 0
        order = self.epoch_windows(epoch)
        while True:
            if offset >= len(order):
                if not self.loop:
                    break
                epoch, offset = epoch + 1, 0
                order = self.epoch_windows(epoch)
            take = min(self.windows - n, len(order) - offset)
            parts.append(order[offset : offset + take])
            n, offset = n + take, offset + take
            if n == self.windows:
                yield np.concatenate(parts), epoch, offset
                parts, n = [], 0
        if n:
            yield np.concatenate(parts), epoch, offset

    # -- loading --------------------------------------------------------------------------------------------

    def _load(self, wins: np.ndarray, pool: ThreadPoolExecutor) -> Windows:
        spec, store = self.store.spec, self.store
        ctx, ct = spec.context, spec.chunk_tokens
        names = ["token_ids", "flags", *(acts_key(*key) for key in self.keys)]
        if ct % ctx == 0:  # every window inside one chunk: decode each chunk of the batch once
            chunks = sorted({int(w) * ctx // ct for w in wins})
            decoded = dict(
                zip(chunks, pool.map(lambda c: [store.read_chunk(k, c) for k in names], chunks), strict=True)
            )

            def rows(w: int) -> list[np.ndarray]:
                c, a = w * ctx // ct, w * ctx % ct
                return [arr[a : a + ctx] for arr in decoded[c]]

            per_window = [rows(int(w)) for w in wins]
        else:  # windows larger than a chunk
            per_window = list(
                pool.map(lambda w: [store.read_raw(k, int(w) * ctx, (int(w) + 1) * ctx) for k in names], wins)
            )
        stacked = [np.stack([pw[i] for pw in per_window]) for i in range(len(names))]
        window = torch.from_numpy(wins.astype(np.int64))
        return Windows(
            acts={
                key: from_stored(a, spec.dtype, self.dtype)
                for key, a in zip(self.keys, stacked[2:], strict=True)
            },
            token_ids=torch.from_numpy(stacked[0].astype(np.int64)),
            flags=torch.from_numpy(stacked[1]),
            index=window[:, None] * ctx + torch.arange(ctx, dtype=torch.int64),
            window=window,
        )

    # -- iteration ------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Windows]:
        plan = self._plan(self.epoch, self.offset)
        with (
            ThreadPoolExecutor(self.threads, thread_name_prefix="actcache-windows") as pool,
            ThreadPoolExecutor(1, thread_name_prefix="actcache-windows-ahead") as ahead,
        ):
            nxt = next(plan, None)
            future = ahead.submit(self._load, nxt[0], pool) if nxt is not None else None
            while future is not None and nxt is not None:
                t0 = time.perf_counter()
                batch = future.result()
                self.wait_seconds += time.perf_counter() - t0
                cur, nxt = nxt, next(plan, None)
                future = ahead.submit(self._load, nxt[0], pool) if nxt is not None else None
                self.epoch, self.offset = cur[1], cur[2]
                self.windows_consumed += len(cur[0])
                yield batch


def iter_windows(
    store: Store,
    keys: Sequence[Key],
    token_range: tuple[int, int] | range | None = None,
    *,
    windows: int = 8,
    dtype: torch.dtype = torch.float32,
) -> Iterator[WindowBatch]:
    """Whole context windows in store order, `windows` at a time (the last batch may hold fewer).

    Only windows that lie entirely inside token_range and the committed tokens are returned; the range's start
    is rounded up to a window boundary. The next batch is decoded in a background thread.
    """
    store = open_store(store)
    keys = check_keys(store, keys)
    ctx = store.spec.context
    lo, hi = as_range(store, token_range)
    first, last = math.ceil(lo / ctx), hi // ctx
    spec_dtype = store.spec.dtype

    def load(w0: int) -> WindowBatch:
        w1 = min(last, w0 + windows)
        start, stop = w0 * ctx, w1 * ctx
        acts = {
            key: from_stored(store.read_raw(acts_key(*key), start, stop), spec_dtype, dtype).reshape(
                w1 - w0, ctx, -1
            )
            for key in keys
        }
        token_ids = torch.from_numpy(store.read("token_ids", start, stop).astype(np.int64)).reshape(
            w1 - w0, ctx
        )
        flags = torch.from_numpy(store.read("flags", start, stop)).reshape(w1 - w0, ctx)
        return WindowBatch(acts, token_ids, flags, start)

    starts = list(range(first, last, windows))
    with ThreadPoolExecutor(1, thread_name_prefix="actcache-windows") as pool:
        future = pool.submit(load, starts[0]) if starts else None
        for i in range(len(starts)):
            batch = future.result()
            future = pool.submit(load, starts[i + 1]) if i + 1 < len(starts) else None
            yield batch
