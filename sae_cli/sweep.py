"""Cheap sweeps: many SAEs trained in one loop from one pass over the data, then evaluated and tabulated.

The member set is the cross product of lists (layers x sites x variants x widths x L0 targets). Every member is a
`MemberPlan` of the one trainer (sae_cli/trainer.py), which feeds all of them the same decoded batch per step, so
reading and decoding the store is paid once per sweep instead of once per SAE. A member's weights are
bit-identical to a solo `sae train` of the same settings and seed (tests/test_sweep.py): the sweep only shares
the data, never the randomness or the optimiser.

Folder layout (docs/sweeps.md): `sweep.json` (the config, the resolved members, timings), `checkpoint/` and
`metrics.parquet` (the trainer's), `members/<name>/` (each SAE with its eval.json and density.png),
`summary.parquet` + `summary.md`, `pareto/*.png`.

Equal-shape members are not batched into one matmul on CPU: scripts/bench_sweep.py measured no gain worth losing
the bit-exactness (stacked TopK 7 % slower, JumpReLU 6 % faster; docs/benchmarks.md, "Sweeps"); `shape_groups`
names the groups a batched GPU step would stack (sae_cli/batched.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import data, io
from .config import ConfigError, LoopConfig, MemberConfig, resolve_width
from .registry import variant_names
from .trainer import (
    MemberPlan,
    Trainer,
    TrainResult,
    available_memory,
    check_l0_targets,
    check_variant_options,
    estimate_memory,
    plan_member,
)

log = logging.getLogger(__name__)

Key = tuple[int, str]
SWEEP_FILE = "sweep.json"
LM_GROUP = 16
"""Members whose LM metrics share one pass over the windows (their SAEs are loaded together)."""
SWEEP_FORMAT = "sae_cli.sweep"
MEMBERS_DIR = "members"
SUMMARY_PARQUET = "summary.parquet"
SUMMARY_MD = "summary.md"
PARETO_DIR = "pareto"
# The trainer refuses above 90 % of the free memory (trainer.check_memory); the sweep uses the same margin.
MEMORY_MARGIN = 0.9
# Columns of the summary table, in order (eval.json keys; LM columns only when the model was run).
SUMMARY_COLUMNS = (
    "name", "layer", "site", "variant", "d_sae", "l0_target", "l0", "l0_error_pct", "fvu", "fvu_typical", "mse",
    "dead_pct", "dense_pct", "shrinkage", "delta_lm_loss", "ce_recovered", "kl_clean_spliced", "ce_clean",
    "ce_zero_ablation", "train_tokens", "eval_tokens", "lm_tokens",
)  # fmt: skip
# fvu_typical: FVU without the massive-norm tokens (BOS-like positions; sae_cli/metrics.py), which can carry most
# of the variance of a handful of tokens.


class SweepError(Exception):
    """The sweep cannot run as asked (memory, duplicate members, a folder that is not a sweep); one line + fix."""


@dataclass(frozen=True)
class SweepConfig:
    """`sae sweep`: the cross product of these lists, trained in one loop from one store."""

    store: str
    """Path of the actcache store."""
    variants: tuple[str, ...] = ("topk",)
    """SAE variants (registry names); `sae variants` lists them."""
    layers: tuple[int, ...] = (0,)
    """Layers whose activations the members read."""
    sites: tuple[str, ...] = ("resid_post",)
    """Sites within each layer: resid_pre, resid_post, mlp_out, attn_out."""
    l0_targets: tuple[float, ...] = (50.0,)
    """L0 targets (k for TopK-like variants, the steering target otherwise)."""
    widths: tuple[str, ...] = ("8x",)
    """Widths: numbers of latents (16384) or multiples of d_model (8x)."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Settings every member shares (tokens, batch size, seed, schedule, device)."""

    def members(self) -> list[MemberConfig]:
        """The cross product, ordered by layer, site, variant, width, L0 target (the table's order)."""
        return [
            MemberConfig(variant=v, layer=layer, site=s, width=w, l0_target=float(k))
            for layer, s, v, w, k in itertools.product(
                self.layers, self.sites, self.variants, self.widths, self.l0_targets
            )
        ]

    def validate(self) -> None:
        for name in ("variants", "layers", "sites", "l0_targets", "widths"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is empty; give at least one value")
        known = set(variant_names())
        for v in self.variants:
            if v not in known:
                raise ConfigError(f"unknown SAE variant {v!r}; choose from {', '.join(sorted(known))}")
        for k in self.l0_targets:
            if not (k > 0 and math.isfinite(k)):
                raise ConfigError(f"--l0-target {k} must be a positive number")
        for w in self.widths:
            resolve_width(w, 1)  # syntax only
        self.loop.validate()  # every numeric option, as `sae train` (0: automatic batch size and tokens)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "loop": dataclasses.asdict(self.loop)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepConfig:
        """Inverse of to_dict (sweep.json); loop keys this version does not know are dropped."""
        known = {f.name for f in dataclasses.fields(LoopConfig)}
        loop = LoopConfig(**{k: v for k, v in d.get("loop", {}).items() if k in known})
        lists = ("variants", "layers", "sites", "l0_targets", "widths")
        return cls(store=str(d["store"]), loop=loop, **{k: tuple(d[k]) for k in lists})


def parse_list(text: str | None, kind: type = str, what: str = "list") -> tuple[Any, ...]:
    """'a,b, c' -> ('a', 'b', 'c'); spaces also separate (Makefile lists); duplicates dropped, order kept."""
    items = [t for t in str(text or "").replace(",", " ").split() if t]
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise ConfigError(
            f"bad {what} {text!r}: expected {kind.__name__} values separated by commas"
        ) from None
    return tuple(dict.fromkeys(values))


def parse_layers(text: str) -> tuple[int, ...]:
    """'3,15' or '0-3' -> layers."""
    out: list[int] = []
    for part in parse_list(text, str, "layers"):
        lo, sep, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise ConfigError(f"bad layers {text!r}: use 15, 3,15 or 0-3") from None
    return tuple(dict.fromkeys(out))


# ---- planning ------------------------------------------------------------------------------------------------
def plan_sweep(cfg: SweepConfig, d_in: int, out: str | Path, steps: int | None = None) -> list[MemberPlan]:
    """Resolve every member against the data width and the run length in steps (the default lr depends on it,
    exactly as in `sae train`); SweepError when two members resolve to the same SAE (e.g. --width 8x,4608 at
    d_model 576)."""
    plans = [plan_member(m, d_in, Path(out) / MEMBERS_DIR, steps=steps) for m in cfg.members()]
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


def reader_bytes(store: Any, keys: list[Key], loop: LoopConfig) -> int:
    """The reader's decoded buffers: about two groups of `mix_chunks` chunks in flight, fp32, per key."""
    return 2 * loop.mix_chunks * store.spec.chunk_tokens * store.d_model * 4 * len(keys)


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


# ---- one prepared sweep ----------------------------------------------------------------------------------------
@dataclass
class PreparedSweep:
    """Everything checked and built in memory; nothing written yet (run_training writes)."""

    cfg: SweepConfig
    out: Path
    loop: LoopConfig
    """cfg.loop with the automatic batch size and run length resolved (config.resolve_loop, as `sae train`)."""
    store: Any
    plans: list[MemberPlan]
    trainer: Trainer
    reader: Any
    keys: list[Key]
    tokens: int
    train_range: tuple[int, int]
    calib_range: tuple[int, int]
    eval_range: tuple[int, int]
    device: torch.device
    memory_bytes: int
    memory_free: int | None
    resume: bool
    identity: dict[str, Any] | None = None
    """The store's identity as the sweep recorded it (data.run_identity); None for sweeps made before."""
    sample: dict[Key, torch.Tensor] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to touch a folder that is not a sweep; --overwrite removes only sweeps."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if resume:
            raise SweepError(f"nothing to resume in {out}; start without --resume")
        return
    if not (out / SWEEP_FILE).is_file():
        raise SweepError(f"{out} exists and is not a sweep folder; choose another --out")
    if _never_checkpointed(out):  # killed or failed before its first checkpoint: nothing to keep
        if resume:
            raise SweepError(
                f"the sweep in {out} stopped before its first checkpoint: nothing to resume; rerun without --resume"
            )
        return
    if resume:
        if not (out / "checkpoint" / "state.json").is_file():
            raise SweepError(f"{out} has no checkpoint to resume from; pass --overwrite to start over")
        return
    if not overwrite:
        raise SweepError(
            f"{out} already holds a sweep; pass --resume to continue it or --overwrite to replace it"
        )


def _never_checkpointed(out: Path) -> bool:
    """A sweep folder whose start wrote sweep.json but neither a checkpoint nor a trained member."""
    return not (out / "checkpoint" / "state.json").is_file() and not any(
        (out / MEMBERS_DIR).glob(f"*/{io.CFG_FILE}")
    )


def prepare_sweep(
    cfg: SweepConfig,
    out: str | Path,
    *,
    tokens: int = 0,
    device: str | torch.device = "cpu",
    resume: bool = False,
    overwrite: bool = False,
) -> PreparedSweep:
    """Validate the sweep, plan every member, resolve the loop, check memory, build the reader and the trainer;
    writes nothing. `tokens` overrides cfg.loop.tokens; 0 in either (and batch size 0) resolve as `sae train`
    does (config.resolve_loop on the training range), so a member equals its solo run with the same options."""
    cfg.validate()
    out = Path(out)
    store = data.open_store(cfg.store)
    keys = [(layer, site) for layer in cfg.layers for site in cfg.sites]
    data.check_keys(store, keys)
    requested = dataclasses.replace(cfg.loop, tokens=tokens or cfg.loop.tokens)
    _prepare_out(out, resume, overwrite)  # checks only; nothing is written before start_training
    saved = io.read_json(out / SWEEP_FILE) if resume else None
    ranges, loop = data.plan_ranges(store, requested, saved)
    train_range, calib_range, eval_range = ranges
    identity = data.run_identity(store, ranges, saved, f"the sweep in {out}")  # resume: refuses another store
    plans = plan_sweep(cfg, store.d_model, out, steps=math.ceil(loop.tokens / loop.batch_size))
    check_l0_targets(plans)
    dev = torch.device(device)
    # The memory check comes before any SAE is built; the variants then check their options on the meta device.
    need, free = check_sweep_memory(plans, loop, dev, reader_bytes(store, keys, loop))
    check_variant_options(plans)
    summary = {
        "store": str(store.path),
        "store_model": store.spec.model,
        "store_tokens": store.committed_tokens,
        "train_range": list(train_range),
        "calibration_range": list(calib_range),
        "eval_range": list(eval_range),
        "drop_bos": loop.drop_bos,
        "normalize": loop.normalize,
        "sweep": str(out),
        **({"store_identity": identity} if identity is not None else {}),
    }
    reader = data.train_reader(store, keys, loop, train_range)
    trainer = Trainer(plans, loop, reader, out, loop.tokens, device=dev, extra_summary=summary)
    return PreparedSweep(
        cfg=cfg, out=out, loop=loop, store=store, plans=plans, trainer=trainer, reader=reader, keys=keys,
        tokens=loop.tokens, train_range=train_range, calib_range=calib_range, eval_range=eval_range, device=dev, memory_bytes=need,
        memory_free=free, resume=resume, identity=identity,
    )  # fmt: skip


def start_training(prep: PreparedSweep) -> None:
    """Initialise (or resume) the members and write sweep.json; after this the folder is a sweep."""
    t0 = time.perf_counter()
    loop = prep.loop
    if prep.resume:
        prep.trainer.resume(
            data.calibration_sample(
                prep.store, prep.keys, loop, prep.train_range, prep.calib_range, finite=True
            )
        )
    else:
        scales = None
        if loop.normalize == "store":
            scales = {k: data.store_scale(prep.store, k) for k in prep.keys}
        elif loop.normalize == "none":
            scales = {k: 1.0 for k in prep.keys}
        prep.sample = data.sample(prep.store, prep.keys, loop, prep.train_range, finite=True)
        calibration = data.calibration_sample(
            prep.store, prep.keys, loop, prep.train_range, prep.calib_range, prep.sample, finite=True
        )
        prep.trainer.start(prep.sample, scales, calibration)
        if prep.out.exists():
            shutil.rmtree(prep.out)  # --overwrite of a sweep (_prepare_out refused anything else)
        prep.out.mkdir(parents=True)
    prep.timings["setup_s"] = time.perf_counter() - t0
    write_sweep_json(prep)


def write_sweep_json(prep: PreparedSweep, result: TrainResult | None = None) -> None:
    io.write_json_atomic(
        prep.out / SWEEP_FILE,
        {
            "format": SWEEP_FORMAT,
            "format_version": 1,
            "config": prep.cfg.to_dict(),
            "tokens": prep.tokens,
            "batch_size": prep.loop.batch_size,
            "train_range": list(prep.train_range),
            "calibration_range": list(prep.calib_range),
            "eval_range": list(prep.eval_range),
            "device": str(prep.device),
            "memory_estimate_bytes": prep.memory_bytes,
            "memory_free_bytes": prep.memory_free,
            "shape_groups": [[prep.plans[i].name for i in g] for g in shape_groups(prep.plans)],
            "members": [
                {
                    "name": p.name,
                    "layer": p.key[0],
                    "site": p.key[1],
                    "variant": p.sae_cfg.variant,
                    "d_sae": p.sae_cfg.d_sae,
                    "l0_target": p.sae_cfg.l0_target,
                    "lr": p.lr,
                    "steered": p.steered,
                    "folder": str(p.out_dir.relative_to(prep.out)),
                }
                for p in prep.plans
            ],
            "status": result.status if result else "training",
            "timings": dict(prep.timings),
            "reader_wait_s": float(getattr(prep.reader, "wait_seconds", 0.0)),
            **({"store_identity": prep.identity} if prep.identity is not None else {}),
        },
    )


def run_training(prep: PreparedSweep, run: Callable[[Trainer], TrainResult] | None = None) -> TrainResult:
    """start_training, then the loop: `run(trainer)` (the CLI's live view) or `trainer.run()`. A fresh sweep that
    fails before its first checkpoint leaves no folder behind (a plain rerun starts cleanly)."""
    t0 = time.perf_counter()
    try:
        start_training(prep)
        t0 = time.perf_counter()
        result = run(prep.trainer) if run is not None else prep.trainer.run()
    except BaseException:
        if not prep.resume and prep.out.is_dir() and _never_checkpointed(prep.out):
            shutil.rmtree(prep.out, ignore_errors=True)
        raise
    prep.timings["train_s"] = time.perf_counter() - t0
    write_sweep_json(prep, result)
    return result


# ---- evaluation and the summary --------------------------------------------------------------------------------
def load_lm(store: Any, device: str) -> Any:
    """The store's model, loaded once for every member's splice (same dtype rule as evaluate.lm_metrics)."""
    from actcache.models import load_model, parse_dtype, resolve_model

    harvest = store.spec.harvest_config or {}
    dtype = torch.float32 if device == "cpu" else parse_dtype(harvest.get("compute_dtype", "bf16"))
    return load_model(resolve_model(store.spec.model, store.spec.revision), device=device, dtype=dtype)


def evaluate_folders(
    folders: list[Path],
    store: Any,
    *,
    device: str,
    with_model: bool,
    eval_tokens: int = 0,
    lm_tokens: int = 0,
    batch_size: int = 4096,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """`sae eval` (sae_cli/evaluate.py) on each SAE folder, the model loaded once; returns the eval dicts.
    The LM metrics of the members of one (layer, site) come from one pass over the windows that shares the clean
    and the zero-ablated forward passes among them (evaluate.lm_metrics: 2 + n passes per window batch
    instead of 3 n), up to LM_GROUP members at a time; each member's numbers equal its own `sae eval`.
    progress(stage, done, total): stage 'members' counts folders; the evaluation's own stages pass through."""
    from .evaluate import evaluate, lm_metrics, lm_range

    model = load_lm(store, device) if with_model and folders else None
    report = progress or (lambda stage, done, total: None)
    lm: dict[Path, dict[str, Any]] = {}
    if model is not None:
        groups: dict[tuple[Any, ...], list[Path]] = {}
        for folder in folders:
            training = io.read_cfg(folder).get("training", {})
            key = (int(training["layer"]), str(training["site"]))
            groups.setdefault((key, lm_range(folder, store, eval_tokens, lm_tokens)), []).append(folder)
        for (key, token_range), group in groups.items():
            for i in range(0, len(group), LM_GROUP):
                part = group[i : i + LM_GROUP]
                saes = [io.load_sae(f, device) for f in part]
                outs = lm_metrics([sae.forward for sae in saes], store, key, token_range, device,
                                       report=progress, model=model)  # fmt: skip
                lm.update(zip(part, outs, strict=True))
    results = []
    for i, folder in enumerate(folders):
        report("members", i, len(folders))
        results.append(
            evaluate(
                folder,
                store.path,
                tokens=eval_tokens,
                lm_tokens=lm_tokens,
                with_model=with_model,
                device=device,
                batch_size=batch_size,
                progress=progress,
                model=model,
                lm=lm.get(folder),
            )
        )
    report("members", len(folders), len(folders))
    return results


def evaluate_members(
    prep: PreparedSweep, *, with_model: bool, eval_tokens: int = 0, **kw: Any
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


def summary_rows(out: str | Path) -> list[dict[str, Any]]:
    """One row per member of a finished sweep, from its folders (cfg.json + eval.json); members without an
    eval.json get NaN metrics."""
    out = Path(out)
    meta = read_sweep(out)
    rows = []
    for m in meta["members"]:
        folder = out / m["folder"]
        ev = io.read_json(folder / "eval.json") if (folder / "eval.json").is_file() else {}
        training = io.read_cfg(folder).get("training", {}) if (folder / io.CFG_FILE).is_file() else {}
        row: dict[str, Any] = {
            "name": m["name"],
            "layer": int(m["layer"]),
            "site": m["site"],
            "variant": m["variant"],
            "d_sae": int(m["d_sae"]),
            "l0_target": float(m["l0_target"]),
            "train_tokens": int(training.get("tokens", 0)),
            "eval_tokens": int(ev.get("tokens", 0)),
        }
        for col in SUMMARY_COLUMNS:
            if col not in row:
                row[col] = float(ev[col]) if isinstance(ev.get(col), int | float) else math.nan
        rows.append({c: row[c] for c in SUMMARY_COLUMNS})
    return rows


def saved_config(out: str | Path) -> SweepConfig:
    """The config of the sweep in `out` (to resume it); SweepError when there is none."""
    if not (Path(out) / SWEEP_FILE).is_file():
        raise SweepError(f"nothing to resume in {out}; start without --resume")
    try:
        return SweepConfig.from_dict(read_sweep(out)["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SweepError(
            f"{Path(out) / SWEEP_FILE} is damaged ({type(e).__name__}: {e}); pass --overwrite to start the sweep over"
        ) from None


def read_sweep(out: str | Path) -> dict[str, Any]:
    path = Path(out) / SWEEP_FILE
    if not path.is_file():
        raise SweepError(f"{out} is not a sweep folder (no {SWEEP_FILE}); pass the --out of `sae sweep`")
    meta = io.read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != SWEEP_FORMAT:
        raise SweepError(f"{path} is not an sae sweep file")
    return meta


def write_summary(out: str | Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """summary.parquet (every column) and summary.md (a Markdown table); returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    parquet, md = out / SUMMARY_PARQUET, out / SUMMARY_MD
    with io.atomic_path(parquet) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    with io.atomic_path(md) as tmp:
        tmp.write_text(markdown_table(rows))
    return parquet, md


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in SUMMARY_COLUMNS if c != "name" and any(_present(r.get(c)) for r in rows)]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


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
) -> tuple[PreparedSweep, list[dict[str, Any]]]:
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
