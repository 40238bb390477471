"""The harvest's write/commit pipeline: background shard writes (a thread pool, one task per array) and in-order
commits (one thread), with a fixed pool of shard buffers that bounds memory."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .harvest_plan import HarvestError
from .models import parse_dtype
from .stats import RunningStats
from .store import FLAG_BOS, FLAG_PAD, Store, StoreSpec, StoreWriter


@dataclass
class ShardJob:
    index: int
    start: int
    rows: int
    buffers: dict[str, torch.Tensor]
    token_arrays: dict[str, np.ndarray]
    sums: dict[str, list[torch.Tensor]]
    count: int
    events: list
    repair: bool = False
    """A committed shard written again: its bytes must equal the manifest's record (no commit)."""
    futures: list[Future] = field(default_factory=list)


class Pipeline:
    """Background writes (thread pool, one task per array) and in-order commits (one thread).

    ``slow_commit``: seconds to sleep after every commit (the crash tests' aid, so that a kill lands mid-harvest;
    injected by the app layer, actcache/cli.py, from ACTCACHE_SLOW_COMMIT_S)."""

    def __init__(
        self,
        writer: StoreWriter,
        store: Store,
        spec: StoreSpec,
        inflight: int,
        workers: int,
        slow_commit: float = 0.0,
        stage: Callable[[int, int, dict[str, RunningStats]], None] | None = None,
    ) -> None:
        """``stage(shard, rows, stats)``: instead of committing, hand each finished shard on (a multi-process
        harvest: actcache/staging.py; rank 0 commits)."""
        self.writer, self.store, self.spec, self.stage = writer, store, spec, stage
        pin = torch.cuda.is_available() and spec.harvest_config.get("device", "cpu") != "cpu"
        torch_dtype = parse_dtype(spec.dtype)
        self.free: queue.Queue = queue.Queue()
        for _ in range(inflight):
            self.free.put(
                {
                    key: torch.empty((spec.shard_tokens, spec.d_model), dtype=torch_dtype, pin_memory=pin)
                    for key in spec.acts_keys
                }
            )
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="actcache-write")
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.committed = writer.committed_tokens
        self.repaired = 0
        self.bytes_raw = self.bytes_disk = 0
        self.slow_commit = float(slow_commit)
        self.committer = threading.Thread(target=self._commit_loop, name="actcache-commit", daemon=True)
        self.committer.start()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def acquire(self) -> dict[str, torch.Tensor]:
        """A free shard buffer (blocks while every buffer is being written)."""
        while True:
            self._check()
            try:
                return self.free.get(timeout=0.2)
            except queue.Empty:
                continue

    def submit(self, job: ShardJob) -> None:
        self._check()
        shard = job.index
        for key in self.spec.acts_keys:
            job.futures.append(
                self.pool.submit(self._write, shard, job.start, key, job.buffers[key][: job.rows], job)
            )
        job.futures.append(self.pool.submit(self._write_tokens, job))
        self.jobs.put(job)

    def _write(self, shard: int, start: int, key: str, rows_ND: torch.Tensor, job: ShardJob) -> int:
        for event in job.events:
            event.synchronize()
        keep = None
        if self.spec.keep_bits is not None:  # the rounding error is measured on the rows the statistics count
            keep = (job.token_arrays["flags"][: job.rows] & (FLAG_BOS | FLAG_PAD)) == 0
        self.writer.write_shard(start, {key: rows_ND}, keep, durable=True)
        return self._size(key, shard)

    def _write_tokens(self, job: ShardJob) -> int:
        self.writer.write_shard(job.start, job.token_arrays, durable=True)
        return sum(self._size(k, job.index) for k in job.token_arrays)

    def _size(self, key: str, shard: int) -> int:
        return self.writer.shard_bytes(key, shard)  # recorded from the bytes written, no stat

    def _stats(self, job: ShardJob) -> dict[str, RunningStats]:
        out = {}
        for key in self.spec.acts_keys:
            if job.count == 0 or key not in job.sums:
                out[key] = RunningStats(self.spec.d_model)
                continue
            s_D, sq = (t.cpu().numpy() for t in job.sums[key])
            if not (np.isfinite(s_D).all() and np.isfinite(sq)):
                self._non_finite(job, key)
            out[key] = RunningStats(
                self.spec.d_model, count=job.count, mean=s_D / job.count, mean_sq_norm=float(sq) / job.count
            )
        return out

    def _non_finite(self, job: ShardJob, key: str) -> None:
        """HarvestError naming the array and the first token whose activation holds NaN/Inf (the statistics of
        the shard caught it: any NaN/Inf row makes them non-finite); the shard is not committed."""
        rows = job.buffers[key][: job.rows].float()
        bad = (~torch.isfinite(rows)).any(dim=1).nonzero()
        row = int(bad[0, 0]) if len(bad) else 0
        token, context = job.start + row, self.spec.context
        raise HarvestError(
            f"the model wrote NaN/Inf into {key} at store token {token} (window {token // context}, position "
            f"{token % context}); shard {job.index} was not committed, the {job.start:,} tokens before it are "
            "intact. Check the model's weights for NaN/Inf, or compute in float32 (fp16 overflows)"
        )

    def _commit_loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                disk = sum(f.result() for f in job.futures)
                if self.error is None and job.repair:
                    self.writer.confirm_repair(job.index)
                    self.repaired += 1
                elif self.error is None:
                    if self.stage is not None:
                        self.stage(job.index, job.rows, self._stats(job))
                    else:
                        self.writer.commit(job.start + job.rows, self._stats(job))
                    self.committed = self.writer.committed_tokens
                    self.bytes_raw += sum(job.buffers[k][: job.rows].nbytes for k in self.spec.acts_keys)
                    self.bytes_disk += disk
                    if self.slow_commit:
                        time.sleep(self.slow_commit)
            except BaseException as err:  # surfaced in the main thread by _check()
                self.error = self.error or err
            finally:
                self.free.put(job.buffers)

    def close(self) -> None:
        """Wait until every submitted shard is committed (or failed); raise the first error."""
        self.jobs.put(None)
        self.committer.join()
        self.pool.shutdown(wait=True)
        self._check()

    def abandon(self) -> None:
        """After a failure in the forward: stop committing, cancel the writes not yet started."""
        self.jobs.put(None)
        self.pool.shutdown(wait=True, cancel_futures=True)
