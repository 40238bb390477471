"""`sae train|variants`: parse the options, call the library (sae_cli/run.py for training), print (rich tables and
progress); the `sae` app, with `sae eval` (sae_cli/cli_eval.py), `sae sweep|pareto` (cli_sweep.py), `sae
export|import` (cli_formats.py), `sae inspect` (cli_inspect.py) and `sae calibrate` (cli_calibrate.py) registered
into it; all use sae_cli/cli_common.py."""

from __future__ import annotations

import logging
import math
import tomllib
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from .cli_calibrate import register as register_calibrate_command
from .cli_common import (
    cli_errors,
    console,
    out_console,
    resume_hint,
    stop_if_interrupted,
)
from .cli_eval import register as register_eval_command
from .cli_formats import register as register_format_commands
from .cli_inspect import register as register_inspect_command
from .cli_sweep import register as register_sweep_commands
from .config import ConfigError, LoopConfig, MemberConfig, TrainConfig, field_docs, parse_options
from .registry import variant_names

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)

DOC = {**field_docs(MemberConfig), **field_docs(LoopConfig), **field_docs(TrainConfig)}
OPTION_HELP = (
    "Variant option KEY=VALUE (repeatable; the value read as TOML, else text), e.g. --option decoder_norm=unit; "
    "as the TOML table `options`."
)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    """Train and evaluate sparse autoencoders of every variant from an actcache store."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


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


def _resolve_flat(
    cli: dict[str, Any], config: Path | None, out: Path, resume: bool, options: dict[str, Any]
) -> dict[str, Any]:
    """defaults < the run's saved config (--resume) < the TOML file < explicit CLI options; each --option
    KEY=VALUE over the `options` table that results."""
    from .io import read_json
    from .run import TRAIN_CONFIG_FILE

    flat: dict[str, Any] = {}
    if resume and (out / TRAIN_CONFIG_FILE).is_file():
        flat.update(read_json(out / TRAIN_CONFIG_FILE)["config"])
    if config is not None:
        flat.update(_read_toml(config))
    flat.update({k: v for k, v in cli.items() if v is not None})
    if options:
        base = flat.get("options") or {}
        if not isinstance(base, dict):
            raise ConfigError(f"config key 'options' expects a table, got {base!r}")
        flat["options"] = {**base, **options}
    flat.pop("out", None)
    return flat


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
    max_norm_ratio: float = typer.Option(None, help=DOC["max_norm_ratio"]),
    log_every: int = typer.Option(None, help=DOC["log_every"]),
    objective: str = typer.Option(None, help=DOC["objective"]),
    init_from: str = typer.Option(None, "--init-from", help=DOC["init_from"]),
    ds_layers: str = typer.Option(None, "--ds-layers", help=DOC["ds_layers"]),
    kl_coef: float = typer.Option(None, "--kl-coef", help=DOC["kl_coef"]),
    ds_coef: float = typer.Option(None, "--ds-coef", help=DOC["ds_coef"]),
    option: list[str] = typer.Option(None, "--option", help=OPTION_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in --out."),
    config: Path = typer.Option(
        None, "--config", help="TOML file with any of these options (keys as here, _ for -)."
    ),
) -> None:
    """Train one SAE on one (layer, site) of a store."""
    cli = {k: v for k, v in locals().items() if k not in ("resume", "overwrite", "config", "option")}
    with cli_errors(hint=lambda: resume_hint(out, "sae train")):
        toml_out = _read_toml(config).get("out") if config is not None else None
        out = out or (Path(toml_out) if toml_out else None)
        if out is None:
            raise ConfigError("no run folder given: pass --out RUN (or set out = ... in the config file)")
        flat = _resolve_flat(cli, config, out, resume, parse_options(option))
        cfg = TrainConfig.from_flat(flat)
        from contextlib import nullcontext

        from .cli_common import process_group
        from .io import run_lock

        reducer = process_group(cfg.loop.device)  # torchrun: data-parallel, rank 0 writes (and locks)
        with run_lock(out) if reducer is None or reducer.is_main else nullcontext():
            _train(cfg, out, resume, overwrite, reducer)


def _train(cfg: TrainConfig, out: Path, resume: bool, overwrite: bool, reducer: Any = None) -> None:
    """The run path (sae_cli/run.py) with a folder of one member: everything checked and built in memory
    before the run folder is touched. `reducer`: the process group of a torchrun launch (rank 0 prints)."""
    from .cli_common import run_live
    from .run import SoloRun, prepare_run, run_training

    main = reducer is None or reducer.is_main
    prep = prepare_run(
        SoloRun(cfg, out), device=cfg.loop.device, resume=resume, overwrite=overwrite, reducer=reducer
    )
    try:
        result = run_training(prep, run_live if main else None, started=_header if main else None)
    except RuntimeError as err:  # a collective failed: another process of the job is gone
        if reducer is None:
            raise
        raise ConfigError(
            f"another process of the job stopped ({type(err).__name__}); the last checkpoint in {out} is kept: "
            f"resume with the same number of processes and --resume"
        ) from None
    if not main:
        return
    stop_if_interrupted(result, "sae train", out)
    s = result.summaries[0]
    console.print(
        f"[green]saved {out}[/green]: {s['steps']} steps, {s['tokens']:,} tokens, {s['elapsed_s']:.0f} s; "
        f"next: sae eval {out} --store {cfg.store}"
    )


def _calibration_note(calibration_range: tuple[int, int]) -> str:
    n = calibration_range[1] - calibration_range[0]
    return f" (+ {n:,} held back to calibrate thresholds)" if n > 0 else ""


def _header(prep: Any) -> None:
    """After the start: the input scale (a fresh start with normalize=sample), then one line on the run."""
    from .trainer import dead_window, input_scale

    loop, plan, (key,) = prep.loop, prep.plans[0], prep.keys
    if prep.sample is not None and loop.normalize == "sample":
        c = input_scale(prep.sample[key])
        console.print(f"input scale c = {c:.4g} (E||c x||^2 = 1 on {len(prep.sample[key])} tokens)")
    m, n_tokens = prep.cfg.member, loop.tokens
    steps = math.ceil(n_tokens / loop.batch_size)
    train, held = prep.ranges.train, prep.ranges.eval
    epochs = n_tokens / max(1, train[1] - train[0])
    console.print(
        f"[bold]sae train {m.variant}[/bold] layer {m.layer} {m.site}: d_in {plan.sae_cfg.d_in} -> d_sae "
        f"{plan.sae_cfg.d_sae}, L0 target {m.l0_target:g} ({'steered' if plan.steered else 'by the rule'}), "
        f"lr {plan.lr:.3g}, {n_tokens:,} tokens = {steps} steps of {loop.batch_size} (~{epochs:.1f} epochs), "
        f"held out {held[1] - held[0]:,} tokens{_calibration_note(prep.ranges.calibration)}, {prep.device}; "
        f"dead = no firing in {dead_window(loop, n_tokens):,} tokens"
    )
    if plan.init_from:
        console.print(f"starting from the SAE in {plan.init_from} (its width and options)")
    if plan.objective != "local":
        s = prep.trainer.extra_summary
        console.print(
            f"objective {plan.objective}: KL x {s['kl_coef'][plan.objective]:g}"
            + (f" + {s['ds_coef']:g} x MSE at layers {s['ds_layers']}" if "ds_layers" in s else "")
            + f", {s['windows_per_batch']} windows per batch, {s['blocks_per_step']} blocks per step, KL in chunks "
            f"of {s['kl_chunk_positions']} positions (peak ~{s['kl_peak_bytes'] / 2**20:.0f} MiB of logits)"
        )


# ---- sae eval ------------------------------------------------------------------------------------------------
register_eval_command(app)  # `sae eval` (sae_cli/cli_eval.py)
register_sweep_commands(app)  # `sae sweep` and `sae pareto` (sae_cli/cli_sweep.py)
register_format_commands(app)  # `sae export` and `sae import` (sae_cli/cli_formats.py)
register_inspect_command(app)  # `sae inspect` (sae_cli/cli_inspect.py)
register_calibrate_command(app)  # `sae calibrate` (sae_cli/cli_calibrate.py)


if __name__ == "__main__":  # `torchrun --nproc-per-node N -m sae_cli.cli train ...`
    app()
