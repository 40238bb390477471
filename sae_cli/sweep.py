"""Cheap sweeps: many SAEs trained in one loop from one pass over the data, then evaluated and tabulated.

The member set is the cross product of lists (layers x sites x variants x widths x L0 targets; `SweepConfig`,
sae_cli/sweep_config.py). A sweep runs through the one run path (sae_cli/run.py) with a `SweepRun` folder: every
member is a `MemberPlan` of the one trainer (sae_cli/trainer.py), which feeds all of them the same decoded batch
per step, so reading and decoding the store is paid once per sweep instead of once per SAE. A member's weights
are bit-identical to a solo `sae train` of the same settings and seed (tests/test_sweep.py): the sweep only
shares the data, never the randomness or the optimiser.

Folder layout (docs/sweeps.md): `sweep.json` (the config, the resolved members, timings), `checkpoint/` and
`metrics.parquet` (the trainer's), `members/<name>/` (each SAE with its eval.json and density.png),
`summary.parquet` + `summary.md` (sae_cli/summary.py), `pareto/*.png` (sae_cli/pareto.py).

Equal-shape members are not batched into one matmul on CPU: scripts/bench_sweep.py measured no gain worth losing
the bit-exactness (stacked TopK 7 % slower, JumpReLU 6 % faster; docs/benchmarks.md, "Sweeps"); `shape_groups`
names the groups a batched GPU step would stack (sae_cli/batched.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import data, io
from .config import LoopConfig
from .run import PreparedRun, prepare_run, run_training, start_run
from .summary import evaluate_saes, summary_rows, write_summary
from .sweep_config import (
    MEMBERS_DIR,
    SWEEP_FILE,
    SWEEP_FORMAT,
    SweepConfig,
    SweepError,
    parse_layers,
    parse_list,
    read_sweep,
    saved_config,
)
from .trainer import MemberPlan, TrainResult, available_memory, estimate_memory, plan_member

__all__ = [
    "MEMBERS_DIR", "SWEEP_FILE", "SWEEP_FORMAT", "PreparedSweep", "SweepConfig", "SweepError", "SweepRun",
    "check_sweep_memory", "evaluate_members", "evaluate_missing", "finish_sweep", "load_lm", "parse_layers",
    "parse_list", "plan_sweep", "prepare_sweep", "read_sweep", "run_sweep", "run_training", "saved_config",
    "shape_groups", "start_training",
]  # fmt: skip

PARETO_DIR = "pareto"
# The trainer refuses above 90 % of the free memory (trainer.check_memory); the sweep uses the same margin.
MEMORY_MARGIN = 0.9
PreparedSweep = PreparedRun
start_training = start_run


# ---- planning ------------------------------------------------------------------------------------------------
def plan_sweep(
    cfg: SweepConfig, d_in: int, out: str | Path, steps: int | None = None, batch_size: int | None = None
) -> list[MemberPlan]:
    """Resolve every member against the data width and the run length in steps of `batch_size` tokens (the
    default lr depends on them, exactly as in `sae train`); SweepError when two members resolve to the same SAE
    (e.g. --width 8x,4608 at d_model 576)."""
    plans = [
        plan_member(m, d_in, Path(out) / MEMBERS_DIR, steps=steps, batch_size=batch_size)
        for m in cfg.members()
    ]
    plans = [dataclasses.replace(p, out_dir=Path(out) / MEMBERS_DIR / p.name) for p in plans]
    seen: set[str] = set()
    for p in plans:
        if p.name in seen:
            raise SweepError(f"two members resolve to {p.name}; drop the duplicate width or L0 target")
        seen.add(p.name)
    return plans


def shape_groups(plans: list[MemberPlan]) -> list[list[int]]:
    """Indices of members that a batched step could stack into [M, F, D] tensors: same variant, key and shape
    (the L0 target may differ: TopK masks a shared top-k_max, steered members carry one lambda each)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(plans):
        groups.setdefault((p.sae_cfg.variant, p.key, p.sae_cfg.d_in, p.sae_cfg.d_sae), []).append(i)
    return list(groups.values())


