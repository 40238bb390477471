"""The one training loop: every variant, and every member of a sweep, trained from the same decoded batches.

A solo `sae train` is a loop of one member. Per step, for each member: scale the batch by the member's input
scale c (E||c x||^2 = 1), `training_loss`, backward; then ONE host sync checks every loss and the data for
NaN/Inf and fetches the L0s for the controllers; then for each member: `before_optimizer_step` (decoder-parallel
gradient removal), gradient clipping, Adam, `after_optimizer_step` (renormalise rows, clamp thresholds), dead-latent
counters. A bad loss therefore never reaches the weights: the loop stops with a checkpoint of the last good state.
On CPU with several members the members instead run in lanes (sae_cli/lanes.py): each member's whole step on one
thread, with its own check, up to LANE_DEPTH steps apart, all in step at every log row, checkpoint and the end.

Schedules (docs/training.md): linear lr warm-up over min(warmup_steps, 5 % of the steps), linear decay to 0 over
the last `decay_fraction`; a fixed sparsity coefficient warms up linearly over `sparsity_warmup_fraction`; steered
members get lambda from their L0 controller (sae_cli/l0_control.py) and, over the last `l0_trim_fraction` of the
steps, a shift of their firing threshold after each step that puts the batch's L0 on the target. After the last
step every SAE is `calibrate`d (batch-level rules set their inference threshold from the final weights) on the
calibration sample: held-back tokens (data.calibration_split) or the normalisation sample. Adam eps 6.25e-10 (OpenAI TopK); betas
(0, 0.999) for JumpReLU (Gemma Scope), (0.9, 0.999) otherwise.

Checkpoints (every `checkpoint_every` tokens, at the end, and when `should_stop()` turns true: Ctrl-C/SIGTERM)
hold the weights, Adam state, controller state, dead-latent counters, RNG and the reader position; resuming on
CPU gives bit-identical weights to an uninterrupted run. Written as safetensors + JSON, atomically.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from . import io
from .config import ConfigError, LoopConfig, MemberConfig, resolve_width
from .l0_control import TRIM_RATE, ControllerConfig, L0Controller, initial_coef, trim_to_target
from .lanes import LaneFailure, Lanes
from .registry import get_variant
from .variants.base import SAE, LossOutput, SAEConfig, StepState

log = logging.getLogger(__name__)

Key = tuple[int, str]
ADAM_EPS = 6.25e-10
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FORMAT = "sae_cli.checkpoint"
METRICS_FILE = "metrics.parquet"
# Variant families whose Adam betas differ from (0.9, 0.999): Gemma Scope trains JumpReLU with beta1 = 0
# (arXiv 2408.05147, sec. 4.2). A variant may instead declare a class attribute `adam_betas`.
ADAM_BETAS = {"jumprelu": (0.0, 0.999)}
# Default peak lr, every variant: the OpenAI/sparsify TopK heuristic 2e-4 / sqrt(d_sae / 2^14), times a short-run
# factor min(2, sqrt(1200 / steps)) (>= 1): on SmolLM2 layer 15, 300 steps, doubling the lr took TopK's held-out
# FVU from 0.212 to 0.173 and JumpReLU's from 0.276 to 0.220 (docs/training.md). Gemma Scope's 7e-5 for JumpReLU
# is tuned for runs of billions of tokens.
LR_BASE, LR_REF_WIDTH, LR_SHORT_RUN_STEPS, LR_SHORT_RUN_MAX = 2e-4, 2**14, 1200, 2.0
LANE_DEPTH = 4
"""How many steps apart the members of a CPU sweep may run (`Lanes`); the batches in between stay in memory."""


class TrainingError(Exception):
    """Training cannot go on (bad data, NaN loss, resume mismatch, memory); one line naming the fix."""


class _StepFailure(Exception):
    """A member's step found bad data or a non-finite loss (before its update): what happened and the fix; the
    loop adds where the checkpoint is."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what, self.fix = what, fix

    def message(self, checkpoint: str) -> str:
        return f"{self.what}; {checkpoint}; {self.fix}"


