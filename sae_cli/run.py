"""The one run path of `sae train` and `sae sweep`: prepare N members (a solo run is a sweep of one), start
them, train them, record the run. The CLI modules only parse, print and call this.

Set-up reads top to bottom in `prepare_run` and writes nothing: the folder's own checks, the device, the store
(opened once here and handed to everything that reads it), the output folder (`check_out`), the recorded
ranges on a resume, the token ranges and the resolved loop (data.plan_ranges), the store identity, the member
plans, the L0 targets, the memory estimate (before any SAE is built), the variants' options (on the meta
device), the reader and the trainer. `run_training` then starts the members (`start_run`: normalisation scales,
sample, calibration tokens, or the checkpoint), creates the folder, writes its record and runs the loop; a fresh
run that fails before its first checkpoint leaves no folder behind.

What differs between a run folder and a sweep folder (where the members go, the record file, the wording and
the memory check's advice) is a `RunFolder`: `SoloRun` below for `sae train` (cfg.json, sae.safetensors,
train_config.json, checkpoint/, metrics.parquet at the top of --out), `sweep.SweepRun` for `sae sweep`
(members/<name>/, sweep.json).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from . import data, e2e_setup, io
from .config import ConfigError, LoopConfig, TrainConfig
from .reducer import LOCAL, Reducer
from .registry import get_variant
from .trainer import (
    CHECKPOINT_DIR,
    MemberPlan,
    Trainer,
    TrainResult,
    check_l0_targets,
    check_memory,
    check_variant_options,
    plan_member,
)

Key = tuple[int, str]
TRAIN_CONFIG_FILE = "train_config.json"


class RunFolder(Protocol):
    """The folder of one run of N members and what is specific to its kind."""

    cfg: Any
    """The run's config as its command took it (TrainConfig, SweepConfig); recorded by write_record."""
    out: Path
    noun: str
    """'run' or 'sweep': the word of the messages ("the sweep in OUT stopped before ...")."""
    kind: str
    """What a foreign folder is not: 'an sae run', 'a sweep folder'."""
    error: type[Exception]
    """The error of the folder checks (ConfigError, SweepError)."""
    trained_glob: str
    """Glob (under out) of a trained member's cfg.json: a folder holding one is kept after a failed start."""
    store: str
    loop: LoopConfig
    """The loop as requested (0: automatic batch size and length)."""
    keys: list[Key]
    objectives: set[str]
    """The members' objectives (MemberConfig.objective): any end-to-end one makes the batches whole windows."""
    variants: list[str]
    """The members' variant names: tokens are held back for the final calibration only when one calibrates."""

    def validate(self) -> None: ...
    def is_ours(self) -> bool: ...
    def recorded(self) -> dict[str, Any]: ...
    def plan(self, d_in: int, steps: int, batch_size: int) -> list[MemberPlan]: ...
    def check_memory(
        self, plans: list[MemberPlan], loop: LoopConfig, device: torch.device, reader_bytes: int
    ) -> tuple[int, int | None]: ...
    def summary(self) -> dict[str, Any]: ...
    def write_record(self, prep: PreparedRun, result: TrainResult | None = None) -> None: ...


def resolve_device(name: str) -> str:
    """The torch device of --device ('auto': cuda if available, else cpu), checked to exist on this machine
    (actcache.models.resolve_device; ConfigError naming the fix) before anything is read or written."""
    from actcache import models

    try:
        return models.resolve_device(name)
    except models.ModelError as e:
        raise ConfigError(str(e)) from None


def reader_bytes(store: Any, keys: list[Key], loop: LoopConfig) -> int:
    """The reader's decoded buffers: about two groups of `mix_chunks` chunks in flight, fp32, per key."""
    return 2 * loop.mix_chunks * store.spec.chunk_tokens * store.d_model * 4 * len(keys)