def check_sweep_memory(
    plans: list[MemberPlan], loop: LoopConfig, device: torch.device, extra_bytes: int = 0
) -> tuple[int, int | None]:
    """(bytes needed, bytes free) for the whole member set (trainer.estimate_memory); SweepError naming the
    figure and the fix when it exceeds 90 % of the free memory. Runs before anything is allocated."""
    need, free = estimate_memory(plans, loop, extra_bytes), available_memory(device)
    if free is not None and need > MEMORY_MARGIN * free:
        widest = max(p.sae_cfg.d_sae for p in plans)
        fit = 0  # how many members (in order) fit: the estimate grows with each member's weights
        while (
            fit < len(plans) and estimate_memory(plans[: fit + 1], loop, extra_bytes) <= MEMORY_MARGIN * free
        ):
            fit += 1
        fix = (
            f"train fewer members per sweep ({fit} of these fit), a smaller --width, or a smaller --batch-size"
            if fit
            else "not even one member fits: use a smaller --width or a smaller --batch-size"
        )
        raise SweepError(
            f"the sweep needs about {need / 2**30:.1f} GiB ({len(plans)} members, widest {widest} latents, "
            f"batch {loop.batch_size}) but {device.type} has {free / 2**30:.1f} GiB free; {fix}"
        )
    return need, free


# ---- the sweep folder ------------------------------------------------------------------------------------------
@dataclass
class SweepRun:
    """`sae sweep`'s folder for the run path (sae_cli/run.py): members/<name>/, sweep.json."""

    cfg: SweepConfig
    out: Path
    tokens: int = 0
    """Overrides cfg.loop.tokens (0: as cfg.loop)."""
    noun = "sweep"
    kind = "a sweep folder"
    error = SweepError
    trained_glob = f"{MEMBERS_DIR}/*/{io.CFG_FILE}"

    @property
    def store(self) -> str:
        return self.cfg.store

    @property
    def loop(self) -> LoopConfig:
        return dataclasses.replace(self.cfg.loop, tokens=self.tokens or self.cfg.loop.tokens)

    @property
    def keys(self) -> list[tuple[int, str]]:
        return [(layer, site) for layer in self.cfg.layers for site in self.cfg.sites]

    @property
    def objectives(self) -> set[str]:
        return set(self.cfg.objectives)

    @property
    def variants(self) -> list[str]:
        return list(self.cfg.variants)

    def validate(self) -> None:
        self.cfg.validate()

    def is_ours(self) -> bool:
        return (self.out / SWEEP_FILE).is_file()

    def recorded(self) -> dict[str, Any]:
        return io.read_json(self.out / SWEEP_FILE)

    def plan(self, d_in: int, steps: int, batch_size: int) -> list[MemberPlan]:
        return plan_sweep(self.cfg, d_in, self.out, steps=steps, batch_size=batch_size)

    def check_memory(
        self, plans: list[MemberPlan], loop: LoopConfig, device: torch.device, reader_bytes: int
    ) -> tuple[int, int | None]:
        return check_sweep_memory(plans, loop, device, reader_bytes)

    def summary(self) -> dict[str, Any]:
        return {"sweep": str(self.out)}

    def write_record(self, prep: PreparedRun, result: TrainResult | None = None) -> None:
        """sweep.json: at the start (status 'training') and after the loop (its status and timings)."""
        io.write_json_atomic(
            self.out / SWEEP_FILE,
            {
                "format": SWEEP_FORMAT,
                "format_version": 1,
                "config": self.cfg.to_dict(),
                "tokens": prep.tokens,
                "batch_size": prep.loop.batch_size,
                "train_range": list(prep.train_range),
                "calibration_range": list(prep.calib_range),
                "eval_range": list(prep.eval_range),
                "device": str(prep.device),
                "memory_estimate_bytes": prep.memory_bytes,
                "memory_free_bytes": prep.memory_free,
                "shape_groups": [[prep.plans[i].name for i in g] for g in shape_groups(prep.plans)],
                "members": [_member_record(p, self.out) for p in prep.plans],
                "status": result.status if result else "training",
                "timings": dict(prep.timings),
                "reader_wait_s": float(getattr(prep.reader, "wait_seconds", 0.0)),
                **({"store_identity": prep.identity} if prep.identity is not None else {}),
            },
        )