@dataclass
class _Pass:
    """A member's forward and backward of one step: loss output, the step's state, its scaled batch, and the
    numbers the host checks (data finite, loss, L0, loss parts, gradient norm)."""

    out: LossOutput
    state: StepState
    x_BD: Tensor
    check: Tensor


class Reader(Protocol):
    """What the trainer needs from actcache's ActivationReader."""

    def __iter__(self) -> Iterator[Any]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class MemberPlan:
    """One member, fully resolved (width in latents, lr, betas, sparsity handling, output folder)."""

    name: str
    key: Key
    sae_cfg: SAEConfig
    lr: float
    betas: tuple[float, float]
    steered: bool
    """True: lambda comes from the L0 controller; False: fixed_coef (warmed up) or unused."""
    fixed_coef: float
    out_dir: Path


def default_lr(variant: str, d_sae: int, steps: int | None = None) -> float:
    """Peak lr from the width, raised for short runs when `steps` is given (see LR_BASE)."""
    short = 1.0 if not steps else min(LR_SHORT_RUN_MAX, max(1.0, math.sqrt(LR_SHORT_RUN_STEPS / steps)))
    return LR_BASE / math.sqrt(d_sae / LR_REF_WIDTH) * short


def plan_member(cfg: MemberConfig, d_in: int, out_dir: str | Path, steps: int | None = None) -> MemberPlan:
    """Resolve a MemberConfig against the data width (d_in) and the run's length in steps (for the default lr);
    KeyError/ValueError name the bad input."""
    cls = get_variant(cfg.variant)
    d_sae = resolve_width(cfg.width, d_in)
    sae_cfg = SAEConfig(cfg.variant, d_in, d_sae, float(cfg.l0_target), dict(cfg.options))
    betas = tuple(getattr(cls, "adam_betas", ADAM_BETAS.get(cfg.variant, (0.9, 0.999))))
    steered = bool(cls.steered) and cfg.sparsity_coef is None
    name = cfg.name or f"{cfg.variant}-L{cfg.layer}-{cfg.site}-w{d_sae}-l0_{cfg.l0_target:g}"
    return MemberPlan(
        name=name,
        key=(int(cfg.layer), cfg.site),
        sae_cfg=sae_cfg,
        lr=cfg.lr if cfg.lr is not None else default_lr(cfg.variant, d_sae, steps),
        betas=(float(betas[0]), float(betas[1])),
        steered=steered,
        fixed_coef=float(cfg.sparsity_coef or 0.0),
        out_dir=Path(out_dir),
    )


def check_l0_targets(plans: list[MemberPlan]) -> None:
    """ConfigError when a member's L0 target is not below its width: the SAE cannot reach it (it would land far
    below it, with latents firing on every token)."""
    for p in plans:
        if p.sae_cfg.l0_target >= p.sae_cfg.d_sae:
            raise ConfigError(
                f"--l0-target {p.sae_cfg.l0_target:g} is not below the width ({p.sae_cfg.d_sae} latents at d_model "
                f"{p.sae_cfg.d_in}); lower the L0 target or widen the SAE"
            )


def check_variant_options(plans: list[MemberPlan]) -> None:
    """Let each variant validate its options by building it on the meta device: no memory is allocated, so a
    width that does not fit is left to check_memory's one-line refusal."""
    for p in plans:
        with torch.device("meta"):
            get_variant(p.sae_cfg.variant)(p.sae_cfg)


def total_steps(loop: LoopConfig, tokens: int) -> int:
    return max(1, math.ceil(tokens / loop.batch_size))


def lr_multiplier(step: int, n_steps: int, loop: LoopConfig) -> float:
    """Linear warm-up over min(warmup_steps, 5 % of steps), flat, linear decay to 0 over the last fraction."""
    warm = max(1, min(loop.warmup_steps, int(0.05 * n_steps)))
    if step < warm:
        return (step + 1) / warm
    decay_start = n_steps * (1.0 - loop.decay_fraction)
    if loop.decay_fraction > 0 and step >= decay_start:
        return max(0.0, (n_steps - step) / (n_steps - decay_start))
    return 1.0


