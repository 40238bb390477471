"""`sae train|eval|variants`: the only module of sae_cli that prints (rich tables and progress)."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import shutil
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .config import ConfigError, LoopConfig, MemberConfig, TrainConfig, field_docs, resolve_loop
from .registry import variant_names

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console(stderr=True)
out_console = Console()

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
TRAIN_CONFIG_FILE = "train_config.json"
DOC = {**field_docs(MemberConfig), **field_docs(LoopConfig), **field_docs(TrainConfig)}


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    """Train and evaluate sparse autoencoders of every variant from an actcache store."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from actcache.models import ModelError
    from actcache.sites import SiteError
    from actcache.store import StoreError

    from .data import DataError
    from .io import SAEFileError
    from .trainer import TrainingError

    return (
        ConfigError,
        DataError,
        TrainingError,
        SAEFileError,
        StoreError,
        ModelError,
        SiteError,
        KeyError,
        ValueError,
    )


def environment_message(err: OSError) -> str:
    """One line with the fix for an environment fault (actcache.faults: a full disk or quota, a read-only or
    unwritable folder, ...), or for a file missing from a store (the reader raises it from a worker thread)."""
    from actcache.faults import environment_fault
    from actcache.store import is_store

    from .io import os_errno

    code, path = os_errno(err), err.filename
    if code == errno.ENOENT and path:
        store = next((p for p in Path(path).parents if p.name and is_store(p)), None)
        if store is not None:
            return f"store {store} is missing {path}; run `actcache verify {store}` (and harvest again)"
    fault = environment_fault(err, code)
    if fault is None:
        return str(err.strerror or err)
    what, fix = fault
    return f"{what}; {fix}"


@contextlib.contextmanager
def cli_errors(*extra: type[BaseException], hint: Callable[[], str] = lambda: "") -> Iterator[None]:
    """The one place where a `sae` command turns an expected failure into `error: ...` (one line, exit 2, no
    traceback): bad input (`_bad_input_errors`, plus `extra`) and environment faults (any OSError:
    `environment_message`). `hint()` is added after an environment fault (e.g. how to resume)."""
    try:
        yield
    except (*_bad_input_errors(), *extra) as e:
        raise _fail(e) from None
    except OSError as e:
        raise _fail(environment_message(e) + hint()) from None


def _resume_hint(out: Path | None, command: str) -> str:
    """'; continue with: sae train --out RUN --resume' when `out` holds a checkpoint, else ''."""
    from .trainer import CHECKPOINT_DIR

    if out is not None and (out / CHECKPOINT_DIR / "state.json").is_file():
        return f"; the last checkpoint is kept: continue with `{command} --out {out} --resume`"
    return ""


