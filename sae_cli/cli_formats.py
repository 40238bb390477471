"""`sae export` and `sae import`: SAEs to and from the formats of other tools (sae_cli/formats, docs/formats.md).
Registered into sae_cli/cli.py's `app` by `register(app)`; parses, prints and calls the library."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import cli_errors, console
from .formats import EXPORTERS, IMPORTERS


def register(app: typer.Typer) -> None:
    """Add the `export` and `import` commands to the `sae` app."""
    app.command("export")(export)
    app.command("import")(import_)


def export(
    run: Path = typer.Argument(..., help="Run folder of a trained SAE (cfg.json + sae.safetensors)."),
    out: Path = typer.Argument(..., help="Folder to write (whole or not at all)."),
    format: str = typer.Option(..., "--format", help=f"Target format: {', '.join(EXPORTERS)}."),
    hook_name: str = typer.Option(
        None, "--hook-name", help="metadata.hook_name to record (default: the HF module path of the site)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Write a trained SAE in another tool's format (input normalisation folded into the weights)."""
    from .formats import exporter

    with cli_errors():
        written = exporter(format)(run, out, overwrite=overwrite, hook_name=hook_name)
    console.print(f"[green]wrote {written}[/green] ({format})")


def import_(
    src: Path = typer.Argument(..., help="The other tool's file or folder."),
    out: Path = typer.Argument(..., help="Run folder to write (cfg.json + sae.safetensors)."),
    format: str = typer.Option(..., "--format", help=f"Source format: {', '.join(IMPORTERS)}."),
    layer: int = typer.Option(None, help="Layer the SAE reads (default: what the source records)."),
    site: str = typer.Option(
        None, help="Site: resid_pre, resid_post, mlp_out or attn_out (default: as layer)."
    ),
    model: str = typer.Option(None, help="Model name to record (default: what the source records)."),
    l0_target: float = typer.Option(
        None,
        "--l0-target",
        help="L0 target to record (default: k, or the source's measured mean L0, else 0).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Read an SAE of another tool into a run folder (`sae eval OUT --store S` then evaluates it)."""
    from .formats import importer
    from .io import load_sae

    with cli_errors():
        fn = importer(format)
        written = fn(src, out, layer=layer, site=site, model=model, l0_target=l0_target, overwrite=overwrite)
        sae = load_sae(written)
    console.print(
        f"[green]wrote {written}[/green]: {sae.cfg.variant} d_in {sae.cfg.d_in} -> d_sae {sae.cfg.d_sae}; "
        f"next: sae eval {written} --store STORE"
    )