# ---- the output folder ---------------------------------------------------------------------------------------
def never_checkpointed(folder: RunFolder) -> bool:
    """A folder whose start wrote its record but neither a checkpoint nor a trained member."""
    out = folder.out
    return not (out / CHECKPOINT_DIR / "state.json").is_file() and not any(out.glob(folder.trained_glob))


def check_out(folder: RunFolder, resume: bool, overwrite: bool) -> None:
    """Refuse to touch a folder that is not of this kind; --overwrite removes only such folders (after all checks
    passed); --resume needs a checkpoint. Writes nothing."""
    out, error, noun = folder.out, folder.error, folder.noun
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if resume:
            raise error(f"nothing to resume in {out}; start without --resume")
        return
    if not folder.is_ours():
        raise error(f"{out} exists and is not {folder.kind}; choose another --out")
    if never_checkpointed(folder):  # killed or failed before its first checkpoint: nothing to keep
        if resume:
            raise error(
                f"the {noun} in {out} stopped before its first checkpoint: nothing to resume; rerun without --resume"
            )
        return
    if resume:
        if not (out / CHECKPOINT_DIR / "state.json").is_file():
            raise error(f"{out} has no checkpoint to resume from; pass --overwrite to start over")
        return
    if not overwrite:
        raise error(
            f"{out} already holds a {noun}; pass --resume to continue it or --overwrite to replace it"
        )


# ---- set-up ----------------------------------------------------------------------------------------------------
@dataclass
class PreparedRun:
    """Everything checked and built in memory; nothing written yet (run_training writes)."""

    folder: RunFolder
    loop: LoopConfig
    """The requested loop with the automatic batch size and run length resolved (config.resolve_loop)."""
    store: Any
    """The store, opened once for the whole run."""
    plans: list[MemberPlan]
    trainer: Trainer
    reader: Any
    keys: list[Key]
    ranges: data.Ranges
    device: torch.device
    memory_bytes: int
    memory_free: int | None
    resume: bool
    identity: dict[str, Any] | None = None
    """The store's identity as the run recorded it (data.run_identity); None for runs made before."""
    sample: dict[Key, torch.Tensor] | None = None
    """The normalisation and init sample (a fresh start)."""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def cfg(self) -> Any:
        return self.folder.cfg

    @property
    def out(self) -> Path:
        return self.folder.out

    @property
    def tokens(self) -> int:
        return self.loop.tokens

    @property
    def train_range(self) -> tuple[int, int]:
        return self.ranges.train

    @property
    def calib_range(self) -> tuple[int, int]:
        return self.ranges.calibration

    @property
    def eval_range(self) -> tuple[int, int]:
        return self.ranges.eval


