"""`sae sweep` and `sae pareto`: many SAEs from one pass over a store, their evaluation, table and Pareto plots.
Registered into sae_cli/cli.py's `app` by `register(app)`; parses, prints (rich) and calls the library
(sae_cli/sweep.py over the run path, sae_cli/run.py), which logs."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from .cli_common import (
    cli_errors,
    console,
    eval_progress,
    out_console,
    resume_hint,
    run_live,
    stop_if_interrupted,
)
from .config import ConfigError, LoopConfig, field_docs, parse_options
from .registry import variant_names

DOC = field_docs(LoopConfig)


def register(app: typer.Typer) -> None:
    """Add the `sweep` and `pareto` commands to the `sae` app."""
    app.command("sweep")(sweep)
    app.command("pareto")(pareto)


def sweep(
    store: str = typer.Option(None, help="Path of the actcache store (with --resume: the sweep's)."),
    variants: str = typer.Option(
        "topk", help=f"Comma-separated SAE variants ({', '.join(variant_names())})."
    ),
    l0_target: str = typer.Option(
        "50", "--l0-target", help="Comma-separated L0 targets, e.g. 20,50,100,200."
    ),
    width: str = typer.Option(
        "8x", help="Comma-separated widths: latents (16384) or multiples of d_model (8x)."
    ),
    objective: str = typer.Option("local", help="Comma-separated objectives (local,e2e,e2e+ds): an axis."),
    ds_layers: str = typer.Option("", "--ds-layers", help=DOC["ds_layers"]),
    layer: int = typer.Option(None, help="Layer whose activations the members read."),
    site: str = typer.Option("resid_post", help="Site: resid_pre, resid_post, mlp_out or attn_out."),
    layers: str = typer.Option(None, help="Several layers (3,15 or 0-3); replaces --layer."),
    sites: str = typer.Option(None, help="Several sites (resid_post,mlp_out); replaces --site."),
    tokens: int = typer.Option(0, help=f"Shared by every member. {DOC['tokens']}"),
    out: Path = typer.Option(..., help="Sweep folder: every member's SAE and eval, the table, the plots."),
    batch_size: int = typer.Option(0, help=DOC["batch_size"]),
    seed: int = typer.Option(0, help=DOC["seed"]),
    eval_tokens: int = typer.Option(0, help=DOC["eval_tokens"]),
    lm_tokens: int = typer.Option(
        0,
        help="LM metrics (3 model passes per window) on at most this many held-out tokens (0: all of them).",
    ),
    no_model: bool = typer.Option(False, "--no-model", help="Skip the LM metrics (no model, no splicing)."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Train only; evaluate later: `sae pareto --eval`."),
    device: str = typer.Option("auto", help=DOC["device"]),
    normalize: str = typer.Option("sample", help=DOC["normalize"]),
    max_norm_ratio: float = typer.Option(0.0, help=DOC["max_norm_ratio"]),
    checkpoint_every: int = typer.Option(0, help=DOC["checkpoint_every"]),
    log_every: int = typer.Option(10, help=DOC["log_every"]),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the sweep in --out from its checkpoint, with its saved settings."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the sweep in --out."),
    option: list[str] = typer.Option(
        None,
        "--option",
        help="Variant option KEY=VALUE for every member, VARIANT.KEY=VALUE for one variant's (repeatable; as "
        "`sae train --option`).",
    ),
) -> None:
    """Train variants x L0 targets x widths (x layers x sites) in one loop; evaluate, tabulate, plot."""
    from .evaluate import check_eval_options
    from .io import run_lock
    from .sweep import SweepError, prepare_sweep, run_training, saved_config

    with cli_errors(SweepError):
        _one_process()
        lock = run_lock(out, "sweep")  # one process trains into --out at a time, until the summary is written
    try:
        with cli_errors(SweepError, hint=lambda: resume_hint(out, "sae sweep")):
            check_eval_options(0, lm_tokens, 1)
            if resume:  # the saved member set and loop; the device, the evaluation options and --store apply
                cfg = saved_config(out)
                if store is not None:  # a moved store; data.run_identity refuses any other one
                    cfg = dataclasses.replace(cfg, store=store)
            else:
                loop = LoopConfig(
                    tokens=tokens, batch_size=batch_size, seed=seed, eval_tokens=eval_tokens, device=device,
                    normalize=normalize, checkpoint_every=checkpoint_every, log_every=log_every,
                    ds_layers=ds_layers, max_norm_ratio=max_norm_ratio,
                )  # fmt: skip
                cfg = _fresh_config(
                    store=store, layer=layer, site=site, layers=layers, sites=sites, variants=variants,
                    l0_target=l0_target, width=width, loop=loop, options=parse_options(option),
                    objective=objective,
                )  # fmt: skip
            prep = prepare_sweep(cfg, out, device=device, resume=resume, overwrite=overwrite)
            result = run_training(prep, run_live, started=_header)  # the header once the members started
        stop_if_interrupted(result, "sae sweep", out)
        console.print(f"[green]trained {len(prep.plans)} members[/green] in {prep.timings['train_s']:.0f} s")
        with cli_errors(SweepError):
            if not no_eval:
                _evaluate(prep, with_model=not no_model, lm_tokens=lm_tokens)
            _finish(out)
    finally:
        lock.release()


def _one_process() -> None:
    """SweepError under torchrun / accelerate launch: a sweep is not wired to a process group (docs/scaling.md)."""
    from actcache.dist import Dist

    from .sweep import SweepError

    if Dist.from_env().multi:
        raise SweepError(
            "sae sweep runs in one process, not under torchrun: run one sweep per GPU (--device cuda:I, its own "
            "--out), or train a member data-parallel with `torchrun ... -m sae_cli.cli train` (docs/scaling.md)"
        )


def _fresh_config(
    *,
    store: str | None,
    layer: int | None,
    site: str,
    layers: str | None,
    sites: str | None,
    variants: str,
    l0_target: str,
    width: str,
    loop: LoopConfig,
    options: dict[str, Any],
    objective: str = "local",
) -> Any:
    """The SweepConfig of a fresh sweep from the command line (validated later, by the run path)."""
    from .sweep import SweepConfig, parse_layers, parse_list

    if store is None:
        raise ConfigError("no store given: pass --store PATH")
    if layers is None and layer is None:
        raise ConfigError("no layer given: pass --layer 15 (or --layers 3,15)")
    return SweepConfig(
        store=store,
        variants=parse_list(variants, str, "--variants"),
        layers=parse_layers(layers) if layers else (layer,),  # type: ignore[arg-type]
        sites=parse_list(sites, str, "--sites") if sites else (site,),
        l0_targets=parse_list(l0_target, float, "--l0-target"),
        widths=parse_list(width, str, "--width"),
        loop=loop,
        options=options,
        objectives=parse_list(objective, str, "--objective"),
    )


def _header(prep: Any) -> None:
    from .sweep import shape_groups

    cfg, loop = prep.cfg, prep.loop
    steps = math.ceil(prep.tokens / loop.batch_size)
    widths = sorted({p.sae_cfg.d_sae for p in prep.plans})
    workers = prep.trainer.member_workers
    how = f"{workers} members at a time, one thread each" if workers > 1 else "members one after another"
    free = f" of {prep.memory_free / 2**30:.1f} GiB free" if prep.memory_free else ""
    n_calib = prep.calib_range[1] - prep.calib_range[0]
    held = f"; {n_calib:,} training tokens held back to calibrate thresholds" if n_calib > 0 else ""
    options = f"; options {cfg.options}" if cfg.options else ""
    console.print(
        f"[bold]sae sweep[/bold]: {len(prep.plans)} members = {len(cfg.layers)} layer(s) x {len(cfg.sites)} site(s) "
        f"x {len(cfg.variants)} variant(s) x {len(cfg.widths)} width(s) x {len(cfg.l0_targets)} L0 target(s) "
        f"x {len(cfg.objectives)} objective(s) ({', '.join(cfg.objectives)}); "
        f"d_in {prep.store.d_model}, d_sae {', '.join(map(str, widths))}; {prep.tokens:,} tokens = {steps} steps "
        f"of {loop.batch_size}; {len(shape_groups(prep.plans))} equal-shape group(s); "
        f"{how}; memory estimate {prep.memory_bytes / 2**30:.2f} GiB{free}; {prep.device}{held}{options}"
    )


def _evaluate(prep: Any, *, with_model: bool, lm_tokens: int) -> None:
    from .sweep import evaluate_members

    progress, report = eval_progress()
    with progress:
        evaluate_members(prep, with_model=with_model, lm_tokens=lm_tokens, progress=report)
    console.print(f"evaluated {len(prep.plans)} members in {prep.timings['eval_s']:.0f} s")


def _finish(out: Path) -> None:
    from .sweep import finish_sweep

    rows, paths = finish_sweep(out)
    # Piped or logged (make): no terminal width to fit, so no column is cut to "..." at rich's default 80.
    (out_console if out_console.is_terminal else Console(width=160)).print(_summary_table(rows))
    console.print("wrote " + ", ".join(str(p) for p in paths))


def _summary_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="sweep summary (held-out tokens)")
    cols = [
        ("layer", "layer", "{}"),
        ("site", "site", "{}"),
        ("variant", "variant", "{}"),
        ("d_sae", "d_sae", "{}"),
        ("L0 target", "l0_target", "{:g}"),
        ("L0", "l0", "{:.1f}"),
        ("FVU", "fvu", "{:.4f}"),
        ("dead %", "dead_pct", "{:.1f}"),
        ("delta LM loss", "delta_lm_loss", "{:.4f}"),
        ("CE recovered", "ce_recovered", "{:.3f}"),
    ]
    for head, _, _ in cols:
        table.add_column(head, justify="left" if head in ("site", "variant") else "right")
    for r in rows:
        cells = []
        for _, key, fmt in cols:
            v = r.get(key)
            cells.append("-" if isinstance(v, float) and math.isnan(v) else fmt.format(v))
        table.add_row(*cells)
    return table


def pareto(
    sweep_dir: Path = typer.Argument(..., help="A sweep folder written by `sae sweep`."),
    eval_: bool = typer.Option(
        False,
        "--eval",
        help="First evaluate members that have no eval.json (e.g. after `sae sweep --no-eval`).",
    ),
    no_model: bool = typer.Option(False, "--no-model", help="With --eval: skip the LM metrics."),
    device: str = typer.Option("auto", help="Torch device for --eval."),
) -> None:
    """Rebuild a sweep's summary table and Pareto plots (L0 vs FVU, L0 vs delta LM loss) from its members."""
    from .run import resolve_device
    from .sweep import SweepError, evaluate_missing

    with cli_errors(SweepError):
        if eval_:
            evaluate_missing(sweep_dir, with_model=not no_model, device=resolve_device(device))
        _finish(sweep_dir)