def _member_record(p: MemberPlan, out: Path) -> dict[str, Any]:
    return {
        "name": p.name,
        "layer": p.key[0],
        "site": p.key[1],
        "variant": p.sae_cfg.variant,
        "d_sae": p.sae_cfg.d_sae,
        "l0_target": p.sae_cfg.l0_target,
        "objective": p.objective,
        "lr": p.lr,
        "steered": p.steered,
        "folder": str(p.out_dir.relative_to(out)),
    }


def prepare_sweep(
    cfg: SweepConfig,
    out: str | Path,
    *,
    tokens: int = 0,
    device: str | torch.device = "cpu",
    resume: bool = False,
    overwrite: bool = False,
) -> PreparedRun:
    """run.prepare_run of a sweep folder: validate, plan every member, resolve the loop, check memory, build the
    reader and the trainer; writes nothing. `tokens` overrides cfg.loop.tokens; 0 in either (and batch size 0)
    resolve as `sae train` does (config.resolve_loop on the training range), so a member equals its solo run
    with the same options."""
    folder = SweepRun(cfg, Path(out), tokens)
    return prepare_run(folder, device=str(device), resume=resume, overwrite=overwrite)


# ---- evaluation and the summary --------------------------------------------------------------------------------
def load_lm(store: Any, device: str) -> Any:
    """The store's model, loaded once for every member's splice (actcache.models.load_store_model: the one loader,
    the dtype rule of `sae eval`); a name of its own so that tests can stand a fake model in."""
    from actcache.models import load_store_model

    return load_store_model(store.spec, device)


def evaluate_folders(
    folders: list[Path], store: Any, *, device: str, with_model: bool, **kw: Any
) -> list[dict[str, Any]]:
    """`sae eval` on each SAE folder with the model loaded once (summary.evaluate_saes); the eval dicts."""
    model = load_lm(store, device) if with_model and folders else None
    return evaluate_saes(folders, store, model, device=device, with_model=with_model, **kw)


def evaluate_members(
    prep: PreparedRun, *, with_model: bool, eval_tokens: int = 0, **kw: Any
) -> list[dict[str, Any]]:
    """Evaluate every member of a trained sweep (evaluate_folders); records eval_s in sweep.json."""
    t0 = time.perf_counter()
    results = evaluate_folders(
        [p.out_dir for p in prep.plans],
        prep.store,
        device=str(prep.device),
        with_model=with_model,
        eval_tokens=eval_tokens,
        **kw,
    )
    prep.timings["eval_s"] = time.perf_counter() - t0
    meta = read_sweep(prep.out)
    meta["timings"] = dict(prep.timings)
    io.write_json_atomic(prep.out / SWEEP_FILE, meta)
    return results


def evaluate_missing(
    out: str | Path, *, with_model: bool, device: str = "cpu", **kw: Any
) -> list[dict[str, Any]]:
    """Evaluate the members of a sweep folder that have a trained SAE but no eval.json yet."""
    out = Path(out)
    meta = read_sweep(out)
    folders = [
        out / m["folder"]
        for m in meta["members"]
        if (out / m["folder"] / io.CFG_FILE).is_file() and not (out / m["folder"] / "eval.json").is_file()
    ]
    store = data.open_store(meta["config"]["store"])
    return evaluate_folders(folders, store, device=device, with_model=with_model, **kw)


def finish_sweep(out: str | Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Summary table + Pareto plots from the member folders; returns (rows, written paths)."""
    from .pareto import plot_sweep

    rows = summary_rows(out)
    paths = list(write_summary(out, rows))
    paths += plot_sweep(rows, Path(out) / PARETO_DIR)
    return rows, paths


def run_sweep(
    cfg: SweepConfig,
    out: str | Path,
    *,
    tokens: int,
    device: str = "cpu",
    with_model: bool = False,
    eval_tokens: int = 0,
    overwrite: bool = False,
    callback: Callable[[Any], None] | None = None,
) -> tuple[PreparedRun, list[dict[str, Any]]]:
    """The whole sweep without a terminal (tests, benchmarks): prepare, train, evaluate, summarise, plot."""
    prep = prepare_sweep(cfg, out, tokens=tokens, device=device, overwrite=overwrite)
    if callback is not None:
        prep.trainer.callback = callback
    result = run_training(prep)
    if result.status != "done":
        return prep, []
    evaluate_members(prep, with_model=with_model, eval_tokens=eval_tokens)
    rows, _ = finish_sweep(out)
    return prep, rows