def prepare_run(
    folder: RunFolder,
    *,
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    reducer: Reducer | None = None,
) -> PreparedRun:
    """Validate, plan every member, resolve the loop, check memory, build the reader and the trainer; writes
    nothing. A resume takes the recorded ranges and length and refuses any other store. `reducer`: the process
    group of a data-parallel run (sae_cli/reducer.py; each rank reads its share, on its own GPU)."""
    folder.validate()
    reducer = reducer or LOCAL
    dev = torch.device(resolve_device(str(device)))
    if reducer.world_size > 1 and dev.type == "cuda":
        dev = torch.device(getattr(reducer, "device", dev))
    store = data.open_store(folder.store)
    data.check_keys(store, folder.keys)
    check_out(folder, resume, overwrite)
    saved = folder.recorded() if resume else None
    calibrates = any(get_variant(v).calibrates for v in folder.variants)
    ranges, loop = data.plan_ranges(store, folder.loop, saved, calibrates)
    loop = e2e_setup.window_loop(loop, store.spec.context, folder.objectives)  # e2e: whole windows
    identity = data.run_identity(store, ranges, saved, f"the {folder.noun} in {folder.out}")
    plans = folder.plan(store.d_model, math.ceil(loop.tokens / loop.batch_size), loop.batch_size)
    plans = keep_recorded_lr(plans, saved)
    e2e_setup.check(store, plans, loop)
    check_l0_targets(plans)
    # The memory check comes before any SAE is built; the variants then check their options on the meta device.
    need, free = folder.check_memory(plans, loop, dev, reader_bytes(store, folder.keys, loop))
    check_variant_options(plans)
    summary = {
        "store": str(store.path),
        "store_model": store.spec.model,
        "store_tokens": store.committed_tokens,
        "train_range": list(ranges.train),
        "calibration_range": list(ranges.calibration),
        "eval_range": list(ranges.eval),
        "drop_bos": loop.drop_bos,
        "normalize": loop.normalize,
        **folder.summary(),
        **({"store_identity": identity} if identity is not None else {}),
    }
    e2e = e2e_setup.is_e2e(folder.objectives)
    if e2e and reducer.world_size > 1:
        raise ConfigError("the e2e objective trains in one process; run it without torchrun")
    if e2e:  # the store's model, frozen; only the layers after the SAE's run
        reader, objectives, e2e_summary = e2e_setup.build(store, plans, loop, ranges.train, dev)
        summary.update(e2e_summary)
    else:
        rank, world = reducer.rank, reducer.world_size
        reader, objectives = data.train_reader(store, folder.keys, loop, ranges.train, rank, world), {}
    trainer = Trainer(
        plans, loop, reader, folder.out, loop.tokens, device=dev, extra_summary=summary, objectives=objectives,
        reducer=reducer,
    )  # fmt: skip
    return PreparedRun(
        folder=folder, loop=loop, store=store, plans=plans, trainer=trainer, reader=reader, keys=folder.keys,
        ranges=ranges, device=dev, memory_bytes=need, memory_free=free, resume=resume, identity=identity,
    )  # fmt: skip


def keep_recorded_lr(plans: list[MemberPlan], saved: dict[str, Any] | None) -> list[MemberPlan]:
    """A resume trains on at the lr its record resolved, not at what today's default-lr rule would give (the
    rule may have changed since the run started). A solo record has one `lr`; a sweep's, one per member."""
    if saved is None:
        return plans
    members = saved["members"] if "members" in saved else [{"name": plans[0].name, "lr": saved.get("lr")}]
    recorded = {m["name"]: m.get("lr") for m in members}
    return [p if recorded.get(p.name) is None else replace(p, lr=float(recorded[p.name])) for p in plans]


def start_run(prep: PreparedRun) -> None:
    """Initialise (or resume) the members, then create the folder and write its record; after this the folder
    is a run of its kind."""
    t0 = time.perf_counter()
    store, keys, loop, ranges = prep.store, prep.keys, prep.loop, prep.ranges
    if prep.resume:
        prep.trainer.resume(
            data.calibration_sample(store, keys, loop, ranges.train, ranges.calibration, finite=True)
        )
    else:
        scales = None
        if loop.normalize == "store":
            scales = {k: data.store_scale(store, k) for k in keys}
        elif loop.normalize == "none":
            scales = {k: 1.0 for k in keys}
        prep.sample = data.sample(store, keys, loop, ranges.train, finite=True)
        calibration = data.calibration_sample(
            store, keys, loop, ranges.train, ranges.calibration, prep.sample, finite=True
        )
        prep.trainer.start(prep.sample, scales, calibration)
        if prep.trainer.reducer.is_main:  # only rank 0 of a process group writes
            if prep.out.exists():
                shutil.rmtree(
                    prep.out
                )  # --overwrite of a folder of this kind (check_out refused anything else)
            prep.out.mkdir(parents=True)
    prep.timings["setup_s"] = time.perf_counter() - t0
    if prep.trainer.reducer.is_main:
        prep.folder.write_record(prep)


