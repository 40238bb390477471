"""The one training loop: every variant, and every member of a sweep, trained from the same decoded batches.

A solo `sae train` is a loop of one member. Per step, for each member: scale the batch by the member's input
scale c (E||c x||^2 = 1), `training_loss`, backward; then ONE host sync checks every loss and the data for
NaN/Inf and fetches the L0s for the controllers; then for each member: `before_optimizer_step` (decoder-parallel
gradient removal), gradient normalisation, Adam, `after_optimizer_step` (renormalise rows, clamp thresholds),
dead-latent counters. A bad loss therefore never reaches the weights: the loop stops with a checkpoint of the last
good state. On CPU with several members the members instead run in lanes (sae_cli/lanes.py): each member's whole
step on one thread, with its own check, up to LANE_DEPTH steps apart, all in step at every log row, checkpoint and
the end.

The pieces (sae_cli/training/): plan (members, lr, Adam betas from the variant, input scale), schedules (lr
warm-up and decay, sparsity warm-up, final L0 trim, dead window), memory (estimate and check), member (a member's
state and step), rows (metric rows, Progress), checkpoint (save, resume), finish (calibrate, fold, save), signals.
Two seams: the reconstruction term comes from an `Objective` (sae_cli/objective.py; MSE by default) and every
statistic that crosses processes goes through a `Reducer` (sae_cli/reducer.py; the identity by default). This
module re-exports the public names of the pieces.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from .config import LoopConfig
from .lanes import LaneFailure, Lanes
from .objective import MSE, Objective
from .reducer import LOCAL, Reducer
from .registry import get_variant
from .training import checkpoint, init_from, rows
from .training.checkpoint import CHECKPOINT_DIR, CHECKPOINT_FORMAT
from .training.errors import StepFailure, TrainingError
from .training.finish import TrainResult, finish
from .training.member import ADAM_EPS, Member, MemberStep, Pass, global_grad_norm, normalize_grad_
from .training.memory import available_memory, check_memory, estimate_memory
from .training.plan import (
    LR_BASE,
    MemberPlan,
    check_l0_targets,
    check_variant_options,
    default_lr,
    input_scale,
    plan_member,
)
from .training.rows import METRICS_FILE, Progress
from .training.schedules import dead_window, lr_multiplier, total_steps
from .training.signals import stop_on_signals

__all__ = [
    "ADAM_EPS", "CHECKPOINT_DIR", "CHECKPOINT_FORMAT", "LANE_DEPTH", "LR_BASE", "METRICS_FILE", "Member",
    "MemberPlan", "Progress", "TrainResult", "Trainer", "TrainingError", "available_memory", "check_l0_targets",
    "check_memory", "check_variant_options", "dead_window", "default_lr", "estimate_memory", "global_grad_norm",
    "input_scale", "lr_multiplier", "normalize_grad_", "plan_member", "stop_on_signals", "total_steps",
]  # fmt: skip

log = logging.getLogger(__name__)

Key = tuple[int, str]
LANE_DEPTH = 4
"""How many steps apart the members of a CPU sweep may run (`Lanes`); the batches in between stay in memory."""


class Reader(Protocol):
    """What the trainer needs from actcache's ActivationReader."""

    def __iter__(self) -> Iterator[Any]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Trainer:
    """Train `plans` from `reader` for `tokens` tokens; checkpoints and metrics go to `run_dir`.

    `reducer` (default: the identity, one process): the process group this trainer is one rank of
    (sae_cli/reducer.py); `loop.batch_size` is then the global batch and `reader` delivers this rank's share.
    `objective` (default: MSE): the reconstruction term the variants' losses use (sae_cli/objective.py);
    `objectives`: by name, for the members whose plan names another objective (`MemberPlan.objective`)."""

    def __init__(
        self,
        plans: list[MemberPlan],
        loop: LoopConfig,
        reader: Reader,
        run_dir: str | Path,
        tokens: int,
        *,
        device: str | torch.device = "cpu",
        callback: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        extra_summary: dict[str, Any] | None = None,
        reducer: Reducer | None = None,
        objective: Objective | None = None,
        objectives: Mapping[str, Objective] | None = None,
    ) -> None:
        if not plans:
            raise TrainingError("nothing to train: no members")
        if loop.batch_size <= 0:
            raise TrainingError(
                "the loop's batch size is automatic (0): resolve it with config.resolve_loop first"
            )
        if len({p.name for p in plans}) != len(plans):
            raise TrainingError("member names must be distinct")
        self.plans, self.loop, self.reader = plans, loop, reader
        self.run_dir = Path(run_dir)
        self.tokens_total = int(tokens)
        self.n_steps = total_steps(loop, self.tokens_total)
        self.window = dead_window(loop, self.tokens_total)
        self.device = torch.device(device)
        self.reducer = reducer or LOCAL
        self.stepper = MemberStep(
            loop,
            self.n_steps,
            self.window,
            self.device,
            self.reducer,
            objective or MSE,
            dict(objectives or {}),
        )
        self.callback = callback or (lambda p: None)
        self.should_stop = should_stop or (lambda: False)
        self.extra_summary = dict(extra_summary or {})
        self.members: list[Member] = []
        self.step = 0
        # Members in lanes (_run_lanes): CPU, several members, several intra-op threads, one process (a process
        # group's collectives must come in the same order on every rank).
        self._threads = torch.get_num_threads()
        cpu = self.device.type == "cpu" and self.loop.member_threads and self.reducer.world_size == 1
        self._workers = min(len(plans), self._threads) if cpu else 1
        self.tokens = 0
        self.elapsed_s = 0.0
        self.rows: list[dict[str, Any]] = []
        self.calibration: dict[Key, Tensor] = {}
        """Raw tokens per key for the final `calibrate` (data.calibration_sample)."""

    # ---- set-up: fresh or resumed ------------------------------------------------------------------------
    def start(
        self,
        sample: dict[Key, Tensor],
        scales: dict[Key, float] | None = None,
        calibration: dict[Key, Tensor] | None = None,
    ) -> None:
        """Fresh start: build every SAE (seeded), scale = `scales[key]` or estimated from `sample[key]`, and
        `init_from_data` on the scaled sample. `calibration` (default: `sample`) is kept for the final
        `calibrate`."""
        self.calibration = sample if calibration is None else calibration
        for plan in self.plans:
            torch.manual_seed(self.loop.seed)  # per member: its init does not depend on the other members
            x_BD = sample[plan.key].float()
            c = scales[plan.key] if scales and plan.key in scales else input_scale(x_BD)
            if plan.init_from:  # fine-tuning: the saved SAE in this run's units
                sae = init_from.load(plan.init_from, plan.sae_cfg, c)
            else:
                sae = get_variant(plan.sae_cfg.variant)(plan.sae_cfg)
                sae.init_from_data(x_BD * c)
            member = self.stepper.build(plan, sae.to(self.device), c)
            if member.controller is not None:
                self.stepper.init_controller(member, x_BD[: self.loop.batch_size] * c)
            self.members.append(member)
        log.info(
            "training %d member(s) for %d steps; dead window %d tokens",
            len(self.plans),
            self.n_steps,
            self.window,
        )

    def resume(self, calibration: dict[Key, Tensor]) -> None:
        """Load the checkpoint in run_dir: weights, Adam, controllers, counters, RNG, reader position, metrics.
        `calibration`: the tokens `start` had for the final `calibrate` (data.calibration_sample is deterministic)."""
        self.calibration = calibration
        checkpoint.load(self)

    def save_checkpoint(self, reader_state: dict[str, Any] | None = None) -> Path:
        """Write the full training state (tensors file named by step, then state.json pointing at it); the reader's
        position is its current one unless `reader_state` is given. Only the main rank writes."""
        return checkpoint.save(self, reader_state)

    @property
    def member_workers(self) -> int:
        """Members trained at once (threads; 1: one after another)."""
        return self._workers

    # ---- the loop --------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        if not self.members:
            raise TrainingError("call start() or resume() before run()")
        if self._workers > 1:
            status = self._run_lanes()
        else:
            status = self._run_loop(self._step)
        self.save_checkpoint()
        if status == "done":
            result = finish(self)
        else:
            result = TrainResult(status, self.step, self.tokens, [m.plan.out_dir for m in self.members], [])
        self.callback(self._progress(status, 0.0, []))
        return result

    def _run_loop(self, step: Callable[[Any], None], sync: Callable[[], None] = lambda: None) -> str:
        """The steps until the token budget, a stop request or the end of the data: `step(batch)` for each batch;
        `sync()` before every log row and checkpoint (lanes: all members at the same step)."""
        next_ckpt = self._next_checkpoint()
        t_last, tok_last = time.perf_counter(), self.tokens
        t_run = time.perf_counter()
        elapsed0 = self.elapsed_s
        batches = iter(self.reader)
        while self.tokens < self.tokens_total:
            if self.should_stop():
                sync()
                return "interrupted"
            batch = next(batches, None)
            if batch is None:
                log.warning("the reader ran out of data at %d tokens", self.tokens)
                break
            step(batch)
            self.elapsed_s = elapsed0 + time.perf_counter() - t_run
            if self.step % self.loop.log_every == 0 or self.tokens >= self.tokens_total:
                sync()
                now = time.perf_counter()
                self.elapsed_s = elapsed0 + now - t_run
                tps = (self.tokens - tok_last) / max(now - t_last, 1e-9)
                t_last, tok_last = now, self.tokens
                self.callback(self._log_rows(tps))
            if next_ckpt and self.tokens >= next_ckpt and self.tokens < self.tokens_total:
                sync()
                self.save_checkpoint()
                next_ckpt = self._next_checkpoint()
                self.callback(self._progress("checkpoint", 0.0, []))
        sync()
        self.elapsed_s = elapsed0 + time.perf_counter() - t_run
        return "done"

    def _next_checkpoint(self) -> int:
        every = self.loop.checkpoint_every
        return (self.tokens // every + 1) * every if every else 0

    def _step(self, batch: Any) -> None:
        """One step of every member, one member after another: all forward/backward passes, ONE host sync that
        checks them all, then all updates (a bad loss stops the run before any member's weights change)."""
        step, n_tokens = self.step, self._global_tokens(batch)
        passes = [self._forward_backward(m, batch, step) for m in self.members]
        values = self.stepper.host_values([p.check for p in passes])
        offset = 0
        try:
            for m, p in zip(self.members, passes, strict=True):
                self.stepper.check(m, p, values[offset : offset + p.check.numel()], batch, step, self.tokens)
                offset += p.check.numel()
        except StepFailure as err:
            self.save_checkpoint()
            where = f"checkpoint of the last good step in {self.run_dir / CHECKPOINT_DIR}"
            raise TrainingError(err.message(where)) from None
        for m, p in zip(self.members, passes, strict=True):
            self.stepper.update(m, p, step, n_tokens)
        self.step += 1
        self.tokens += n_tokens

    def _forward_backward(self, m: Member, batch: Any, step: int) -> Pass:
        """Member `m`'s forward and backward on `batch` (training/member.py; a method, so a test can watch it)."""
        return self.stepper.forward_backward(m, batch, step)

    @staticmethod
    def _batch_tokens(batch: Any) -> int:
        return int(next(iter(batch.acts.values())).shape[0])

    def _global_tokens(self, batch: Any) -> int:
        """The batch's tokens over all ranks (one process: the batch's)."""
        return int(self.reducer.sum_(torch.tensor(self._batch_tokens(batch), dtype=torch.int64)))

    # ---- members concurrently (CPU) -------------------------------------------------------------------
    def _run_lanes(self) -> str:
        """The loop with the members in `Lanes`: on CPU with several members and several intra-op threads, each
        member on one intra-op thread (its numbers are those of a solo run on one thread, bit for bit), the
        members concurrently on as many threads, up to LANE_DEPTH batches apart; all at the same step at every
        log row, checkpoint and at the end. The cores stay busy through the single-threaded parts of a step
        (sort, index, embedding bags, Python) without a barrier per step (docs/training.md). One process only."""
        pushed: dict[int, tuple[int, dict[str, Any]]] = {}
        """Tokens before each pushed step and the reader state after it: for messages and a failure checkpoint."""

        def member_step(i: int, step: int, batch: Any) -> None:
            m, st = self.members[i], self.stepper
            p = self._forward_backward(m, batch, step)
            st.check(m, p, st.host_values([p.check]), batch, step, pushed[step][0])
            st.update(m, p, step, self._batch_tokens(batch))

        lanes = Lanes(
            len(self.members),
            self._workers,
            member_step,
            depth=LANE_DEPTH,
            first_step=self.step,
            thread_init=lambda: torch.set_num_threads(1),
        )

        def push(batch: Any) -> None:
            pushed[self.step] = (self.tokens, self.reader.state_dict())
            for old in [s for s in pushed if s < min(lanes.done)]:
                del pushed[old]
            lanes.push(batch)
            self.step += 1
            self.tokens += self._batch_tokens(batch)

        try:
            return self._run_loop(push, lanes.drain)
        except LaneFailure as fail:
            if not isinstance(fail.error, StepFailure):
                raise fail.error from None  # a bug or an interrupt in a member's step: as the one-thread loop raises it
            raise self._lane_failure(lanes, fail, pushed) from None
        finally:
            lanes.close()

    def _lane_failure(
        self, lanes: Lanes, fail: LaneFailure, pushed: dict[int, tuple[int, dict[str, Any]]]
    ) -> TrainingError:
        """The error for a member's bad batch or loss. As in the one-thread loop, the run stops with a checkpoint
        of the last good step when every member can be brought to it (the members behind run up to it); a
        member already past it (the lanes run up to LANE_DEPTH steps apart) cannot go back: then no checkpoint."""
        assert isinstance(fail.error, StepFailure)
        ahead = [self.members[i].plan.name for i, d in enumerate(lanes.done) if d > fail.step]
        where = ""
        if ahead:
            where = (
                f"no checkpoint of this step: {', '.join(ahead)} had already passed it (sweep members run up to "
                f"{LANE_DEPTH} steps apart on CPU; LoopConfig.member_threads=False keeps them in step)"
            )
        else:
            try:
                lanes.catch_up(fail.step)
            except LaneFailure as other:
                name = self.members[other.member].plan.name
                where = (
                    f"no checkpoint of this step: {name} failed too, at step {other.step + 1} ({other.error})"
                )
        if not where:
            self.step, (self.tokens, reader_state) = fail.step, pushed[fail.step]
            self.save_checkpoint(reader_state=reader_state)
            where = f"checkpoint of the last good step in {self.run_dir / CHECKPOINT_DIR}"
        return TrainingError(fail.error.message(where))

    # ---- logging ---------------------------------------------------------------------------------------
    def _log_rows(self, tokens_per_s: float) -> Progress:
        new = rows.log_rows(
            self.members,
            step=self.step,
            tokens=self.tokens,
            window=self.window,
            tokens_per_s=tokens_per_s,
            elapsed_s=self.elapsed_s,
            data_wait_s=float(getattr(self.reader, "wait_seconds", float("nan"))),
        )
        self.rows.extend(new)
        return self._progress("log", tokens_per_s, new)

    def _progress(self, event: str, tokens_per_s: float, rows: list[dict[str, Any]]) -> Progress:
        return Progress(event, self.step, self.n_steps, self.tokens, self.tokens_total, tokens_per_s, rows)
