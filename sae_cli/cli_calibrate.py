"""`sae calibrate`: set a trained SAE's inference thresholds again (sae_cli/recalibrate.py). Registered into
sae_cli/cli.py's `app` by `register(app)`; parses, prints and calls the library."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import cli_errors, console, other_store_option

DEFAULT_TOKENS = 16384  # sae_cli/recalibrate.py's, without importing torch for `sae --help`


def register(app: typer.Typer) -> None:
    """Add the `calibrate` command to the `sae` app."""
    app.command("calibrate")(calibrate)


def calibrate(
    run: Path = typer.Argument(..., help="Folder of a trained SAE (cfg.json + sae.safetensors)."),
    store: str = typer.Option(
        ..., help="The store to calibrate on: the run's own, or another with --other-store."
    ),
    other_store: bool = other_store_option(
        "calibrate on its first --tokens tokens (`sae eval OUT --store S --other-store` then evaluates on the rest)."
    ),
    tokens: int = typer.Option(
        DEFAULT_TOKENS, help="With --other-store: calibration tokens (whole windows)."
    ),
    l0_target: float = typer.Option(
        None, "--l0-target", help="A new L0 target (TopK: a new k); default: the SAE's own."
    ),
    out: Path = typer.Option(None, help="Write the recalibrated SAE here (default: in place)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
) -> None:
    """Set an SAE's inference thresholds so that its L0 lands on its target on the given tokens (a threshold's L0
    moves with the text; TopK has no threshold)."""
    from .recalibrate import recalibrate

    with cli_errors():
        rec = recalibrate(
            run,
            store,
            other_store=other_store,
            tokens=tokens,
            out=out,
            overwrite=overwrite,
            l0_target=l0_target,
        )
    where = out or run
    console.print(
        f"L0 on {rec['tokens']:,} calibration tokens of {rec['store']} [{rec['range'][0]}, {rec['range'][1]}): "
        f"{rec['l0_before']:.2f} -> {rec['l0_after']:.2f} (target {rec['l0_target']:g}); wrote {where}"
    )
    if other_store:
        console.print(
            f"evaluate it on the rest of that store: sae eval {where} --store {store} --other-store"
        )
