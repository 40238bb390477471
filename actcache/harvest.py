"""Harvest: one forward pass per batch of windows writes every requested (layer, site) into the store.

How it works:

* Hooks on the blocks (residual sites) and on the attention/MLP sub-modules copy each site's output into a
  shard buffer (pinned, ``non_blocking`` on CUDA) in the stored dtype, and accumulate that site's statistics on
  the device (BOS and padding excluded). A last hook on the last needed module raises ``_StopForward``: the
  layers above it, the final norm and the LM head never run.
* A shard buffer holds ``shard_tokens`` rows of every array. When it is full it goes to a thread pool that
  compresses and writes each array (``StoreWriter.write_shard``); a commit thread waits for all arrays of each
  shard in order and commits them with their statistics. A fixed pool of buffers bounds memory: the forward
  blocks only when the writers are a full shard behind.
* Resume: windows are deterministic and a forward batch never spans a shard boundary, so the batches after a
  resume (which starts at the first uncommitted shard) are the same as in an uninterrupted run, and so are the
  stored bits and statistics.

The code: `actcache.harvest_plan` (HarvestConfig, plan_harvest, the output-folder checks), `actcache.capture`
(the hooks), `actcache.pipeline` (writes and commits), this module (the run loop); every public name is importable
from here.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import corpus as corpus_mod
from .byteio import open_bytes
from .capture import Capture, forward_until_stop
from .corpus import FLAG_BOS, FLAG_PAD, Window
from .dist import Dist
from .harvest_plan import (
    HarvestConfig,
    HarvestError,
    HarvestPlan,
    check_disk,
    check_out,
    check_resume,
    plan_harvest,
)
from .models import input_device, load_model, parse_dtype
from .pipeline import Pipeline, ShardJob
from .signals import sigterm_as_interrupt
from .sites import find_blocks
from .staging import Staging, fold_leftovers, resume_staged
from .store import StoreError, StoreWriter
from .view import _read_commit as read_commit

__all__ = [
    "SLOW_COMMIT_ENV",
    "HarvestConfig",
    "HarvestError",
    "HarvestInterrupted",
    "HarvestPlan",
    "HarvestProgress",
    "HarvestResult",
    "check_disk",
    "check_out",
    "check_resume",
    "forward_until_stop",
    "plan_harvest",
    "run_harvest",
]

log = logging.getLogger(__name__)

SLOW_COMMIT_ENV = "ACTCACHE_SLOW_COMMIT_S"
"""The crash tests' aid: the app layer (actcache/cli.py) reads this variable and passes its seconds to
run_harvest(slow_commit=...), which sleeps that long after every commit so that a kill lands mid-harvest. Library
code never reads the environment."""


class HarvestInterrupted(Exception):
    """Ctrl-C: every complete shard was committed; rerunning the same command resumes."""

    def __init__(self, committed_tokens: int) -> None:
        super().__init__(f"interrupted at {committed_tokens} committed tokens")
        self.committed_tokens = committed_tokens


@dataclass(frozen=True)
class HarvestProgress:
    """A snapshot for progress bars (always reported from the calling thread)."""

    tokens_done: int
    """Tokens through the forward, including those committed before a resume."""
    tokens_total: int
    tokens_start: int
    """Committed tokens when this run started (resume point)."""
    tokens_committed: int
    bytes_raw: int
    """Raw activation bytes committed by this run."""
    bytes_disk: int
    """On-disk bytes of the shards committed by this run."""
    elapsed_s: float


@dataclass(frozen=True)
class HarvestResult:
    """What a run did."""

    tokens_committed: int
    tokens_start: int
    seconds: float
    bytes_raw: int
    bytes_disk: int
    complete: bool
    repaired: int = 0
    """Committed shards the manifest did not prove, harvested again and found bit-identical to their record."""

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens_committed - self.tokens_start) / max(self.seconds, 1e-9)


# ---------------------------------------------------------------------------------------------- running


def _stack(windows: list[Window]) -> dict[str, np.ndarray]:
    return {
        "token_ids": np.concatenate([w.token_ids_C for w in windows]),
        "doc_ids": np.concatenate([w.doc_ids_C for w in windows]),
        "positions": np.concatenate([w.positions_C for w in windows]),
        "flags": np.concatenate([w.flags_C for w in windows]),
    }


def _windows_from(plan: HarvestPlan, first: int) -> Iterator[Window]:
    cfg = plan.config
    windows = corpus_mod.corpus_windows(cfg.dataset, plan.tokenizer, plan.rule, cfg.context, cfg.text_field)
    return itertools.islice(windows, first, plan.n_windows)


def _shard_windows(plan: HarvestPlan, shards: list[int]) -> Iterator[tuple[int, list[Window]]]:
    """(shard, its windows) for each shard in order; the corpus is read again only where the shards jump."""
    n_win = plan.spec.shard_tokens // plan.config.context
    windows: Iterator[Window] | None = None
    at = -1
    for shard in shards:
        if windows is not None and at < shard * n_win:  # skip ahead (a rank's share of a multi-process run)
            next(itertools.islice(windows, shard * n_win - at - 1, None), None)
            at = shard * n_win
        if windows is None or at != shard * n_win:
            at = shard * n_win
            windows = _windows_from(plan, at)
        batch = list(itertools.islice(windows, n_win))
        at += len(batch)
        yield shard, batch


def run_harvest(
    plan: HarvestPlan,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    model: nn.Module | None = None,
    progress: Callable[[HarvestProgress], None] | None = None,
    inflight: int = 2,
    workers: int | None = None,
    deep_check: bool = False,
    slow_commit: float = 0.0,
    dist: Dist | None = None,
) -> HarvestResult:
    """Harvest ``plan`` into ``out`` (new, or resumed at its last committed shard).

    ``model``: an already loaded model (else it is loaded from the plan). ``inflight`` shard buffers bound the
    memory (``inflight * shard_tokens * d_model * itemsize * arrays``). Ctrl-C raises HarvestInterrupted after
    committing every complete shard. Committed shards that the manifest does not prove (missing or resized files;
    ``deep_check``: any byte changed) are harvested again and must come out bit-identical to their record.
    ``slow_commit``: seconds to sleep after each commit (crash tests only; see SLOW_COMMIT_ENV).
    ``dist``: this process's rank in a multi-process harvest (actcache/dist.py; every rank calls this with the
    same plan): rank r forwards every world_size-th shard still to do, rank 0 commits (actcache/staging.py).
    """
    cfg, spec, dist = plan.config, plan.spec, dist or Dist()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if model is None:
        compute = parse_dtype(spec.harvest_config["compute_dtype"])
        model = load_model(plan.source, dist.device(cfg.device), compute)
    writer, todo, staged = _open(plan, out, overwrite, deep_check, dist)
    try:
        if todo is None:
            start = writer.committed_tokens
            return HarvestResult(start, start, time.perf_counter() - t0, 0, 0, True)
        workers = workers or min(4, os.cpu_count() or 1)
        run = _Run(
            plan,
            writer,
            model,
            progress,
            todo[dist.rank :: dist.world_size],
            (inflight, workers, slow_commit),
        )
        # Staged shards of a killed multi-process run are committed through the staging path, even by one process.
        run.staging = Staging(writer, dist.rank) if dist.multi or staged else None
        run.forward_all(dist)
        return run.result(t0, dist)
    finally:
        writer.close()


def _open(
    plan: HarvestPlan, out: str | os.PathLike, overwrite: bool, deep_check: bool, dist: Dist
) -> tuple[StoreWriter, list[int] | None, bool]:
    """The writer, the shards still to do and whether a killed run left staged shards to commit. Rank 0 creates or
    resumes the store (and its lock), commits what a killed run staged, keeps its staged shards beyond a gap
    (`staging.resume_staged`) and decides the shards; the other ranks then open it as it is and take its decision."""
    opened: list[StoreWriter] = []

    def decide() -> tuple[list[int] | None, list[int], bool]:
        writer = StoreWriter.create_or_resume(out, plan.spec, overwrite=overwrite)
        opened.append(writer)
        try:
            staged = resume_staged(writer)
            todo = _shards_to_do(plan, writer, deep_check)
        except BaseException:
            writer.close()
            raise
        todo = None if todo is None else [s for s in todo if s not in staged]
        return todo, sorted(writer.repairing), bool(staged)

    todo, repairing, staged = dist.run_main(decide)
    if opened:
        return opened[0], todo, staged
    io = open_bytes(out)
    writer = StoreWriter(io, plan.spec, read_commit(io))
    writer.repairing = set(repairing)
    return writer, todo, staged


def _shards_to_do(plan: HarvestPlan, writer: StoreWriter, deep_check: bool) -> list[int] | None:
    """The shards this run forwards, in order (damaged committed shards first), None when there is nothing to do;
    sets `writer.repairing`."""
    spec, start = plan.spec, writer.committed_tokens
    found = writer.damaged_shards(deep=deep_check)
    for shard, why in found:
        log.info("committed shard %d is not what the manifest records (%s); harvesting it again", shard, why)
    damaged = sorted({shard for shard, _ in found})
    writer.repairing = set(damaged)
    done_already = writer.complete or start >= spec.tokens_target
    if done_already and not damaged:
        return None
    if start % spec.shard_tokens and not done_already:
        raise StoreError(
            f"{writer.path}: committed tokens {start} are not at a shard boundary; pass --overwrite"
        )
    if done_already:
        return damaged
    n_win = spec.shard_tokens // plan.config.context
    return [*damaged, *range(start // spec.shard_tokens, math.ceil(plan.n_windows / n_win))]


class _Run:
    """One run's forward loop: shards of windows through the model into the pipeline, with progress."""

    def __init__(
        self,
        plan: HarvestPlan,
        writer: StoreWriter,
        model: nn.Module,
        progress: Callable[[HarvestProgress], None] | None,
        todo: list[int],
        pipeline_args: tuple[int, int, float],
    ) -> None:
        """``pipeline_args``: (inflight buffers, writer threads, slow_commit seconds) of the `Pipeline`."""
        self.plan, self.writer, self.model = plan, writer, model
        self.progress, self.todo = progress, todo
        spec = plan.spec
        self.start = start = writer.committed_tokens
        # Repaired shards go through the forward again: count them so that the progress ends at the total.
        self.done = start - sum(
            min(spec.shard_tokens, start - i * spec.shard_tokens) for i in sorted(writer.repairing)
        )
        self.capture = Capture(
            find_blocks(model, plan.arch), plan.arch, plan.layers, plan.sites, spec.aliases
        )
        self.device = input_device(model)
        # The store the writer opened, handed on (never opened again by path).
        self.staging: Staging | None = None
        """Several processes: each finished shard is staged for rank 0 to commit (actcache/staging.py)."""
        self.pipeline = Pipeline(writer, writer.store, spec, *pipeline_args, stage=self._stage)
        self.t_run = time.perf_counter()

    def _stage(self, shard: int, rows: int, stats: dict) -> None:
        if self.staging is None:
            self.writer.commit(shard * self.plan.spec.shard_tokens + rows, stats)
        else:
            self.staging.stage(shard, rows, stats)

    def report(self) -> None:
        if self.progress is not None:
            p = self.pipeline
            self.progress(
                HarvestProgress(
                    self.done, self.plan.spec.tokens_target, self.start, p.committed, p.bytes_raw,
                    p.bytes_disk, time.perf_counter() - self.t_run,
                )
            )  # fmt: skip

    def forward_all(self, dist: Dist) -> None:
        """Every shard to do through the model and the pipeline; commits what completed on Ctrl-C or SIGTERM.
        Several processes: when every rank is through, rank 0 commits the rest of what they staged."""
        pipeline = self.pipeline
        try:
            with torch.inference_mode(), sigterm_as_interrupt():
                for shard, batch_windows in _shard_windows(self.plan, self.todo):
                    self.forward_shard(shard, batch_windows)
            pipeline.close()
        except KeyboardInterrupt:
            log.warning("interrupted; committing the complete shards")
            pipeline.close()
            raise HarvestInterrupted(pipeline.committed) from None
        except BaseException:
            pipeline.abandon()
            raise
        finally:
            self.capture.remove()
        if self.staging is not None:
            self.meet(dist)
        self.report()

    def meet(self, dist: Dist) -> None:
        """Several processes: wait for every rank, then rank 0 commits the rest of what they staged. A rank that
        died (the barrier fails) leaves the staged shards for rank 0 to commit as far as they reach."""
        pipeline, spec = self.pipeline, self.plan.spec
        try:
            dist.barrier()
        except RuntimeError as err:  # gloo / NCCL saw a peer go
            committed = self.staging.fold() if dist.is_main and self.staging else pipeline.committed
            raise HarvestError(
                f"another process of the job stopped ({type(err).__name__}); the {committed:,} committed tokens are "
                "intact: rerun the same command (any number of processes) to resume"
            ) from None
        if dist.is_main:
            pipeline.committed = fold_leftovers(self.writer)
            if pipeline.committed < spec.tokens_target and not self.writer.complete:
                raise HarvestError(
                    f"the ranks finished but shard {pipeline.committed // spec.shard_tokens} was never staged; "
                    "rerun the same command to resume"
                )

    def forward_shard(self, shard: int, batch_windows: list[Window]) -> None:
        """One shard's windows, batch by batch, into a shard buffer; then the buffer goes to the writers."""
        cfg, spec, capture = self.plan.config, self.plan.spec, self.capture
        C = cfg.context
        token_arrays = _stack(batch_windows)
        keep_N = torch.from_numpy((token_arrays["flags"] & (FLAG_BOS | FLAG_PAD)) == 0)
        buffers = self.pipeline.acquire()
        capture.begin_shard(buffers)
        ids_N = torch.from_numpy(token_arrays["token_ids"].astype(np.int64))
        for w0 in range(0, len(batch_windows), cfg.batch_size):
            w1 = min(w0 + cfg.batch_size, len(batch_windows))
            ids_BC = ids_N[w0 * C : w1 * C].view(w1 - w0, C).to(self.device, non_blocking=True)
            capture.begin_batch(w0 * C, keep_N[w0 * C : w1 * C].float().to(self.device))
            forward_until_stop(self.model, ids_BC)
            self.done += (w1 - w0) * C
            self.report()
        events = []
        for dev in capture.devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(dev))
            events.append(event)
        job = ShardJob(
            shard, shard * spec.shard_tokens, len(batch_windows) * C, buffers, token_arrays, capture.sums,
            int(keep_N.sum()), events, repair=shard in self.writer.repairing,
        )  # fmt: skip
        self.pipeline.submit(job)

    def result(self, t0: float, dist: Dist) -> HarvestResult:
        if dist.is_main:
            self.writer.finish()
        p, seconds = self.pipeline, time.perf_counter() - t0
        log.info("harvested %d tokens in %.1f s", p.committed - self.start, seconds)
        return HarvestResult(
            p.committed, self.start, seconds, p.bytes_raw, p.bytes_disk, self.writer.complete, p.repaired
        )
