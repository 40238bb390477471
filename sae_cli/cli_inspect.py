"""`sae inspect`: what the latents of a trained SAE fire on, from one pass of its encoder over the cached
activations (sae_cli/inspect/). Registered into sae_cli/cli.py's `app` by `register(app)`; parses, prints (rich)
and calls the library, which logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .cli_common import _LazyProgress, cli_errors, console, other_store_option, out_console


def register(app: typer.Typer) -> None:
    """Add the `inspect` command to the `sae` app."""
    app.command("inspect")(inspect_cmd)


def inspect_cmd(
    run: Path = typer.Argument(
        ..., help="Run folder written by `sae train` (or a sweep folder: every member)."
    ),
    store: str = typer.Option(
        None, help="The store the SAE was trained on (default: the one the run recorded)."
    ),
    out: Path = typer.Option(
        None, help="Folder of the HTML site (index.html; per SAE of a sweep: out/<member>/)."
    ),
    latent: int = typer.Option(
        None, help="Show this latent in the terminal (reuses the pass saved in --out when there is one)."
    ),
    all_tokens: bool = typer.Option(
        False, "--all", help="Every token of the store instead of the run's held-out range."
    ),
    other_store: bool = other_store_option("inspect on all of it."),
    top: int = typer.Option(20, help="Top-activating contexts kept per latent."),
    samples: int = typer.Option(24, help="Sampled firings kept per latent (the lower-quantile contexts)."),
    before: int = typer.Option(12, help="Tokens shown before the firing token."),
    after: int = typer.Option(4, help="Tokens shown after it."),
    no_model: bool = typer.Option(
        False, "--no-model", help="Load neither the tokenizer nor the model (token ids, no logit lens)."
    ),
    device: str = typer.Option("auto", help="Torch device for the SAE and the pass."),
) -> None:
    """Top contexts, frequencies, histograms, logit lens and decoder neighbours of every latent: a static HTML
    site (--out) or one latent in the terminal (--latent)."""
    from .config import ConfigError
    from .data import open_store
    from .inspect.scan import ScanConfig
    from .inspect.site import inspect, inspect_latent, targets
    from .run import resolve_device

    with cli_errors():
        if out is None and latent is None:
            raise ConfigError(
                "nothing to do: pass --out DIR (the HTML site) and/or --latent N (the terminal)"
            )
        for flag, v in (("--top", top), ("--samples", samples), ("--before", before), ("--after", after)):
            if v < 0 or (flag == "--top" and v < 1):
                raise ConfigError(f"{flag} must be >= {int(flag == '--top')}, got {v}")
        cfg = ScanConfig(top=top, samples=samples, before=before, after=after)
        dev = resolve_device(device)
        st = open_store(store or targets(run)[0].training.get("store", ""))
        progress, report = _progress()
        if other_store and not store:
            raise ConfigError("--other-store inspects another store: name it with --store")
        kwargs: dict[str, Any] = dict(
            all_tokens=all_tokens, other_store=other_store, cfg=cfg, device=dev, with_model=not no_model
        )
        with progress:
            if latent is None:
                pages = inspect(run, st, out, progress=report, **kwargs)
            else:
                rec = inspect_latent(run, st, latent, out, progress=report, **kwargs)
    if latent is None:
        console.print(f"wrote {len(pages)} site(s): open {pages[-1]}")
        return
    show_latent(rec)


def _progress() -> tuple[_LazyProgress, Any]:
    progress = _LazyProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    tasks: dict[str, Any] = {}

    def report(stage: str, done: int, total: int) -> None:
        if not tasks:
            progress.start()
        if stage not in tasks or (done <= 1 and progress.tasks[tasks[stage]].completed > done):
            tasks[stage] = progress.add_task(f"inspect {stage}", total=total)
        progress.update(tasks[stage], completed=done, total=total)

    return progress, report


def context_text(c: dict[str, Any], scale: float) -> Text:
    """A context as rich Text: each token's background shaded by the activation, the firing token underlined."""
    text = Text(f"{c['value']:8.3g}  ", style="dim")
    for k, (tok, a) in enumerate(c["tokens"]):
        level = max(0.0, min(1.0, a / scale)) if scale > 0 else 0.0
        g, b = int(255 - 115 * level), int(255 - 255 * level)
        style = f"black on rgb(255,{g},{b})" if level >= 0.01 else ""
        text.append(tok.replace("\n", "↵"), style=style + (" underline" if k == c["focus"] else ""))
    return text


def show_latent(rec: dict[str, Any]) -> None:
    """One latent in the terminal: numbers, lens, neighbours, contexts."""
    out_console.print(f"[bold]latent {rec['id']}[/bold]  {rec['title']}")
    out_console.print(
        f"fires on {rec['count']:,} tokens ({100 * rec['freq']:.3g} %), mean activation when firing "
        f"{rec['mean']:.4g}, max {rec['max']:.4g}"
    )
    table = Table(box=None, show_header=True)
    for col in ("promotes", "suppresses", "nearest latents (cos)"):
        table.add_column(col)
    for i in range(max(len(rec["promoted"]), len(rec["neighbours"]))):
        p = rec["promoted"][i] if i < len(rec["promoted"]) else ("", 0.0)
        s = rec["suppressed"][i] if i < len(rec["suppressed"]) else ("", 0.0)
        n = rec["neighbours"][i] if i < len(rec["neighbours"]) else None
        table.add_row(
            repr(p[0]) if p[0] else "", repr(s[0]) if s[0] else "", f"{n[0]} ({n[1]:.2f})" if n else ""
        )
    out_console.print(table)
    out_console.print("[bold]top contexts[/bold]")
    for c in rec["top"]:
        out_console.print(context_text(c, rec["max"]))
    for b in rec["bands"]:
        out_console.print(f"[bold]{b['label']}[/bold] ({b['lo']:.3g}-{b['hi']:.3g}, sampled)")
        for c in b["contexts"]:
            out_console.print(context_text(c, rec["max"]))