def run_training(
    prep: PreparedRun,
    run: Callable[[Trainer], TrainResult] | None = None,
    started: Callable[[PreparedRun], None] | None = None,
) -> TrainResult:
    """start_run, `started(prep)` (the CLI's header), then the loop: `run(trainer)` (the CLI's live view) or
    `trainer.run()`; the record is updated at the end. A fresh run that fails before its first checkpoint leaves
    no folder behind (a plain rerun starts cleanly); one with a checkpoint stays for --resume."""
    main = prep.trainer.reducer.is_main
    prep.trainer.reducer.barrier()  # every rank checked the folder before rank 0 touches it
    try:
        start_run(prep)
        if started is not None:
            started(prep)
        t0 = time.perf_counter()
        result = run(prep.trainer) if run is not None else prep.trainer.run()
    except BaseException:
        if main and not prep.resume and prep.out.is_dir() and never_checkpointed(prep.folder):
            shutil.rmtree(prep.out, ignore_errors=True)
        raise
    prep.timings["train_s"] = time.perf_counter() - t0
    if main:
        prep.folder.write_record(prep, result)
    return result


# ---- `sae train`: a run of one member --------------------------------------------------------------------------
@dataclass
class SoloRun:
    """`sae train`'s folder: the member's SAE, checkpoint/, metrics.parquet and train_config.json at the top."""

    cfg: TrainConfig
    out: Path
    noun = "run"
    kind = "an sae run"
    error = ConfigError
    trained_glob = io.CFG_FILE

    @property
    def store(self) -> str:
        return self.cfg.store

    @property
    def loop(self) -> LoopConfig:
        return self.cfg.loop

    @property
    def keys(self) -> list[Key]:
        return [(self.cfg.member.layer, self.cfg.member.site)]

    @property
    def objectives(self) -> set[str]:
        return {self.cfg.member.objective}

    @property
    def variants(self) -> list[str]:
        return [self.cfg.member.variant]

    def validate(self) -> None:
        get_variant(self.cfg.member.variant)  # unknown name -> KeyError naming the choices

    def is_ours(self) -> bool:
        ours = (TRAIN_CONFIG_FILE, CHECKPOINT_DIR, io.CFG_FILE)
        return self.out.is_dir() and any((self.out / n).exists() for n in ours)

    def recorded(self) -> dict[str, Any]:
        return io.read_json(self.out / TRAIN_CONFIG_FILE)["resolved"]

    def plan(self, d_in: int, steps: int, batch_size: int) -> list[MemberPlan]:
        return [plan_member(self.cfg.member, d_in, self.out, steps=steps, batch_size=batch_size)]

    def check_memory(
        self, plans: list[MemberPlan], loop: LoopConfig, device: torch.device, reader_bytes: int
    ) -> tuple[int, int | None]:
        return check_memory(plans, loop, device, reader_bytes), None

    def summary(self) -> dict[str, Any]:
        return {}

    def write_record(self, prep: PreparedRun, result: TrainResult | None = None) -> None:
        """train_config.json, once, at the start: the flat config (what --resume reads back) and what it
        resolved to (what the header prints; the ranges a resume keeps)."""
        if result is not None:
            return
        plan = prep.plans[0]
        resolved = {
            "d_in": plan.sae_cfg.d_in,
            "d_sae": plan.sae_cfg.d_sae,
            "lr": plan.lr,
            "adam_betas": list(plan.betas),
            "steered": plan.steered,
            "tokens": prep.tokens,
            "batch_size": prep.loop.batch_size,
            "train_range": list(prep.ranges.train),
            "calibration_range": list(prep.ranges.calibration),
            "eval_range": list(prep.ranges.eval),
            "device": str(prep.device),
            "memory_estimate_bytes": prep.memory_bytes,
            **({"store_identity": prep.identity} if prep.identity is not None else {}),
        }
        io.write_json_atomic(
            self.out / TRAIN_CONFIG_FILE, {"config": self.cfg.to_flat(), "resolved": resolved}
        )
