"""Members of a sweep stepping through the same batches on a few threads, without a barrier per step.

`Lanes` runs `step(i, t, batch)` for every member i and every batch t pushed to it: each member's steps in order and
one at a time (a member is never on two threads), different members concurrently on `workers` threads. A free
thread takes the member that is furthest behind (ties: the one whose last step took longest), so members stay
within a few batches of each other and no thread waits for the slowest member at every step, as a barrier per step
makes it wait (docs/benchmarks.md, "Sweeps": 4-8 % of a 2-thread sweep's time was spent at the barriers). The
caller pushes batches as they are read; `push` blocks while the slowest member is `depth` batches behind, and
`drain` waits until every member has run every pushed batch: the points where the caller needs all members at the
same step (logs, checkpoints, the end).

A step that raises stops the lanes: the threads finish the steps they are in and take no more; `push` and `drain`
then raise `LaneFailure` with the member, the step and the exception. Other members may have run past that step
by then (up to `depth` - 1 batches): `done` tells how far each got, and `catch_up` brings those behind up to it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class LaneFailure(Exception):
    """A member's step raised: `member`, `step` (0-based, not applied) and the exception (`__cause__`)."""

    def __init__(self, member: int, step: int, error: BaseException) -> None:
        super().__init__(f"member {member} failed at step {step}: {error}")
        self.member, self.step, self.error = member, step, error


class Lanes:
    """Run `step_fn(member, step, batch)` for `n_members` members over the pushed batches on `workers` threads
    (each thread first calls `thread_init`). Steps are numbered from `first_step`."""

    def __init__(
        self,
        n_members: int,
        workers: int,
        step_fn: Callable[[int, int, Any], None],
        *,
        depth: int = 4,
        first_step: int = 0,
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        if n_members < 1 or workers < 1 or depth < 1:
            raise ValueError("Lanes needs at least one member, one worker and a depth of at least 1")
        self.step_fn, self.depth = step_fn, depth
        self.done = [first_step] * n_members
        """Steps each member has completed (its next step's number)."""
        self.seconds = [0.0] * n_members
        """How long each member's last step took."""
        self._batches: dict[int, Any] = {}
        self._pushed = first_step
        self._limit: int | None = None
        self._running = [False] * n_members
        self._failure: LaneFailure | None = None
        self._closed = False
        self._cv = threading.Condition()
        self._threads = [
            threading.Thread(target=self._work, args=(thread_init,), name=f"sae-lane-{w}", daemon=True)
            for w in range(workers)
        ]
        for th in self._threads:
            th.start()

    # ---- the caller's side --------------------------------------------------------------------------------
    def push(self, batch: Any) -> None:
        """Hand out the next batch; blocks while the slowest member is `depth` batches behind."""
        with self._cv:
            self._cv.wait_for(lambda: self._failure is not None or self._pushed - min(self.done) < self.depth)
            self._raise_failure()
            self._batches[self._pushed] = batch
            self._pushed += 1
            self._cv.notify_all()

    def drain(self) -> None:
        """Wait until every member has completed every pushed step."""
        with self._cv:
            self._cv.wait_for(
                lambda: (
                    self._failure is not None
                    or (all(d >= self._end() for d in self.done) and not any(self._running))
                )
            )
            self._raise_failure()

    def catch_up(self, until: int) -> None:
        """After a LaneFailure: forget it and run the members that are behind up to step `until` (not including
        it); members at or past it stay where they are. The lanes then take no further step (close them next).
        Raises LaneFailure if another step fails on the way."""
        with self._cv:
            self._failure, self._limit = None, until
            self._cv.notify_all()
            self._cv.wait_for(
                lambda: (
                    self._failure is not None
                    or (all(d >= self._end() for d in self.done) and not any(self._running))
                )
            )
            self._raise_failure()

    def close(self) -> None:
        """Stop the threads (after the steps they are in)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for th in self._threads:
            th.join()

    # ---- the threads --------------------------------------------------------------------------------------
    def _raise_failure(self) -> None:
        if self._failure is not None:
            self._cv.wait_for(lambda: not any(self._running))
            raise self._failure

    def _end(self) -> int:
        """The first step not to take: the next one to push, or the catch-up limit."""
        return self._pushed if self._limit is None else min(self._limit, self._pushed)

    def _ready(self) -> int | None:
        """The member to run next: not running, its batch pushed (and below the limit), furthest behind first,
        then longest last step."""
        if self._failure is not None:
            return None
        end = self._end()
        best = None
        for i, d in enumerate(self.done):
            if self._running[i] or d >= end:
                continue
            if best is None or (d, -self.seconds[i]) < (self.done[best], -self.seconds[best]):
                best = i
        return best

    def _work(self, thread_init: Callable[[], None] | None) -> None:
        if thread_init is not None:
            thread_init()
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._closed or self._ready() is not None)
                if self._closed:
                    return
                i = self._ready()
                assert i is not None
                t = self.done[i]
                self._running[i] = True
                batch = self._batches[t]
            t0 = time.perf_counter()
            error: BaseException | None = None
            try:
                self.step_fn(i, t, batch)
            except BaseException as err:  # handed to the caller by push/drain
                error = err
            with self._cv:
                self._running[i] = False
                self.seconds[i] = time.perf_counter() - t0
                if error is None:
                    self.done[i] = t + 1
                    low = min(self.done)
                    for old in [s for s in self._batches if s < low]:
                        del self._batches[old]
                elif self._failure is None or t < self._failure.step:
                    self._failure = LaneFailure(i, t, error)
                    self._failure.__cause__ = error
                self._cv.notify_all()