def dead_window(loop: LoopConfig, tokens: int) -> int:
    """Tokens without firing after which a latent counts as dead: 10M (OpenAI, sparsify) scaled down for short
    runs to a tenth of the run, but at least 8 batches."""
    if loop.dead_window_tokens:
        return loop.dead_window_tokens
    return int(min(10_000_000, max(tokens // 10, 8 * loop.batch_size)))


def input_scale(sample_BD: Tensor) -> float:
    """c with E||c x||^2 = 1 on the sample (Gemma Scope's unit mean squared norm)."""
    msn = float(sample_BD.double().pow(2).sum(-1).mean())
    if not math.isfinite(msn) or msn <= 0:
        raise TrainingError(f"cannot normalise: the mean squared norm of the sample is {msn}")
    return 1.0 / math.sqrt(msn)


def estimate_memory(plans: list[MemberPlan], loop: LoopConfig, reader_bytes: int = 0) -> int:
    """Bytes the loop needs before it allocates: per member weights + gradients + Adam's two moments (4 fp32
    copies of 2*F*D + 2*F + D), the largest member's activations (~8 [B, F] fp32 tensors live at once in the
    forward/backward: pre-activations, masks, latents and their gradients), the batch, and the reader's buffers."""
    params = sum(2 * p.sae_cfg.d_sae * p.sae_cfg.d_in + 2 * p.sae_cfg.d_sae + p.sae_cfg.d_in for p in plans)
    acts = max(8 * loop.batch_size * p.sae_cfg.d_sae + 4 * loop.batch_size * p.sae_cfg.d_in for p in plans)
    return 4 * (4 * params + acts) + reader_bytes


def available_memory(device: torch.device) -> int | None:
    """Free bytes on the device (CUDA: mem_get_info; CPU: MemAvailable of /proc/meminfo), None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(
    plans: list[MemberPlan], loop: LoopConfig, device: torch.device, reader_bytes: int = 0
) -> int:
    """TrainingError (one line, with the fix) when the estimate exceeds 90 % of the free memory."""
    need, free = estimate_memory(plans, loop, reader_bytes), available_memory(device)
    if free is not None and need > 0.9 * free:
        widest = max(plans, key=lambda p: p.sae_cfg.d_sae)
        raise TrainingError(
            f"training needs about {need / 2**30:.1f} GiB ({len(plans)} SAE(s), widest {widest.sae_cfg.d_sae} latents, "
            f"batch {loop.batch_size}) but {device.type} has {free / 2**30:.1f} GiB free; lower --width or --batch-size"
        )
    return need


@dataclass
class Member:
    """A member's live state: the SAE, its optimiser, controller and dead-latent counters."""

    plan: MemberPlan
    sae: SAE
    opt: torch.optim.Adam
    scale: float
    controller: L0Controller | None
    since_fired_F: Tensor
    """Tokens since each latent last fired (int64)."""
    freq_F: Tensor
    """EMA firing frequency per latent (time constant: the dead window)."""
    sums: dict[str, float] = field(default_factory=dict)
    """Scalars summed since the last log row (means are logged)."""
    n_sums: int = 0


@dataclass(frozen=True)
class Progress:
    """What the callback sees: after every log interval, checkpoint and at the end."""

    event: str
    """'log', 'checkpoint', 'done' or 'interrupted'."""
    step: int
    total_steps: int
    tokens: int
    total_tokens: int
    tokens_per_s: float
    rows: list[dict[str, Any]]
    """One row per member: name, loss, parts, l0, fvu, dead_pct, lr, sparsity_coef."""


@dataclass(frozen=True)
class TrainResult:
    status: str
    """'done' or 'interrupted' (checkpoint written; rerun with --resume)."""
    step: int
    tokens: int
    out_dirs: list[Path]
    summaries: list[dict[str, Any]]


class Trainer:
    """Train `plans` from `reader` for `tokens` tokens; checkpoints and metrics go to `run_dir`."""

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
        self.callback = callback or (lambda p: None)
        self.should_stop = should_stop or (lambda: False)
        self.extra_summary = dict(extra_summary or {})
        self.members: list[Member] = []
        self.step = 0
        # Members in lanes (_run_lanes): CPU, several members, several intra-op threads.
        self._threads = torch.get_num_threads()
        cpu = self.device.type == "cpu" and self.loop.member_threads
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
            sae = get_variant(plan.sae_cfg.variant)(plan.sae_cfg)
            sae.init_from_data(x_BD * c)
            member = self._member(plan, sae.to(self.device), c)
            if member.controller is not None:
                self._init_controller(member, x_BD[: self.loop.batch_size] * c)
            self.members.append(member)
        log.info(
            "training %d member(s) for %d steps; dead window %d tokens",
            len(self.plans),
            self.n_steps,
            self.window,
        )

    @torch.no_grad()
    def _init_controller(self, m: Member, x_BD: Tensor) -> None:
        """lambda_0 from the loss parts of the freshly initialised SAE (l0_control.initial_coef)."""
        out = m.sae.training_loss(x_BD.to(self.device), StepState(0, self.n_steps, 0.0))
        mse, sparsity = (float(out.parts.get(k, math.nan)) for k in ("mse", "sparsity"))
        init = initial_coef(mse, sparsity)
        cfg = ControllerConfig.for_run(m.plan.sae_cfg.l0_target, self.n_steps, init, m.sae.l0_gain)
        m.controller = L0Controller(cfg)
        log.info("%s: initial sparsity coefficient %.3g", m.plan.name, init)

    def _member(self, plan: MemberPlan, sae: SAE, scale: float) -> Member:
        opt = torch.optim.Adam(sae.parameters(), lr=plan.lr, betas=plan.betas, eps=ADAM_EPS)
        controller = None
        if plan.steered:
            controller = L0Controller(
                ControllerConfig.for_run(plan.sae_cfg.l0_target, self.n_steps, gain=sae.l0_gain)
            )
        F = plan.sae_cfg.d_sae
        return Member(
            plan=plan,
            sae=sae,
            opt=opt,
            scale=scale,
            controller=controller,
            since_fired_F=torch.zeros(F, dtype=torch.int64, device=self.device),
            freq_F=torch.zeros(F, dtype=torch.float32, device=self.device),
        )

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
            result = self._finish()
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
        step, n_tokens = self.step, self._batch_tokens(batch)
        passes = [self._forward_backward(m, batch, step) for m in self.members]
        values = torch.cat([p.check for p in passes]).tolist()
        offset = 0
        try:
            for m, p in zip(self.members, passes, strict=True):
                self._check(m, p, values[offset : offset + p.check.numel()], batch, step, self.tokens)
                offset += p.check.numel()
        except _StepFailure as err:
            self.save_checkpoint()
            where = f"checkpoint of the last good step in {self.run_dir / CHECKPOINT_DIR}"
            raise TrainingError(err.message(where)) from None
        for m, p in zip(self.members, passes, strict=True):
            self._update(m, p, step, n_tokens)
        self.step += 1
        self.tokens += n_tokens

    # ---- members concurrently (CPU) -------------------------------------------------------------------
    def _run_lanes(self) -> str:
        """The loop with the members in `Lanes`: on CPU with several members and several intra-op threads, each
        member on one intra-op thread (its numbers are those of a solo run on one thread, bit for bit), the
        members concurrently on as many threads, up to LANE_DEPTH batches apart; all at the same step at every
        log row, checkpoint and at the end. The cores stay busy through the single-threaded parts of a step
        (sort, index, embedding bags, Python) without a barrier per step (docs/training.md)."""
        pushed: dict[int, tuple[int, dict[str, Any]]] = {}
        """Tokens before each pushed step and the reader state after it: for messages and a failure checkpoint."""

        def member_step(i: int, step: int, batch: Any) -> None:
            m = self.members[i]
            p = self._forward_backward(m, batch, step)
            self._check(m, p, p.check.tolist(), batch, step, pushed[step][0])
            self._update(m, p, step, self._batch_tokens(batch))

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
            if not isinstance(fail.error, _StepFailure):
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
        assert isinstance(fail.error, _StepFailure)
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

    # ---- one member's step ------------------------------------------------------------------------------
    @staticmethod
    def _batch_tokens(batch: Any) -> int:
        return int(next(iter(batch.acts.values())).shape[0])

    def _forward_backward(self, m: Member, batch: Any, step: int) -> _Pass:
        x_BD = batch.acts[m.plan.key].to(self.device, non_blocking=True).float() * m.scale
        state = StepState(
            step=step,
            total_steps=self.n_steps,
            sparsity_coef=self._coef(m, step),
            dead_F=m.since_fired_F >= self.window,
            freq_F=m.freq_F,
        )
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.loop.autocast == "bf16"):
            out = m.sae.training_loss(x_BD, state)
        m.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        parts = [out.loss.detach().float(), out.l0.float(), *(v.float() for v in out.parts.values())]
        grad_norm = global_grad_norm(m.sae.parameters())  # logged; before projection, normalisation
        check = torch.stack([torch.isfinite(x_BD).all().float(), *parts, grad_norm])
        return _Pass(out, state, x_BD, check)

    def _check(self, m: Member, p: _Pass, values: list[float], batch: Any, step: int, tokens: int) -> None:
        """Raise _StepFailure for bad data or a non-finite loss (`values`: the host copy of `p.check`), else add
        the step's numbers to the member's log sums."""
        data_ok, loss, l0, *parts, grad_norm = values
        if data_ok != 1.0:
            x = batch.acts[m.plan.key]
            bad = (~torch.isfinite(x).all(dim=1)).nonzero().flatten()
            where = ""
            if getattr(batch, "index", None) is not None and bad.numel():
                where = f" at store token {int(batch.index[bad[0]])}"
            raise _StepFailure(
                f"NaN/Inf in the activations of layer {m.plan.key[0]} {m.plan.key[1]}{where} (array "
                f"acts/{m.plan.key[1]}/{m.plan.key[0]}, step {step + 1}, tokens {tokens})",
                "run `actcache verify` on the store; if it passes, the model wrote them: harvest again in fp32",
            )
        if not math.isfinite(loss) or not all(math.isfinite(v) for v in parts):
            raise _StepFailure(
                f"member {m.plan.name}: loss is {loss} at step {step + 1} (tokens {tokens})",
                "lower --lr or check the data",
            )
        self._accumulate(m, loss, l0, dict(zip(p.out.parts, parts, strict=True)), grad_norm)

    def _update(self, m: Member, p: _Pass, step: int, n_tokens: int) -> None:
        """The optimizer step and what follows it: the L0 trim, dead-latent counters, controller, log sums."""
        lr_mult = lr_multiplier(step, self.n_steps, self.loop)
        trim_start = (
            math.ceil(self.n_steps * (1.0 - self.loop.l0_trim_fraction))
            if self.loop.l0_trim_fraction
            else self.n_steps
        )
        m.sae.before_optimizer_step()
        if self.loop.grad_normalize:
            normalize_grad_(m.sae.parameters())
        elif self.loop.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(m.sae.parameters(), self.loop.grad_clip)
        for group in m.opt.param_groups:
            group["lr"] = m.plan.lr * lr_mult
        m.opt.step()
        m.sae.after_optimizer_step()
        trim = None
        if m.controller is not None and step >= trim_start:
            trim = trim_to_target(m.sae, p.x_BD, m.plan.sae_cfg.l0_target, TRIM_RATE, m.controller.trim_shift)
        self._track(m, p.out.fired_F, n_tokens)
        if m.controller is not None:
            # While the trim holds the L0, lambda follows the L0 the SAE would have without the trim: the
            # trim closes the gap at once, lambda drains it (docs/training.md, "Steering the L0").
            if trim is not None:
                m.controller.trim_shift += trim.shift
            m.controller.update(trim.l0_untrimmed if trim is not None else m.sums["l0_last"])
        if self._logging_next(step):
            m.sums["fvu"] = m.sums.get("fvu", 0.0) + _batch_fvu(p.x_BD, p.out.x_hat_BD)
            m.sums["n_fvu"] = m.sums.get("n_fvu", 0.0) + 1
        m.sums["lr"] = m.plan.lr * lr_mult
        m.sums["sparsity_coef"] = p.state.sparsity_coef

    @property
    def member_workers(self) -> int:
        """Members trained at once (threads; 1: one after another)."""
        return self._workers

    def _logging_next(self, step: int) -> bool:
        return (step + 1) % self.loop.log_every == 0 or step + 1 >= self.n_steps

    def _coef(self, m: Member, step: int) -> float:
        if m.controller is not None:
            return m.controller.coef
        frac = self.loop.sparsity_warmup_fraction
        warm = max(1, int(frac * self.n_steps)) if frac > 0 else 0
        return m.plan.fixed_coef * (min(1.0, (step + 1) / warm) if warm else 1.0)

    @torch.no_grad()
    def _track(self, m: Member, fired_F: Tensor, n_tokens: int) -> None:
        fired_F = fired_F.to(self.device)
        m.since_fired_F += n_tokens
        m.since_fired_F[fired_F > 0] = 0
        rate = min(1.0, n_tokens / self.window)
        m.freq_F.mul_(1 - rate).add_(fired_F.float() / n_tokens, alpha=rate)

    def _accumulate(
        self, m: Member, loss: float, l0: float, parts: dict[str, float], grad_norm: float
    ) -> None:
        m.sums["loss"] = m.sums.get("loss", 0.0) + loss
        m.sums["grad_norm_max"] = max(m.sums.get("grad_norm_max", 0.0), grad_norm)
        m.sums["l0"] = m.sums.get("l0", 0.0) + l0
        m.sums["l0_last"] = l0
        for k, v in parts.items():
            m.sums[f"part_{k}"] = m.sums.get(f"part_{k}", 0.0) + v
        m.n_sums += 1

    # ---- logging ---------------------------------------------------------------------------------------
    def _log_rows(self, tokens_per_s: float) -> Progress:
        rows = []
        for m in self.members:
            n = max(m.n_sums, 1)
            dead_pct = 100.0 * float((m.since_fired_F >= self.window).float().mean())
            row = {
                "step": self.step,
                "tokens": self.tokens,
                "member": m.plan.name,
                "loss": m.sums.get("loss", math.nan) / n,
                "l0": m.sums.get("l0", math.nan) / n,
                "fvu": m.sums["fvu"] / m.sums["n_fvu"] if m.sums.get("n_fvu") else math.nan,
                "dead_pct": dead_pct,
                "grad_norm_max": m.sums.get("grad_norm_max", math.nan),
                "lr": m.sums.get("lr", math.nan),
                "sparsity_coef": m.sums.get("sparsity_coef", math.nan),
                "tokens_per_s": tokens_per_s,
                "elapsed_s": self.elapsed_s,
                "data_wait_s": float(getattr(self.reader, "wait_seconds", math.nan)),
            }
            row.update({k: v / n for k, v in m.sums.items() if k.startswith("part_")})
            rows.append(row)
            m.sums, m.n_sums = {}, 0
        self.rows.extend(rows)
        return self._progress("log", tokens_per_s, rows)

    def _progress(self, event: str, tokens_per_s: float, rows: list[dict[str, Any]]) -> Progress:
        return Progress(event, self.step, self.n_steps, self.tokens, self.tokens_total, tokens_per_s, rows)

    def _write_metrics(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.rows:
            return
        with io.atomic_path(self.run_dir / METRICS_FILE) as tmp:
            pq.write_table(pa.Table.from_pylist(self.rows), tmp)

    # ---- checkpoints -----------------------------------------------------------------------------------
    def save_checkpoint(self, reader_state: dict[str, Any] | None = None) -> Path:
        """Write the full training state (tensors file named by step, then state.json pointing at it); the reader's
        position is its current one unless `reader_state` is given."""
        ckpt = self.run_dir / CHECKPOINT_DIR
        ckpt.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {"rng.cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        members = []
        for i, m in enumerate(self.members):
            for k, v in m.sae.state_dict().items():
                tensors[f"m{i}.sae.{k}"] = v
            opt_state = m.opt.state_dict()
            for pid, st in opt_state["state"].items():
                for k, v in st.items():
                    tensors[f"m{i}.opt.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"m{i}.since_fired_F"] = m.since_fired_F
            tensors[f"m{i}.freq_F"] = m.freq_F
            members.append(
                {
                    "name": m.plan.name,
                    "key": list(m.plan.key),
                    "sae": m.plan.sae_cfg.to_dict(),
                    "scale": m.scale,
                    "controller": m.controller.state_dict() if m.controller else None,
                    "param_groups": opt_state["param_groups"],
                    "sums": m.sums,
                    "n_sums": m.n_sums,
                }
            )
        name = f"state-{self.step:09d}.safetensors"
        io.write_tensors_atomic(ckpt / name, tensors)
        self._write_metrics()
        io.write_json_atomic(
            ckpt / "state.json",
            {
                "format": CHECKPOINT_FORMAT,
                "format_version": 1,
                "tensors": name,
                "step": self.step,
                "tokens": self.tokens,
                "tokens_total": self.tokens_total,
                "elapsed_s": self.elapsed_s,
                "members": members,
                "reader": self.reader.state_dict() if reader_state is None else reader_state,
                "metrics_rows": len(self.rows),
            },
        )
        for old in ckpt.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        log.info("checkpoint at step %d (%d tokens) in %s", self.step, self.tokens, ckpt)
        return ckpt

    def resume(self, calibration: dict[Key, Tensor]) -> None:
        """Load the checkpoint in run_dir: weights, Adam, controllers, counters, RNG, reader position, metrics.
        `calibration`: the tokens `start` had for the final `calibrate` (data.calibration_sample is deterministic)."""
        self.calibration = calibration
        ckpt = self.run_dir / CHECKPOINT_DIR
        if not (ckpt / "state.json").is_file():
            raise TrainingError(f"no checkpoint in {ckpt} to resume from; start without --resume")
        state = io.read_json(ckpt / "state.json")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{ckpt / 'state.json'} is not an sae_cli checkpoint")
        saved = state["members"]
        self._check_same_members(saved, ckpt)
        tensors = io.read_tensors(ckpt / state["tensors"])
        bad = io.non_finite({k: v for k, v in tensors.items() if ".sae." in k})
        if bad is not None:
            raise TrainingError(
                f"{ckpt / state['tensors']} holds NaN/Inf in tensor {bad}; the checkpoint is damaged: pass "
                "--overwrite to start over"
            )
        for i, (plan, s) in enumerate(zip(self.plans, saved, strict=True)):
            sae = get_variant(plan.sae_cfg.variant)(plan.sae_cfg)
            sae.load_state_dict(
                {k[len(f"m{i}.sae.") :]: v for k, v in tensors.items() if k.startswith(f"m{i}.sae.")}
            )
            m = self._member(plan, sae.to(self.device), float(s["scale"]))
            opt_state: dict[str, Any] = {"state": {}, "param_groups": s["param_groups"]}
            prefix = f"m{i}.opt."
            for k, v in tensors.items():
                if k.startswith(prefix):
                    pid, name = k[len(prefix) :].split(".", 1)
                    opt_state["state"].setdefault(int(pid), {})[name] = v
            m.opt.load_state_dict(opt_state)
            if m.controller is not None and s["controller"]:
                m.controller.load_state_dict(s["controller"])
            m.since_fired_F.copy_(tensors[f"m{i}.since_fired_F"])
            m.freq_F.copy_(tensors[f"m{i}.freq_F"])
            m.sums, m.n_sums = dict(s.get("sums", {})), int(s.get("n_sums", 0))
            self.members.append(m)
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.reader.load_state_dict(state["reader"])
        self.step, self.tokens, self.elapsed_s = (
            int(state["step"]),
            int(state["tokens"]),
            float(state["elapsed_s"]),
        )
        self.rows = self._read_metrics()[: int(state.get("metrics_rows", 0))]
        log.info("resumed at step %d (%d tokens)", self.step, self.tokens)

    def _check_same_members(self, saved: list[dict[str, Any]], ckpt: Path) -> None:
        """TrainingError unless the checkpoint holds the same SAEs (variant, shape, options, site) in order."""
        if len(saved) != len(self.plans):
            raise TrainingError(
                f"the checkpoint in {ckpt} holds {len(saved)} member(s), not {len(self.plans)}; pass --overwrite"
            )
        for plan, s in zip(self.plans, saved, strict=True):
            mine, theirs = plan.sae_cfg.to_dict(), s["sae"]
            diffs = [f"{k} {theirs.get(k)!r} -> {mine[k]!r}" for k in mine if mine[k] != theirs.get(k)]
            if list(plan.key) != s["key"]:
                diffs.append(f"layer/site {s['key']} -> {list(plan.key)}")
            if diffs:
                raise TrainingError(
                    f"cannot resume: the checkpoint in {ckpt} is of another variant or shape ({'; '.join(diffs)}); "
                    "resume with the same settings or pass --overwrite to start over"
                )
        if [s["name"] for s in saved] != [p.name for p in self.plans]:
            raise TrainingError(
                f"the checkpoint in {ckpt} holds members {[s['name'] for s in saved]}, not "
                f"{[p.name for p in self.plans]}; resume with the same names, or pass --overwrite"
            )

    def _read_metrics(self) -> list[dict[str, Any]]:
        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            return []
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()

    # ---- the end ---------------------------------------------------------------------------------------
    def _finish(self) -> TrainResult:
        summaries = []
        for m in self.members:
            sae = get_variant(m.plan.sae_cfg.variant)(m.plan.sae_cfg)
            sae.load_state_dict(m.sae.state_dict())
            sae = sae.to(self.device)
            if self.loop.calibrate and m.plan.key in self.calibration:
                x_ND = self.calibration[m.plan.key].to(self.device).float() * m.scale
                sae.calibrate(x_ND, self.loop.batch_size)
            sae = sae.cpu()
            sae.fold_scale(m.scale)
            summary = {
                **self.extra_summary,
                "name": m.plan.name,
                "layer": m.plan.key[0],
                "site": m.plan.key[1],
                "input_scale_folded": m.scale,
                "tokens": self.tokens,
                "steps": self.step,
                "batch_size": self.loop.batch_size,
                "lr": m.plan.lr,
                "adam_betas": list(m.plan.betas),
                "adam_eps": ADAM_EPS,
                "steered": m.plan.steered,
                "final_sparsity_coef": m.controller.coef if m.controller else m.plan.fixed_coef,
                "train_l0_ema": m.controller.l0_ema if m.controller else None,
                "dead_window_tokens": self.window,
                "train_dead_pct": 100.0 * float((m.since_fired_F >= self.window).float().mean()),
                "elapsed_s": self.elapsed_s,
                "seed": self.loop.seed,
            }
            io.save_sae(m.plan.out_dir, sae, summary, freq_F=m.freq_F.cpu())
            summaries.append(summary)
        self._write_metrics()
        return TrainResult("done", self.step, self.tokens, [m.plan.out_dir for m in self.members], summaries)


@torch.no_grad()
def global_grad_norm(params: Iterable[Tensor]) -> Tensor:
    """The L2 norm of all gradients of `params` together (fp32; 0 when none has a gradient)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


@torch.no_grad()
def normalize_grad_(params: Iterable[Tensor]) -> None:
    """Scale the gradients of `params` together to global norm 1 (no-op on a zero gradient). Adam is invariant to
    a constant gradient scale, so what this changes is how steps weigh against each other: without it, the large
    gradients of the first steps and of batches with a massive-norm token (up to ~700x the median on SmolLM2)
    fill Adam's second moment, which remembers ~1/(1 - beta2) = 1000 steps, and shrink the later updates
    (docs/training.md, "Gradient normalisation")."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norm = global_grad_norm(params)
    scale = torch.where(norm > 0, 1.0 / norm, torch.ones_like(norm))
    torch._foreach_mul_(grads, scale)


def _batch_fvu(x_BD: Tensor, x_hat_BD: Tensor) -> float:
    with torch.no_grad():
        x, x_hat = x_BD.float(), x_hat_BD.detach().float()
        total = (x - x.mean(0)).pow(2).sum()
        return float((x - x_hat).pow(2).sum() / total.clamp_min(1e-30))


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """Within the block, Ctrl-C / SIGTERM set a flag (the loop checkpoints and returns); a second Ctrl-C
    raises KeyboardInterrupt as usual. Yields `should_stop`."""
    flag = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True
        log.warning("signal %d: checkpointing and stopping after this step", signum)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: no handlers, never stops early
        pass
    try:
        yield lambda: flag["stop"]
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
