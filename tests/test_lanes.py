"""sae_cli.lanes: members step through the pushed batches in order, concurrently, within `depth` of each other;
a failing step stops the lanes and is reported with its member and step."""

from __future__ import annotations

import threading
import time

import pytest

from sae_cli.lanes import LaneFailure, Lanes


class Recorder:
    def __init__(self, n: int, delay: dict[int, float] | None = None, fail: tuple[int, int] | None = None):
        self.steps: list[list[int]] = [[] for _ in range(n)]
        self.batches: list[list[str]] = [[] for _ in range(n)]
        self.delay, self.fail = delay or {}, fail
        self.lock = threading.Lock()
        self.active: set[int] = set()
        self.max_active = 0
        self.max_spread = 0

    def __call__(self, i: int, t: int, batch: str) -> None:
        with self.lock:
            assert i not in self.active  # a member is never on two threads
            self.active.add(i)
            self.max_active = max(self.max_active, len(self.active))
            done = [len(s) for s in self.steps]
            self.max_spread = max(self.max_spread, max(done) - min(done))
        try:
            time.sleep(self.delay.get(i, 0.002))
            if (i, t) == self.fail:
                raise ValueError(f"bad step {t}")
            with self.lock:
                self.steps[i].append(t)
                self.batches[i].append(batch)
        finally:
            with self.lock:
                self.active.discard(i)


def test_every_member_runs_every_batch_in_order_concurrently_within_depth() -> None:
    rec = Recorder(4)
    lanes = Lanes(4, 2, rec, depth=3, first_step=5)
    try:
        for t in range(5, 25):
            lanes.push(f"b{t}")
        lanes.drain()
    finally:
        lanes.close()
    assert rec.steps == [list(range(5, 25))] * 4
    assert rec.batches == [[f"b{t}" for t in range(5, 25)]] * 4
    assert lanes.done == [25] * 4
    assert rec.max_active == 2  # both threads busy at once
    assert rec.max_spread <= 3  # never more than depth steps apart


def test_a_slow_member_bounds_how_far_the_others_run_ahead() -> None:
    rec = Recorder(3, delay={0: 0.02})
    lanes = Lanes(3, 2, rec, depth=2)
    try:
        for t in range(8):
            lanes.push(t)
            assert t + 1 - min(lanes.done) <= 2  # push blocks while the slowest member is depth behind
        lanes.drain()
    finally:
        lanes.close()
    assert lanes.done == [8, 8, 8]
    assert rec.max_spread <= 2


def test_catch_up_runs_the_members_behind_to_the_step_and_no_further() -> None:
    gate = threading.Event()

    def step(i: int, t: int, batch: int) -> None:
        if i == 0 and t == 0:
            assert gate.wait(5)  # member 0 holds at its first step until the limit is set

    lanes = Lanes(3, 2, step, depth=8)
    try:
        for t in range(6):
            lanes.push(t)
        deadline = time.monotonic() + 5
        while lanes.done[1:] != [6, 6] and time.monotonic() < deadline:
            time.sleep(0.001)
        assert lanes.done == [0, 6, 6]
        waiter = threading.Thread(target=lanes.catch_up, args=(3,))
        waiter.start()
        while lanes._limit != 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        gate.set()
        waiter.join(5)
        assert not waiter.is_alive()
        time.sleep(0.05)
        assert lanes.done == [3, 6, 6]  # member 0 up to the limit and no further; the others stay
    finally:
        gate.set()
        lanes.close()


def test_a_failing_step_is_reported_with_member_and_step_and_the_others_can_catch_up() -> None:
    rec = Recorder(3, delay={1: 0.02}, fail=(2, 3))
    lanes = Lanes(3, 2, rec, depth=4)
    try:
        with pytest.raises(LaneFailure) as info:
            for t in range(10):
                lanes.push(t)
            lanes.drain()
        fail = info.value
        assert (fail.member, fail.step) == (2, 3)
        assert isinstance(fail.error, ValueError) and fail.__cause__ is fail.error
        assert lanes.done[2] == 3  # the failed step is not counted
        assert rec.steps[2] == [0, 1, 2]
        lanes.catch_up(3)  # the slow member runs up to the failed step, no further
        time.sleep(0.05)
        assert lanes.done[1] == 3 and rec.steps[1] == [0, 1, 2]
        assert lanes.done[2] == 3  # the failed step is not run again
    finally:
        lanes.close()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        Lanes(0, 2, lambda i, t, b: None)
