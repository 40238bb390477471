"""Data-parallel training (`sae train` launched as torchrun launches it: two processes, gloo on CPU): each rank
reads its own share of the chunks, the gradients and every statistic are all-reduced, and the SAE equals, within
float rounding, a one-process run fed the same global batches (the two ranks' batches, concatenated). A run killed
midway resumes with the same number of processes to the uninterrupted run's bits; another number is refused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from ranks import start_ranks, wait_all
from safetensors.torch import load_file
from test_trainer import sparse_acts, write_store
from typer.testing import CliRunner

from actcache.reader import ActivationReader, Batch
from sae_cli import data
from sae_cli import run as run_mod
from sae_cli.cli import app
from sae_cli.config import LoopConfig, MemberConfig, TrainConfig

BATCH, STEPS, CKPT = 256, 300, 256 * 20
# AuxK off: its loss is the FVU of the batch's residual, a ratio of batch sums that each rank takes over its own
# half (as sparsify's DDP does; docs/scaling.md), so with dead latents a two-rank step is not the global one.
MEMBER = MemberConfig(
    variant="topk", layer=0, site="resid_post", width="4x", l0_target=4, options={"aux_coef": 0.0}
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist-train")
    write_store(root / "store", {(0, "resid_post"): sparse_acts(8192, 16, 64, 4, seed=3)}, chunk_tokens=256)
    return root / "store"


def _loop() -> LoopConfig:
    return LoopConfig(
        batch_size=BATCH, tokens=BATCH * STEPS, eval_tokens=512, seed=1, device="cpu", log_every=50,
        checkpoint_every=CKPT,
    )  # fmt: skip


def _command(store: Path, out: Path, *extra: str) -> list[str]:
    loop = _loop()
    return [
        sys.executable, "-m", "sae_cli.cli", "train", "topk", "--store", str(store), "--layer", "0",
        "--site", "resid_post", "--width", "4x", "--l0-target", "4", "--tokens", str(loop.tokens),
        "--batch-size", str(BATCH), "--eval-tokens", "512", "--seed", "1", "--device", "cpu",
        "--log-every", "50", "--checkpoint-every", str(CKPT), "--option", "aux_coef=0", "--out", str(out), *extra,
    ]  # fmt: skip


class ConcatReader:
    """The global batches of a two-rank run in one process: rank 0's and rank 1's batch, concatenated."""

    def __init__(self, readers: list[ActivationReader]) -> None:
        self.readers = readers
        self.wait_seconds = 0.0

    def __iter__(self):
        for parts in zip(*self.readers, strict=False):
            key = next(iter(parts[0].acts))
            yield Batch(
                {key: torch.cat([p.acts[key] for p in parts])},
                torch.cat([p.token_ids for p in parts]),
                torch.cat([p.index for p in parts]),
            )

    def state_dict(self) -> dict[str, Any]:
        return {"readers": [r.state_dict() for r in self.readers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for r, s in zip(self.readers, state["readers"], strict=True):
            r.load_state_dict(s)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "sae.safetensors")


@pytest.fixture(scope="module")
def two_ranks(store, tmp_path_factory) -> Path:
    """An uninterrupted two-rank run."""
    out = tmp_path_factory.mktemp("dist-train-runs") / "two"
    results = wait_all(start_ranks(_command(store, out), 2))
    assert [code for code, _ in results] == [0, 0], results
    return out


@pytest.mark.slow
def test_two_ranks_equal_one_process_fed_the_same_global_batches(store, two_ranks, tmp_path) -> None:
    folder = run_mod.SoloRun(TrainConfig(store=str(store), member=MEMBER, loop=_loop()), tmp_path / "one")
    prep = run_mod.prepare_run(folder, device="cpu")
    # The readers the two ranks build (sae_cli/data.py), side by side in this process.
    rank_readers = [
        data.train_reader(prep.store, prep.keys, prep.loop, prep.ranges.train, r, 2) for r in range(2)
    ]
    prep.trainer.reader = prep.reader = ConcatReader(rank_readers)
    torch.set_num_threads(1)
    result = run_mod.run_training(prep)
    assert result.step == STEPS

    ddp, one = _weights(two_ranks), _weights(tmp_path / "one")
    assert ddp.keys() == one.keys()
    for k in one:
        assert torch.allclose(ddp[k], one[k], rtol=1e-4, atol=1e-5), (k, (ddp[k] - one[k]).abs().max())
    diffs = {k: float((ddp[k] - one[k]).abs().max()) for k in one}
    print(f"max |two ranks - one process| after {STEPS} steps: {diffs}")
    ranked = json.loads((two_ranks / "cfg.json").read_text())["training"]
    assert ranked["steps"] == STEPS and ranked["tokens"] == BATCH * STEPS  # global tokens, not per rank
    assert (
        ranked["train_dead_pct"]
        == json.loads((tmp_path / "one" / "cfg.json").read_text())["training"]["train_dead_pct"]
    )  # the firing counts were summed over the ranks
    state = json.loads((two_ranks / "checkpoint" / "state.json").read_text())
    assert state["world_size"] == 2 and [r["rank"] for r in state["readers"]] == [0, 1]


@pytest.mark.slow
def test_a_killed_run_resumes_on_two_ranks_and_refuses_one(store, two_ranks, tmp_path) -> None:
    out = tmp_path / "killed"
    procs = start_ranks(_command(store, out), 2)
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 120
    while not state.is_file():
        assert all(p.poll() is None for p in procs), wait_all(procs)
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.005)
    procs[1].send_signal(signal.SIGKILL)
    try:  # its next all_reduce fails: the peer is gone; one line, exit 2
        _, err0 = procs[0].communicate(timeout=120)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        raise
    assert procs[0].returncode == 2 and "another process of the job stopped" in err0, err0
    assert "Traceback" not in err0, err0
    step = json.loads(state.read_text())["step"]
    assert 0 < step < STEPS, step

    one = CliRunner().invoke(app, _command(store, out, "--resume")[3:])  # one process: this one
    assert one.exit_code == 2, one.output
    assert (
        "written by 2 process(es), this run has 1" in one.output and len(one.output.strip().splitlines()) == 1
    )

    results = wait_all(start_ranks(_command(store, out, "--resume"), 2))
    assert [c for c, _ in results] == [0, 0], results
    resumed, uninterrupted = _weights(out), _weights(two_ranks)
    for k in uninterrupted:
        assert torch.equal(resumed[k], uninterrupted[k]), k


def _reducer_worker(rank: int, port: int, out: str) -> None:
    """Rank `rank` of 2: every DistributedReducer operation on numbers each rank knows; results to a JSON file."""
    import os

    import torch.distributed as td

    from sae_cli.reducer import DistributedReducer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=2)
    r = DistributedReducer()
    got = {
        "sum": r.sum_(torch.tensor([1.0, 2.0]) * (rank + 1)).tolist(),  # [1, 2] + [2, 4]
        "mean": r.mean_(torch.tensor([1.0, 3.0]) * (rank + 1)).tolist(),  # ([1, 3] + [2, 6]) / 2
        "max": r.max_(torch.tensor([float(rank), -float(rank)])).tolist(),
        "tokens": int(r.sum_(torch.tensor(128 + rank, dtype=torch.int64))),
    }
    grads = [torch.full((2, 2), float(rank)), torch.full((3,), 10.0 * rank)]
    r.mean_all_(grads)  # one bucket, back into each tensor
    got["grads"] = [g.tolist() for g in grads]
    got["gather"] = r.gather({"rank": rank})
    r.barrier()
    got["rank"], got["world"] = r.rank, r.world_size
    Path(out, f"{rank}.json").write_text(json.dumps(got))
    td.destroy_process_group()


@pytest.mark.slow
def test_distributed_reducer_operations(tmp_path) -> None:
    import torch.multiprocessing as mp
    from ranks import free_port

    mp.spawn(_reducer_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for r, got in enumerate(results):
        assert got["sum"] == [3.0, 6.0] and got["mean"] == [1.5, 4.5] and got["max"] == [1.0, 0.0]
        assert got["tokens"] == 257 and got["grads"] == [[[0.5, 0.5], [0.5, 0.5]], [5.0, 5.0, 5.0]]
        assert got["gather"] == [{"rank": 0}, {"rank": 1}] and (got["rank"], got["world"]) == (r, 2)


def test_a_sweep_under_torchrun_is_refused_with_one_line(monkeypatch, store, tmp_path) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    args = ["sweep", "--store", str(store), "--layer", "0", "--variants", "topk", "--l0-target", "4"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "sw")])
    assert result.exit_code == 2 and "sae sweep runs in one process, not under torchrun" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "sw").exists()
