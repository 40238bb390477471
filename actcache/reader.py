"""Shuffled token batches from an activation store (whole windows, in order or shuffled: actcache/windows.py,
re-exported here).

Shuffled mode (ActivationReader), deterministic for a seed:
  1. epoch e permutes the store's chunks with rng(seed, e); rank r takes every world_size-th chunk of that
     permutation (disjoint, covering chunk sets, the same permutation on every rank);
  2. the rank's chunks are taken in groups of `mix_chunks`; a group is decoded by `threads` worker threads
     (zarr's codecs release the GIL) while the previous group is consumed, BOS/pad/outlier tokens are dropped
     and the kept tokens are permuted with rng(seed, e, rank, group): a mixing buffer, so one batch holds tokens
     of many windows (SAELens' mixing buffer, dictionary_learning's ActivationBuffer);
  3. the epoch's stream is the concatenation of its groups, the stream of a reader the concatenation of its
     epochs (loop=True) and batches span group and epoch boundaries.
The position is (epoch, group, offset into the group's permuted tokens): state_dict/load_state_dict resume the
exact same sequence by reloading that group and skipping `offset` tokens.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actcache.codecs import from_stored
from actcache.readutil import Key, as_range, check_keys, open_store
from actcache.store import FLAG_BOS, FLAG_PAD, Store, StoreError, acts_key
from actcache.windows import WindowBatch, WindowReader, Windows, iter_windows

log = logging.getLogger(__name__)

__all__ = [
    "ActivationReader", "Batch", "Key", "WindowBatch", "WindowReader", "Windows", "iter_windows", "split_ranges",
]  # fmt: skip


@dataclass
class Batch:
    """One shuffled batch."""

    acts: dict[Key, torch.Tensor]
    """(layer, site) -> [B, d_model] in the requested dtype."""
    token_ids: torch.Tensor
    """[B] int64 token ids."""
    index: torch.Tensor
    """[B] int64 global token index in the store."""


@dataclass
class _Group:
    """The permuted kept tokens of one group of chunks (stored dtype)."""

    epoch: int
    group: int
    acts: dict[Key, torch.Tensor]  # key -> [n, d]
    token_ids: torch.Tensor  # [n]
    index: torch.Tensor  # [n]

    def __len__(self) -> int:
        return len(self.index)


class ActivationReader:
    """Shuffled batches of one or more (layer, site) arrays; see the module docstring for the design."""

    def __init__(
        self,
        store: Store,
        keys: Sequence[Key],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        token_range: tuple[int, int] | range | None = None,
        drop_bos: bool = True,
        drop_pad: bool = True,
        max_norm_ratio: float | None = None,
        rank: int = 0,
        world_size: int = 1,
        mix_chunks: int = 64,
        threads: int = 2,
        dtype: torch.dtype = torch.float32,
        loop: bool = True,
    ) -> None:
        self.store = open_store(store)
        self.keys = check_keys(self.store, keys)
        if batch_size <= 0 or mix_chunks <= 0 or threads <= 0:
            raise StoreError("batch_size, mix_chunks and threads must be positive")
        if not 0 <= rank < world_size:
            raise StoreError(f"rank {rank} must be in [0, world_size={world_size})")
        if max_norm_ratio is not None and max_norm_ratio <= 0:
            raise StoreError(f"max_norm_ratio must be positive, got {max_norm_ratio}")
        self.batch_size, self.seed, self.shuffle, self.loop = batch_size, seed, shuffle, loop
        self.drop_bos, self.drop_pad, self.max_norm_ratio = drop_bos, drop_pad, max_norm_ratio
        self.rank, self.world_size, self.mix_chunks, self.threads = rank, world_size, mix_chunks, threads
        self.dtype = dtype
        self._set_range(as_range(self.store, token_range))
        self.epoch = self.group = self.offset = 0
        self.tokens_consumed = 0
        self.wait_seconds = 0.0

    def _set_range(self, token_range: tuple[int, int]) -> None:
        self.token_range = token_range
        ct = self.store.spec.chunk_tokens
        lo, hi = token_range
        # Chunks of the store clipped to the range: the unit of shuffling, sharding and decoding.
        self.chunks = [(max(lo, c * ct), min(hi, (c + 1) * ct)) for c in range(lo // ct, math.ceil(hi / ct))]
        if len(self.chunks) < self.world_size:
            raise StoreError(
                f"{len(self.chunks)} chunks in token range {lo}..{hi} cannot be shared by {self.world_size} ranks"
            )

    # -- position -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch yielded; load_state_dict continues the same sequence."""
        return {
            "epoch": self.epoch,
            "group": self.group,
            "offset": self.offset,
            "tokens_consumed": self.tokens_consumed,
            "seed": self.seed,
            "token_range": list(self.token_range),
            "rank": self.rank,
            "world_size": self.world_size,
            "mix_chunks": self.mix_chunks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("seed", "rank", "world_size", "mix_chunks"):
            if state[name] != getattr(self, name):
                raise StoreError(
                    f"reader state has {name}={state[name]} but this reader has {getattr(self, name)}; "
                    "resume with the same reader settings"
                )
        # The range is part of the sequence: a store that grew since keeps the range of the checkpoint.
        self._set_range(as_range(self.store, state["token_range"]))
        self.epoch, self.group, self.offset = int(state["epoch"]), int(state["group"]), int(state["offset"])
        self.tokens_consumed = int(state["tokens_consumed"])

    # -- epoch plan -----------------------------------------------------------------------------------------

    def epoch_chunks(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's chunks (start, stop) of an epoch, in reading order."""
        order = np.arange(len(self.chunks))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        return [self.chunks[i] for i in order[self.rank :: self.world_size]]

    def _n_groups(self, epoch: int) -> int:
        return math.ceil(len(self.epoch_chunks(epoch)) / self.mix_chunks)

    # -- loading --------------------------------------------------------------------------------------------

    def _load_chunk(self, chunk: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        start, stop = chunk
        c = start // self.store.spec.chunk_tokens
        a, b = start - c * self.store.spec.chunk_tokens, stop - c * self.store.spec.chunk_tokens

        def read(key: str) -> np.ndarray:
            return self.store.read_chunk(key, c)[a:b]

        # Equal keys stored once (StoreSpec.aliases) are read once.
        names = [self.store.spec.stored_key(acts_key(*key)) for key in self.keys]
        arrays = {name: read(name) for name in dict.fromkeys(names)}
        return read("flags"), read("token_ids"), [arrays[name] for name in names]

    def _load_group(self, epoch: int, group: int, pool: ThreadPoolExecutor) -> _Group:
        chunks = self.epoch_chunks(epoch)[group * self.mix_chunks : (group + 1) * self.mix_chunks]
        loaded = list(pool.map(self._load_chunk, chunks))
        index_N = np.concatenate([np.arange(a, b) for a, b in chunks])
        flags_N = np.concatenate([f for f, _, _ in loaded])
        keep_N = np.ones(len(index_N), dtype=bool)
        if self.drop_bos:
            keep_N &= (flags_N & FLAG_BOS) == 0
        if self.drop_pad:
            keep_N &= (flags_N & FLAG_PAD) == 0
        dtype = self.store.spec.dtype
        raw = {key: np.concatenate([a[i] for _, _, a in loaded]) for i, key in enumerate(self.keys)}
        if self.max_norm_ratio is not None:
            # Massive activations (Sun et al. 2024) dominate an MSE loss; dictionary_learning drops tokens whose
            # norm exceeds a multiple of the median norm of the buffer. A token goes if it is an outlier in any key.
            for raw_ND in raw.values():
                norm_N = from_stored(raw_ND, dtype, torch.float32).norm(dim=-1).numpy()
                if keep_N.any():
                    keep_N &= norm_N <= self.max_norm_ratio * np.median(norm_N[keep_N])
        kept = np.flatnonzero(keep_N)
        if self.shuffle:
            kept = kept[np.random.default_rng([self.seed, epoch, self.rank, group]).permutation(len(kept))]
        token_ids_N = np.concatenate([t for _, t, _ in loaded]).astype(np.int64)
        # np.take gathers whole rows with memcpy (~4 GB/s here, 3x torch.index_select on bf16).
        return _Group(
            epoch,
            group,
            {key: from_stored(np.take(raw_ND, kept, axis=0), dtype) for key, raw_ND in raw.items()},
            torch.from_numpy(token_ids_N[kept]),
            torch.from_numpy(index_N[kept]),
        )

    def _producer(self, out: queue.Queue, stop: threading.Event, epoch: int, group: int) -> None:
        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="actcache-read") as pool:
                produced = group > 0  # any token in this epoch (an epoch of none would loop forever)
                while not stop.is_set():
                    if group >= self._n_groups(epoch):
                        if not self.loop:
                            break
                        if not produced and group > 0:
                            raise StoreError(
                                "no tokens left in the token range after dropping BOS/pad/outliers"
                            )
                        epoch, group, produced = epoch + 1, 0, False
                        continue
                    g = self._load_group(epoch, group, pool)
                    produced = produced or len(g) > 0
                    while not stop.is_set():
                        try:
                            out.put(g, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    group += 1
        except BaseException as e:  # surfaced in the consumer
            out.put(e)
        out.put(None)

    # -- iteration ------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        out: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        thread = threading.Thread(
            target=self._producer,
            args=(out, stop, self.epoch, self.group),
            daemon=True,
            name="actcache-prefetch",
        )
        thread.start()
        pending: list[tuple[_Group, int, int]] = []  # (group, from, to) slices of the next batch
        n_pending = 0
        skip = self.offset
        try:
            while True:
                t0 = time.perf_counter()
                g = out.get()
                self.wait_seconds += time.perf_counter() - t0
                if isinstance(g, BaseException):
                    raise g
                if g is None:
                    if n_pending:
                        yield self._emit(pending, n_pending)
                    return
                pos, skip = min(skip, len(g)), 0
                if pos >= len(g):  # resumed exactly at a group's end
                    self._advance(g, len(g))
                    continue
                while pos < len(g):
                    take = min(self.batch_size - n_pending, len(g) - pos)
                    pending.append((g, pos, pos + take))
                    n_pending += take
                    pos += take
                    if n_pending == self.batch_size:
                        yield self._emit(pending, n_pending)
                        pending, n_pending = [], 0
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    out.get_nowait()
                except queue.Empty:
                    thread.join(0.05)

    def _advance(self, g: _Group, end: int) -> None:
        """Move the position to just after token `end` of group g."""
        self.epoch, self.group, self.offset = g.epoch, g.group, end
        if end >= len(g):
            self.group, self.offset = g.group + 1, 0

    def _emit(self, pending: list[tuple[_Group, int, int]], n: int) -> Batch:
        def cat(parts: list[torch.Tensor]) -> torch.Tensor:
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        acts = {key: cat([g.acts[key][a:b] for g, a, b in pending]).to(self.dtype) for key in self.keys}
        batch = Batch(
            acts, cat([g.token_ids[a:b] for g, a, b in pending]), cat([g.index[a:b] for g, a, b in pending])
        )
        last, _, end = pending[-1]
        self._advance(last, end)
        self.tokens_consumed += n
        return batch


def split_ranges(store: Store, eval_tokens: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(train_range, eval_range): the last ceil(eval_tokens / context) whole windows are held out for evaluation."""
    store = open_store(store)
    ctx = store.spec.context
    n_windows = store.committed_tokens // ctx
    n_eval = math.ceil(eval_tokens / ctx)
    if eval_tokens <= 0 or n_eval >= n_windows:
        raise StoreError(
            f"cannot hold out {eval_tokens} eval tokens ({n_eval} windows of {ctx}) from {n_windows} committed "
            "windows; lower the eval tokens or harvest more"
        )
    split = (n_windows - n_eval) * ctx
    return (0, split), (split, n_windows * ctx)
