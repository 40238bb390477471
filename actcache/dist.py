"""The process group of a job launched by `torchrun` or `accelerate launch` (one process per GPU, several nodes).

We build no cluster layer: the launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and
`Dist.init` joins torch.distributed's process group from them (`env://`; gloo on CPU, nccl on CUDA). One process
without those variables is `Dist()`: rank 0 of 1, and every method is then free (no process group, no call).

`run_main` is the pattern of every decision one rank takes for all (planning checks, creating the store, the
shards still to do): rank 0 runs the function and broadcasts its result or its error, so that every rank goes on,
or stops with the same one-line error, together.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun / accelerate launch set for every process."""

TIMEOUT = datetime.timedelta(minutes=60)
"""How long a collective waits for the slowest rank (a rank's shard may wait behind a long forward)."""


class RemoteError(RuntimeError):
    """The error rank 0 met in a `run_main` decision, raised on the other ranks (rank 0 prints it)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size, local rank (its GPU on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Dist:
        """From the launcher's variables; `Dist()` when WORLD_SIZE is unset or 1. ValueError on bad values."""
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE", "1") or 1)
        rank, local = int(env.get("RANK", "0") or 0), int(env.get("LOCAL_RANK", "0") or 0)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} WORLD_SIZE={world}: launch with torchrun or accelerate launch")
        return cls(rank, world, local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def multi(self) -> bool:
        return self.world_size > 1

    def device(self, device: str) -> str:
        """The device this rank computes on: `cuda` (or `auto` with a GPU) -> `cuda:LOCAL_RANK` in a group."""
        import torch

        if self.multi and device in ("cuda", "auto") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def init(self, backend: str | None = None) -> None:
        """Join the process group (once; nothing for one process). Backend: nccl when CUDA is there, else gloo."""
        if not self.multi:
            return
        import torch
        import torch.distributed as td

        if td.is_initialized():
            return
        missing = [v for v in ENV_VARS if v not in os.environ]
        if missing:
            raise ValueError(
                f"WORLD_SIZE={self.world_size} but {', '.join(missing)} unset: launch with torchrun"
            )
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        td.init_process_group(backend, timeout=TIMEOUT)

    def barrier(self) -> None:
        if self.multi:
            import torch.distributed as td

            td.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled by torch.distributed; small objects only)."""
        if not self.multi:
            return obj
        import torch.distributed as td

        box = [obj if self.is_main else None]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def run_main(self, fn: Callable[[], T], errors: tuple[type[BaseException], ...] = (Exception,)) -> T:
        """`fn()` on rank 0, its result on every rank; an error of `errors` on rank 0 is raised there and as
        RemoteError (the same message) on the others."""
        if not self.multi:
            return fn()
        outcome: tuple[str, Any]
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except errors as err:
                self.broadcast(("error", str(err)))
                raise
            self.broadcast(outcome)
            return outcome[1]
        kind, value = self.broadcast(None)
        if kind == "error":
            raise RemoteError(value)
        return value

    def close(self) -> None:
        """Leave the process group (the end of a job)."""
        if self.multi:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()
