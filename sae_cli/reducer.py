"""The process-group seam of the trainer: every statistic that several processes training one SAE together would
have to combine goes through one `Reducer`. One process uses `LocalReducer`, the identity: it returns its input
unchanged, so a single-process run computes exactly the numbers it computed before this seam existed.

What the trainer (sae_cli/trainer.py, sae_cli/training/member.py) hands to the reducer, every step, per member:

- the check vector (`mean_`): data finite, loss, the batch L0 (what the L0 controller steers on), the loss parts
  and the gradient norm, i.e. the numbers of the host sync and the metric sums of the log rows (a NaN or a bad
  batch on any rank makes the mean fail the check on every rank, so all stop at the same step);
- the batch's tokens (`sum_`): the token count, the schedules and the dead-latent counters count global tokens;
- the gradients (`mean_all_`), before the decoder projection and the gradient normalisation / clip;
- the firing counts (`sum_`) that feed the dead-latent counters and the firing frequencies;
- the variant's batch-level statistics (`SAE.reduce_batch_stats`: BatchTopK's, Matryoshka's and the choice
  rules' running-threshold cut-off, `mean_`);
- the final L0 trim (`l0_control.trim_to_target`: the exact shift and the untrimmed L0, `sum_`);
- the FVU of a log row (`sum_` of its numerator and denominator).

Only the main rank (`is_main`, rank 0) writes checkpoints, metrics and the saved SAEs. A multi-process backend
(torch.distributed: all_reduce on the same tensors, in the same order on every rank) implements the same five
methods; the trainer issues the calls in one fixed order per step (members one after another: the CPU lanes of a
sweep are off when world_size > 1), which a collective backend needs: `DistributedReducer` (below). `loop.batch_size` is then the global batch:
each rank's reader delivers batch_size / world_size tokens (ActivationReader's rank / world_size sharding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class Reducer:
    """The protocol (and the base of the implementations): in-place reductions over the ranks of a process group.
    Every method takes a tensor that every rank passes in the same call order, shape and dtype, replaces its
    contents by the reduction over the ranks and returns it."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """The rank that writes (checkpoints, metrics, the saved SAEs)."""
        return self.rank == 0

    def sum_(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def mean_(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def max_(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def mean_all_(self, ts: Sequence[Tensor]) -> None:
        """`mean_` of several tensors (the gradients of one SAE); a collective backend buckets them into one call."""
        for t in ts:
            self.mean_(t)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (small picklable objects: the readers' positions)."""
        return [obj]

    def barrier(self) -> None:
        """Wait until every rank is here (one process: nothing)."""
        return None


class LocalReducer(Reducer):
    """One process: every reduction is the identity (no copy, no arithmetic)."""

    def sum_(self, t: Tensor) -> Tensor:
        return t

    def mean_(self, t: Tensor) -> Tensor:
        return t

    def max_(self, t: Tensor) -> Tensor:
        return t

    def mean_all_(self, ts: Sequence[Tensor]) -> None:
        return None


LOCAL = LocalReducer()
"""The identity reducer (stateless; shared)."""


class DistributedReducer(Reducer):
    """torch.distributed's default process group (joined by `actcache.dist.Dist.init`: gloo on CPU, nccl on CUDA):
    each reduction is one `all_reduce` (the gradients of a member: one bucket). Every rank receives the same bits,
    so the ranks' weights never drift apart. Tensors on another device than the backend's (a host scalar under
    nccl) travel through a copy."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        import torch.distributed as td

        if not td.is_initialized():
            raise RuntimeError(
                "DistributedReducer needs torch.distributed's process group (actcache.dist.Dist.init)"
            )
        self._td = td
        self.rank, self.world_size = td.get_rank(), td.get_world_size()
        self.device = torch.device(device)
        """Where the backend reduces (nccl: this rank's GPU)."""

    def _reduce(self, t: Tensor, op: Any) -> Tensor:
        if t.device == self.device or self.device.type == "cpu" and t.device.type == "cpu":
            self._td.all_reduce(t, op=op)
            return t
        moved = t.to(self.device)
        self._td.all_reduce(moved, op=op)
        t.copy_(moved)
        return t

    def sum_(self, t: Tensor) -> Tensor:
        return self._reduce(t, self._td.ReduceOp.SUM)

    def mean_(self, t: Tensor) -> Tensor:
        return self._reduce(t, self._td.ReduceOp.SUM).div_(self.world_size)

    def max_(self, t: Tensor) -> Tensor:
        return self._reduce(t, self._td.ReduceOp.MAX)

    def mean_all_(self, ts: Sequence[Tensor]) -> None:
        ts = list(ts)
        if not ts:
            return
        flat = self.mean_(torch.cat([t.reshape(-1) for t in ts]))
        offset = 0
        for t in ts:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._td.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self._td.barrier()