def _fail(err: BaseException | str) -> typer.Exit:
    """One line on stderr, exit code 2."""
    text = (
        err if isinstance(err, str) else (err.args[0] if isinstance(err, KeyError) and err.args else str(err))
    )
    typer.echo(f"error: {' '.join(str(text).split()) or type(err).__name__}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


# ---- sae variants --------------------------------------------------------------------------------------------
@app.command()
def variants(
    plain: bool = typer.Option(False, "--plain", help="Names only, space-separated (for scripts)."),
) -> None:
    """List the SAE variants of the registry."""
    from .registry import get_variant

    names = variant_names()
    if plain:
        print(" ".join(names))
        return
    table = Table(title="SAE variants")
    for col in ("name", "L0 set by", "decoder", "description"):
        table.add_column(col)
    for name in names:
        cls = get_variant(name)
        doc = (
            (cls.__module__ and __import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip().splitlines()
        )
        table.add_row(
            name,
            "steered lambda" if cls.steered else "the rule (k)",
            "unit norm" if cls.unit_norm_decoder else "free",
            doc[0] if doc else "",
        )
    out_console.print(table)


# ---- sae train -----------------------------------------------------------------------------------------------
def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    return data


def _resolve_flat(cli: dict[str, Any], config: Path | None, out: Path, resume: bool) -> dict[str, Any]:
    """defaults < the run's saved config (--resume) < the TOML file < explicit CLI options."""
    flat: dict[str, Any] = {}
    if resume and (out / TRAIN_CONFIG_FILE).is_file():
        from .io import read_json

        flat.update(read_json(out / TRAIN_CONFIG_FILE)["config"])
    if config is not None:
        flat.update(_read_toml(config))
    flat.update({k: v for k, v in cli.items() if v is not None})
    flat.pop("out", None)
    return flat


def _default_tokens(train_tokens: int, batch_size: int) -> int:
    """The `sae train` default run length for a training range (config.resolve_loop); `sae sweep` uses it."""
    return resolve_loop(LoopConfig(batch_size=batch_size), train_tokens).tokens


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to touch a folder that is not a run; --overwrite removes only runs (after all checks passed)."""
    from .trainer import CHECKPOINT_DIR

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if resume:
            raise ConfigError(f"nothing to resume in {out}; start without --resume")
        return
    ours = {TRAIN_CONFIG_FILE, CHECKPOINT_DIR, "cfg.json"}
    is_run = out.is_dir() and any((out / n).exists() for n in ours)
    if not is_run:
        raise ConfigError(f"{out} exists and is not an sae run; choose another --out")
    if _never_checkpointed(out):  # killed or failed before its first checkpoint: nothing to keep
        if resume:
            raise ConfigError(
                f"the run in {out} stopped before its first checkpoint: nothing to resume; rerun without --resume"
            )
        return
    if resume:
        if not (out / CHECKPOINT_DIR / "state.json").is_file():
            raise ConfigError(f"{out} has no checkpoint to resume from; pass --overwrite to start over")
        return
    if not overwrite:
        raise ConfigError(
            f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )


def _never_checkpointed(out: Path) -> bool:
    """A run folder whose start wrote train_config.json but neither a checkpoint nor a trained SAE."""
    from .trainer import CHECKPOINT_DIR

    return not (out / CHECKPOINT_DIR / "state.json").is_file() and not (out / "cfg.json").is_file()


def _discard_failed_start(out: Path) -> None:
    """After a fresh start failed: remove the run folder if it never reached its first checkpoint (a plain rerun
    then starts cleanly); a folder with a checkpoint stays for --resume."""
    if out.is_dir() and _never_checkpointed(out):
        shutil.rmtree(out, ignore_errors=True)


@app.command()
def train(
    variant: str = typer.Argument(None, help=f"SAE variant: {', '.join(variant_names())}."),
    store: str = typer.Option(None, help=DOC["store"]),
    layer: int = typer.Option(None, help=DOC["layer"]),
    site: str = typer.Option(None, help=DOC["site"]),
    width: str = typer.Option(None, help=DOC["width"]),
    l0_target: float = typer.Option(None, "--l0-target", help=DOC["l0_target"]),
    tokens: int = typer.Option(None, help=DOC["tokens"]),
    out: Path = typer.Option(None, help="Run folder: the trained SAE, checkpoints, metrics, config."),
    batch_size: int = typer.Option(None, help=DOC["batch_size"]),
    lr: float = typer.Option(None, help=DOC["lr"]),
    sparsity_coef: float = typer.Option(None, help=DOC["sparsity_coef"]),
    seed: int = typer.Option(None, help=DOC["seed"]),
    checkpoint_every: int = typer.Option(None, help=DOC["checkpoint_every"]),
    eval_tokens: int = typer.Option(None, help=DOC["eval_tokens"]),
    autocast: str = typer.Option(None, help=DOC["autocast"]),
    device: str = typer.Option(None, help=DOC["device"]),
    normalize: str = typer.Option(None, help=DOC["normalize"]),
    log_every: int = typer.Option(None, help=DOC["log_every"]),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in --out."),
    config: Path = typer.Option(
        None, "--config", help="TOML file with any of these options (keys as here, _ for -)."
    ),
) -> None:
    """Train one SAE on one (layer, site) of a store."""
    cli = {k: v for k, v in locals().items() if k not in ("resume", "overwrite", "config")}
    with cli_errors(hint=lambda: _resume_hint(out, "sae train")):
        toml_out = _read_toml(config).get("out") if config is not None else None
        out = out or (Path(toml_out) if toml_out else None)
        if out is None:
            raise ConfigError("no run folder given: pass --out RUN (or set out = ... in the config file)")
        flat = _resolve_flat(cli, config, out, resume)
        cfg = TrainConfig.from_flat(flat)
        from .io import run_lock

        with run_lock(out):
            _train(cfg, out, resume, overwrite)


def _train(cfg: TrainConfig, out: Path, resume: bool, overwrite: bool) -> None:
    """Validate everything, build the trainer in memory, and only then touch the run folder."""
    from . import data
    from .io import read_json, write_json_atomic
    from .registry import get_variant
    from .trainer import (
        Trainer,
        check_l0_targets,
        check_memory,
        check_variant_options,
        input_scale,
        plan_member,
    )

    member = cfg.member
    get_variant(member.variant)  # unknown name -> KeyError naming the choices
    dev = torch.device(_device(cfg.loop.device))
    store = data.open_store(cfg.store)
    key = (member.layer, member.site)
    data.check_keys(store, [key])
    _prepare_out(out, resume, overwrite)
    saved = read_json(out / TRAIN_CONFIG_FILE)["resolved"] if resume else None
    ranges, loop = data.plan_ranges(store, cfg.loop, saved)
    train_range, calib_range, eval_range = ranges
    identity = data.run_identity(store, ranges, saved, f"the run in {out}")  # resume: refuses another store
    n_tokens = loop.tokens
    plan = plan_member(member, store.d_model, out, steps=math.ceil(n_tokens / loop.batch_size))
    check_l0_targets([plan])
    reader_bytes = 2 * loop.mix_chunks * store.spec.chunk_tokens * store.d_model * 4
    need = check_memory([plan], loop, dev, reader_bytes)  # before any SAE is built
    check_variant_options([plan])
    recorded = {"store_identity": identity} if identity is not None else {}
    resolved = {
        "d_in": store.d_model,
        "d_sae": plan.sae_cfg.d_sae,
        "lr": plan.lr,
        "adam_betas": list(plan.betas),
        "steered": plan.steered,
        "tokens": n_tokens,
        "batch_size": loop.batch_size,
        "train_range": list(train_range),
        "calibration_range": list(calib_range),
        "eval_range": list(eval_range),
        "device": str(dev),
        "memory_estimate_bytes": need,
        **recorded,
    }
    summary = {
        "store": str(store.path),
        "store_model": store.spec.model,
        "store_tokens": store.committed_tokens,
        "train_range": list(train_range),
        "calibration_range": list(calib_range),
        "eval_range": list(eval_range),
        "drop_bos": loop.drop_bos,
        "normalize": loop.normalize,
        **recorded,
    }
    reader = data.train_reader(store, [key], loop, train_range)
    trainer = Trainer([plan], loop, reader, out, n_tokens, device=dev, extra_summary=summary)
    if resume:
        # refuses another variant or shape before anything is written
        trainer.resume(data.calibration_sample(store, [key], loop, train_range, calib_range, finite=True))
    else:
        scales = {key: data.store_scale(store, key)} if loop.normalize == "store" else None
        sample = data.sample(store, [key], loop, train_range, finite=True)
        if loop.normalize == "none":
            scales = {key: 1.0}
        calibration = data.calibration_sample(
            store, [key], loop, train_range, calib_range, sample, finite=True
        )
        trainer.start(sample, scales, calibration)
        if loop.normalize == "sample":
            c = input_scale(sample[key])
            console.print(f"input scale c = {c:.4g} (E||c x||^2 = 1 on {len(sample[key])} tokens)")
        if out.exists():
            shutil.rmtree(out)  # --overwrite of a run (_prepare_out refused anything else)
        out.mkdir(parents=True)
    try:
        write_json_atomic(out / TRAIN_CONFIG_FILE, {"config": cfg.to_flat(), "resolved": resolved})
        _header(cfg, loop, plan, resolved)
        result = _run_live(trainer)
    except BaseException:
        if not resume:
            _discard_failed_start(out)
        raise
    if result.status != "done":
        console.print(
            f"[yellow]interrupted at step {result.step} ({result.tokens:,} tokens); checkpoint written. "
            f"Continue with: sae train --out {out} --resume[/yellow]"
        )
        raise typer.Exit(EXIT_INTERRUPTED)
    s = result.summaries[0]
    console.print(
        f"[green]saved {out}[/green]: {s['steps']} steps, {s['tokens']:,} tokens, {s['elapsed_s']:.0f} s; "
        f"next: sae eval {out} --store {cfg.store}"
    )


def _device(name: str) -> str:
    """The torch device of --device ('auto': cuda if available, else cpu), checked to exist on this machine
    (actcache.models.check_device; ConfigError naming the fix) before anything is read or written."""
    from actcache.models import ModelError, check_device

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_device(name)
    except ModelError as e:
        raise ConfigError(str(e)) from None
    return name


def _calibration_note(calibration_range: list[int]) -> str:
    n = calibration_range[1] - calibration_range[0]
    return f" (+ {n:,} held back to calibrate thresholds)" if n > 0 else ""


def _header(cfg: TrainConfig, loop: LoopConfig, plan: Any, resolved: dict[str, Any]) -> None:
    from .trainer import dead_window

    m, n_tokens = cfg.member, loop.tokens
    steps = math.ceil(n_tokens / loop.batch_size)
    epochs = n_tokens / max(1, resolved["train_range"][1] - resolved["train_range"][0])
    console.print(
        f"[bold]sae train {m.variant}[/bold] layer {m.layer} {m.site}: d_in {resolved['d_in']} -> d_sae "
        f"{resolved['d_sae']}, L0 target {m.l0_target:g} ({'steered' if plan.steered else 'by the rule'}), "
        f"lr {plan.lr:.3g}, {n_tokens:,} tokens = {steps} steps of {loop.batch_size} (~{epochs:.1f} epochs), "
        f"held out {resolved['eval_range'][1] - resolved['eval_range'][0]:,} tokens"
        f"{_calibration_note(resolved['calibration_range'])}, {resolved['device']}; "
        f"dead = no firing in {dead_window(loop, n_tokens):,} tokens"
    )


def _metrics_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False)
    cols = ["member", "step", "loss", "mse", "L0", "FVU", "dead %", "lr", "lambda", "tok/s"]
    for c in cols:
        table.add_column(c, justify="left" if c == "member" else "right")
    for r in rows:
        table.add_row(
            str(r["member"]),
            str(r["step"]),
            f"{r['loss']:.4g}",
            f"{r.get('part_mse', math.nan):.4g}",
            f"{r['l0']:.1f}",
            f"{r['fvu']:.3f}",
            f"{r['dead_pct']:.1f}",
            f"{r['lr']:.2e}",
            f"{r['sparsity_coef']:.3g}",
            f"{r['tokens_per_s']:,.0f}",
        )
    return table


def _run_live(trainer: Any) -> Any:
    from .trainer import stop_on_signals

    progress = Progress(
        TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TimeRemainingColumn(),
        console=console,
    )  # fmt: skip
    task = progress.add_task("train", total=trainer.tokens_total, completed=trainer.tokens)
    last_rows: list[dict[str, Any]] = []
    next_line = [0.0]  # not a terminal (a log file): a plain progress line every 5 % of the run
    with Live(Group(progress), console=console, refresh_per_second=4, transient=False) as live:

        def callback(p: Any) -> None:
            nonlocal last_rows
            progress.update(task, completed=p.tokens)
            if p.rows:
                last_rows = p.rows
                live.update(Group(progress, _metrics_table(last_rows)))
                if not console.is_terminal and p.tokens >= next_line[0]:
                    next_line[0] = p.tokens + 0.05 * p.total_tokens
                    l0s = ", ".join(f"{r['member']} {r['l0']:.1f}" for r in p.rows)
                    console.log(
                        f"step {p.step}/{p.total_steps}, {p.tokens:,}/{p.total_tokens:,} tokens, "
                        f"{p.tokens_per_s:,.0f} tok/s; L0: {l0s}"
                    )

        trainer.callback = callback
        try:
            with stop_on_signals() as should_stop:
                trainer.should_stop = should_stop
                result = trainer.run()
        finally:
            if not console.is_terminal:
                # The last live frame ends without a newline when not on a terminal (an error line follows it).
                live.stop()
                console.print()
    return result


# ---- sae eval ------------------------------------------------------------------------------------------------
@app.command("eval")
def eval_cmd(
    run: Path = typer.Argument(
        ..., help="Run folder written by `sae train` (or any SAE folder with cfg.json)."
    ),
    store: str = typer.Option(
        None, help="The store the SAE was trained on (default: the one the run recorded)."
    ),
    tokens: int = typer.Option(0, help="Evaluate on at most this many held-out tokens (0: all of them)."),
    lm_tokens: int = typer.Option(
        0, help="LM metrics (3 model passes per window) on at most this many of them (0: as --tokens)."
    ),
    no_model: bool = typer.Option(
        False, "--no-model", help="Skip the LM metrics (no model load, no splicing)."
    ),
    device: str = typer.Option("auto", help="Torch device for the SAE and the model."),
    batch_size: int = typer.Option(4096, help="Tokens per SAE batch."),
) -> None:
    """Evaluate an SAE on its store's held-out tokens (and, with the model, splice it into the LM)."""
    from .evaluate import DENSITY_PNG, EVAL_FILE, check_eval_options, evaluate

    with cli_errors():
        check_eval_options(tokens, lm_tokens, batch_size)
        dev = _device(device)
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console
        )
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(f"eval {stage}", total=total)
            progress.update(tasks[stage], completed=done)

        with progress:
            result = evaluate(
                run,
                store,
                tokens=tokens,
                lm_tokens=lm_tokens,
                with_model=not no_model,
                device=dev,
                batch_size=batch_size,
                progress=report,
            )
    out_console.print(_eval_table(result))
    console.print(f"wrote {run / EVAL_FILE} and {run / DENSITY_PNG}")


def _eval_table(r: dict[str, Any]) -> Table:
    table = Table(
        title=f"sae eval: {r['variant']} L{r['layer']} {r['site']} d_sae {r['d_sae']}", show_header=False
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("held-out tokens", f"{r['tokens']:,}"),
        ("L0 (target)", f"{r['l0']:.2f} ({r['l0_target']:g}, {r['l0_error_pct']:+.1f} %)"),
        ("FVU", f"{r['fvu']:.4f}"),
        ("FVU without massive tokens", f"{r['fvu_typical']:.4f} ({r['massive_tokens']} massive)"),
        ("MSE", f"{r['mse']:.4g}"),
        ("dead %", f"{r['dead_pct']:.2f}"),
        ("dense % (> 10 % of tokens)", f"{r['dense_pct']:.2f}"),
        ("shrinkage (rel. reconstruction bias)", f"{r['shrinkage']:.4f}"),
    ]
    if "ce_clean" in r:
        rows += [
            ("LM tokens", f"{r['lm_tokens']:,}"),
            (
                "CE clean / spliced / zero-abl.",
                f"{r['ce_clean']:.4f} / {r['ce_spliced']:.4f} / {r['ce_zero_ablation']:.4f}",
            ),
            ("delta LM loss", f"{r['delta_lm_loss']:.4f}"),
            ("CE recovered", f"{r['ce_recovered']:.4f}"),
            ("KL(clean || spliced)", f"{r['kl_clean_spliced']:.4f}"),
            ("live vs stored activations (rel. err)", f"{r['site_match_rel_err']:.4f}"),
        ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _register_commands() -> None:
    """`sae sweep` and `sae pareto` live in sae_cli/cli_sweep.py (their own module); they join this app here."""
    try:
        from .cli_sweep import register
    except ModuleNotFoundError as e:  # a checkout without the sweep module; any other error surfaces
        if e.name != f"{__package__}.cli_sweep":
            raise
        return
    register(app)


_register_commands()
