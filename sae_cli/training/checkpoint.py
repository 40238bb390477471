"""Checkpoints: the full training state (weights, Adam state, controller state, dead-latent counters, log sums,
RNG, the reader's position, how many metric rows are kept) as one safetensors file named by step plus
state.json pointing at it, both written atomically; nothing is ever unpickled. Resuming on CPU gives weights
bit-identical to an uninterrupted run. Only the main rank of a process group writes; every rank loads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import io
from ..registry import get_variant
from . import rows
from .errors import TrainingError

if TYPE_CHECKING:
    from ..trainer import Trainer
    from .member import Member
    from .plan import MemberPlan

log = logging.getLogger("sae_cli.trainer")

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FORMAT = "sae_cli.checkpoint"


def _member_state(i: int, m: Member, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Put member i's tensors into `tensors`; return its JSON record."""
    for k, v in m.sae.state_dict().items():
        tensors[f"m{i}.sae.{k}"] = v
    opt_state = m.opt.state_dict()
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"m{i}.opt.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors[f"m{i}.since_fired_F"] = m.since_fired_F
    tensors[f"m{i}.freq_F"] = m.freq_F
    return {
        "name": m.plan.name,
        "key": list(m.plan.key),
        "sae": m.plan.sae_cfg.to_dict(),
        "scale": m.scale,
        "controller": m.controller.state_dict() if m.controller else None,
        "param_groups": opt_state["param_groups"],
        "sums": m.sums,
        "n_sums": m.n_sums,
    }


def save(tr: Trainer, reader_state: dict[str, Any] | None = None) -> Path:
    """Write `tr`'s state (see the module); the reader's position is its current one unless `reader_state`."""
    ckpt = tr.run_dir / CHECKPOINT_DIR
    # Every rank's reader position (each reads its own share of the chunks); rank 0 writes them all.
    world = tr.reducer.world_size
    readers = tr.reducer.gather(tr.reader.state_dict() if reader_state is None else reader_state)
    if not tr.reducer.is_main:
        return ckpt
    ckpt.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {"rng.cpu": torch.get_rng_state()}
    if tr.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(tr.device)
    members = [_member_state(i, m, tensors) for i, m in enumerate(tr.members)]
    name = f"state-{tr.step:09d}.safetensors"
    io.write_tensors_atomic(ckpt / name, tensors)
    rows.write_metrics(tr.run_dir, tr.rows)
    io.write_json_atomic(
        ckpt / "state.json",
        {
            "format": CHECKPOINT_FORMAT,
            "format_version": 1,
            "tensors": name,
            "step": tr.step,
            "tokens": tr.tokens,
            "tokens_total": tr.tokens_total,
            "elapsed_s": tr.elapsed_s,
            "members": members,
            "reader": readers[0],
            **({"world_size": world, "readers": readers} if world > 1 else {}),
            "metrics_rows": len(tr.rows),
        },
    )
    for old in ckpt.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    log.info("checkpoint at step %d (%d tokens) in %s", tr.step, tr.tokens, ckpt)
    return ckpt


def _load_member(
    tr: Trainer, i: int, plan: MemberPlan, s: dict[str, Any], tensors: dict[str, Tensor]
) -> Member:
    sae = get_variant(plan.sae_cfg.variant)(plan.sae_cfg)
    sae.load_state_dict({k[len(f"m{i}.sae.") :]: v for k, v in tensors.items() if k.startswith(f"m{i}.sae.")})
    m = tr.stepper.build(plan, sae.to(tr.device), float(s["scale"]))
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
    return m


def load(tr: Trainer) -> None:
    """Load the checkpoint in `tr.run_dir` into `tr`: members, RNG, reader position, step, metric rows."""
    ckpt = tr.run_dir / CHECKPOINT_DIR
    if not (ckpt / "state.json").is_file():
        raise TrainingError(f"no checkpoint in {ckpt} to resume from; start without --resume")
    state = io.read_json(ckpt / "state.json")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{ckpt / 'state.json'} is not an sae_cli checkpoint")
    world = int(state.get("world_size", 1))
    if world != tr.reducer.world_size:
        raise TrainingError(
            f"the checkpoint in {ckpt} was written by {world} process(es), this run has {tr.reducer.world_size}: "
            f"resume with {world} (torchrun --nproc-per-node {world} ...), or pass --overwrite to start over"
        )
    saved = state["members"]
    check_same_members(tr.plans, saved, ckpt)
    tensors = io.read_tensors(ckpt / state["tensors"])
    bad = io.non_finite({k: v for k, v in tensors.items() if ".sae." in k})
    if bad is not None:
        raise TrainingError(
            f"{ckpt / state['tensors']} holds NaN/Inf in tensor {bad}; the checkpoint is damaged: pass "
            "--overwrite to start over"
        )
    for i, (plan, s) in enumerate(zip(tr.plans, saved, strict=True)):
        tr.members.append(_load_member(tr, i, plan, s, tensors))
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and tr.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], tr.device)
    tr.reader.load_state_dict(state.get("readers", [state["reader"]])[tr.reducer.rank])
    tr.step, tr.tokens, tr.elapsed_s = int(state["step"]), int(state["tokens"]), float(state["elapsed_s"])
    tr.rows = rows.read_metrics(tr.run_dir)[: int(state.get("metrics_rows", 0))]
    log.info("resumed at step %d (%d tokens)", tr.step, tr.tokens)


def check_same_members(plans: list[MemberPlan], saved: list[dict[str, Any]], ckpt: Path) -> None:
    """TrainingError unless the checkpoint holds the same SAEs (variant, shape, options, site) in order."""
    if len(saved) != len(plans):
        raise TrainingError(
            f"the checkpoint in {ckpt} holds {len(saved)} member(s), not {len(plans)}; pass --overwrite"
        )
    for plan, s in zip(plans, saved, strict=True):
        mine, theirs = plan.sae_cfg.to_dict(), s["sae"]
        diffs = [f"{k} {theirs.get(k)!r} -> {mine[k]!r}" for k in mine if mine[k] != theirs.get(k)]
        if list(plan.key) != s["key"]:
            diffs.append(f"layer/site {s['key']} -> {list(plan.key)}")
        if diffs:
            raise TrainingError(
                f"cannot resume: the checkpoint in {ckpt} is of another variant or shape ({'; '.join(diffs)}); "
                "resume with the same settings or pass --overwrite to start over"
            )
    if [s["name"] for s in saved] != [p.name for p in plans]:
        raise TrainingError(
            f"the checkpoint in {ckpt} holds members {[s['name'] for s in saved]}, not "
            f"{[p.name for p in plans]}; resume with the same names, or pass --overwrite"
        )
