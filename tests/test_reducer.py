"""The trainer's process-group seam (sae_cli/reducer.py): two ranks as two threads of one process, sharing a reducer
that combines through a barrier, each fed its own half of every global batch. Both must end with the same weights
bit for bit, and only rank 0 writes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from test_trainer import BTK, JUMP, KEY, TOPK, sparse_acts

from actcache.reader import Batch
from sae_cli.config import LoopConfig, MemberConfig
from sae_cli.reducer import LOCAL, Reducer
from sae_cli.trainer import Trainer, plan_member

WORLD = 2
BATCH = 256  # global; each rank reads BATCH // WORLD
STEPS = 12


class _Shared:
    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=120)
        self.slots: list[torch.Tensor | None] = [None] * n
        self.calls: list[list[str]] = [[] for _ in range(n)]


class ThreadReducer(Reducer):
    """Rank `rank` of `shared.n` threads: each call puts its tensor in its slot, waits for the others, and every
    rank combines the slots in rank order (so all get the same bits), then waits again before a slot is reused."""

    def __init__(self, shared: _Shared, rank: int) -> None:
        self.shared, self.rank, self.world_size = shared, rank, shared.n

    def _combine(self, t: torch.Tensor, what: str, op: Any) -> torch.Tensor:
        sh = self.shared
        sh.calls[self.rank].append(what)
        sh.slots[self.rank] = t.detach().clone()
        sh.barrier.wait()
        acc = sh.slots[0].clone()
        for other in sh.slots[1:]:
            acc = op(acc, other)
        sh.barrier.wait()
        if what == "mean":
            acc = acc / sh.n
        t.copy_(acc)
        return t

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return self._combine(t, "sum", torch.add)

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        return self._combine(t, "mean", torch.add)

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        return self._combine(t, "max", torch.maximum)


class HalfReader:
    """Rank `rank`'s share of each global batch: every `world`-th token of it (store index kept)."""

    def __init__(self, x_ND: torch.Tensor, rank: int, world: int, batch: int) -> None:
        self.x, self.rank, self.world, self.batch = x_ND, rank, world, batch
        self.pos = 0

    def __iter__(self):
        gen = torch.Generator().manual_seed(7)
        order = torch.randperm(len(self.x), generator=gen)
        while True:
            start = (self.pos * self.batch) % (len(self.x) - self.batch + 1)
            idx = order[start : start + self.batch][self.rank :: self.world]
            self.pos += 1
            yield Batch({KEY: self.x[idx]}, torch.zeros(len(idx), dtype=torch.int64), idx)

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread


def _trainer(
    tmp_path: Path, rank: int, x: torch.Tensor, members: list[MemberConfig], reducer: Reducer, world: int
) -> Trainer:
    loop = LoopConfig(batch_size=BATCH, log_every=4, threads=1, checkpoint_every=BATCH * 5)
    run = tmp_path / f"rank{rank}"
    plans = [plan_member(m, x.shape[1], run / m.name) for m in members]
    reader = HalfReader(x, rank, world, BATCH)
    tr = Trainer(plans, loop, reader, run, BATCH * STEPS, reducer=reducer)
    tr.start({KEY: x[:2048]})  # the same sample on every rank: the same init and input scale
    return tr


def _weights(tr: Trainer) -> dict[str, torch.Tensor]:
    out = {f"{m.plan.name}.{k}": v for m in tr.members for k, v in m.sae.state_dict().items()}
    for m in tr.members:
        out[f"{m.plan.name}.since_fired"] = m.since_fired_F
        out[f"{m.plan.name}.freq"] = m.freq_F
    return out


def test_two_ranks_hold_the_same_weights_and_only_rank_0_writes(tmp_path: Path) -> None:
    x = sparse_acts(4096, 16, 128, 4)
    members = [TOPK, JUMP, BTK]
    shared = _Shared(WORLD)
    trainers = [_trainer(tmp_path, r, x, members, ThreadReducer(shared, r), WORLD) for r in range(WORLD)]
    assert all(tr.member_workers == 1 for tr in trainers)  # no lanes across a process group
    results: list[Any] = [None] * WORLD

    def run(r: int) -> None:
        try:
            results[r] = trainers[r].run()
        except BaseException as err:  # the other rank would wait at the barrier forever
            results[r] = err
            shared.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(WORLD)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for res in results:
        if isinstance(res, BaseException):
            raise res
    assert [res.step for res in results] == [STEPS, STEPS]
    assert [res.tokens for res in results] == [BATCH * STEPS] * 2  # global tokens: 128 per rank per step

    a, b = (_weights(tr) for tr in trainers)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    jump0, jump1 = trainers[0].members[1], trainers[1].members[1]
    assert jump0.controller.state_dict() == jump1.controller.state_dict()
    assert jump0.controller.trim_shift != 0.0  # the final trim ran (the last 20 % of the steps), reduced
    assert float(trainers[0].members[2].sae.threshold) > 0  # BatchTopK's running threshold, reduced
    timing = ("tokens_per_s", "elapsed_s", "data_wait_s")
    rows = [[{k: v for k, v in r.items() if k not in timing} for r in tr.rows] for tr in trainers]
    assert rows[0] == rows[1] and len(rows[0]) == 3 * len(members)

    # Same calls in the same order on both ranks: gradients (3 members x 4 parameter tensors or more), check
    # vector, tokens, firing counts, thresholds, trim, FVU.
    assert shared.calls[0] == shared.calls[1] and len(shared.calls[0]) > STEPS * len(members) * 4

    assert (tmp_path / "rank0" / "checkpoint" / "state.json").is_file()
    assert (tmp_path / "rank0" / "metrics.parquet").is_file()
    assert all((tmp_path / "rank0" / m.name / "sae.safetensors").is_file() for m in members)
    assert not (tmp_path / "rank1").exists()
    summaries = [[{k: v for k, v in s.items() if k != "elapsed_s"} for s in res.summaries] for res in results]
    assert summaries[0] == summaries[1]


def test_the_reductions_matter(tmp_path: Path) -> None:
    """Rank 0's half alone (the identity reducer) ends elsewhere than the two ranks together: the reducer is
    what made the ranks agree."""
    x = sparse_acts(4096, 16, 128, 4)
    shared = _Shared(WORLD)
    trainers = [_trainer(tmp_path, r, x, [TOPK], ThreadReducer(shared, r), WORLD) for r in range(WORLD)]
    threads = [threading.Thread(target=tr.run) for tr in trainers]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    alone = _trainer(tmp_path / "alone", 0, x, [TOPK], LOCAL, WORLD)
    alone.run()
    together, solo = _weights(trainers[0]), _weights(alone)
    assert not torch.equal(together["topk.W_dec_FD"], solo["topk.W_dec_FD"])


@pytest.mark.parametrize("op", ["sum_", "mean_", "max_"])
def test_the_local_reducer_is_the_identity(op: str) -> None:
    t = torch.tensor([1.5, -2.0, float("nan")])
    assert getattr(LOCAL, op)(t) is t
    assert LOCAL.is_main and LOCAL.world_size == 1 and LOCAL.rank == 0
