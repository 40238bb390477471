"""What every `sae` command shares: the consoles, the one place that turns an expected failure into one line
(`cli_errors`), the device option, the live training view. Imported by sae_cli/cli.py and sae_cli/cli_sweep.py
(neither imports the other's internals); only the CLI modules print."""

from __future__ import annotations

import contextlib
import errno
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .config import ConfigError

console = Console(stderr=True)
out_console = Console()

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


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
        raise fail(e) from None
    except OSError as e:
        raise fail(environment_message(e) + hint()) from None


def other_store_option(then: str) -> Any:
    """The `--other-store` flag of `sae eval`, `sae calibrate` and `sae inspect` (`then`: what the command does
    with that store)."""
    return typer.Option(
        False,
        "--other-store",
        help=f"--store holds another text of the SAE's model, none of it trained on: {then}",
    )


def resume_hint(out: Path | None, command: str) -> str:
    """'; continue with: sae train --out RUN --resume' when `out` holds a checkpoint, else ''."""
    from .trainer import CHECKPOINT_DIR

    if out is not None and (out / CHECKPOINT_DIR / "state.json").is_file():
        return f"; the last checkpoint is kept: continue with `{command} --out {out} --resume`"
    return ""


def fail(err: BaseException | str) -> typer.Exit:
    """One line on stderr, exit code 2."""
    text = (
        err if isinstance(err, str) else (err.args[0] if isinstance(err, KeyError) and err.args else str(err))
    )
    typer.echo(f"error: {' '.join(str(text).split()) or type(err).__name__}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


def stop_if_interrupted(result: Any, command: str, out: Path) -> None:
    """After the loop: a run stopped by Ctrl-C / SIGTERM names how to continue it and exits 130."""
    if result.status != "done":
        console.print(
            f"[yellow]interrupted at step {result.step} ({result.tokens:,} tokens); checkpoint written. "
            f"Continue with: {command} --out {out} --resume[/yellow]"
        )
        raise typer.Exit(EXIT_INTERRUPTED)


class _LazyProgress(Progress):
    """A Progress that starts drawing at its first task (`with` does not start it): a command that fails before
    any stage prints its one error line and nothing else."""

    started = False

    def __enter__(self) -> _LazyProgress:
        return self

    def start(self) -> None:
        self.started = True
        super().start()

    def stop(self) -> None:
        if self.started:  # rich prints an empty line on stop when not on a terminal, started or not
            super().stop()


def eval_progress() -> tuple[Progress, Callable[[str, int, int], None]]:
    """A progress view for `sae eval` / a sweep's evaluation and its report(stage, done, total) callback (a
    stage that starts again from 0 resets its bar)."""
    progress = _LazyProgress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console
    )
    tasks: dict[str, Any] = {}

    def report(stage: str, done: int, total: int) -> None:
        if not tasks:
            progress.start()
        if stage != "members" and done == 0 and stage in tasks:
            progress.reset(tasks[stage], total=total)
        if stage not in tasks:
            tasks[stage] = progress.add_task(
                "eval members" if stage == "members" else f"eval {stage}", total=total
            )
        progress.update(tasks[stage], completed=done, total=total)

    return progress, report


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


def run_live(trainer: Any) -> Any:
    """trainer.run() under a progress bar and the latest metric rows; Ctrl-C / SIGTERM stop it at the next step
    (the trainer checkpoints)."""
    from .trainer import stop_on_signals

    progress = Progress(
        TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TimeRemainingColumn(),
        console=console,
    )  # fmt: skip
    task = progress.add_task("train", total=trainer.tokens_total, completed=trainer.tokens)
    next_line = [0.0]  # not a terminal (a log file): a plain progress line every 5 % of the run
    with Live(Group(progress), console=console, refresh_per_second=4, transient=False) as live:

        def callback(p: Any) -> None:
            progress.update(task, completed=p.tokens)
            if p.rows:
                live.update(Group(progress, _metrics_table(p.rows)))
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


def process_group(device: str) -> Any:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1): join the process group (nccl when training on CUDA,
    else gloo) and return its `reducer.DistributedReducer` (each rank on cuda:LOCAL_RANK); None for one process."""
    import torch

    from actcache.dist import Dist

    from .config import ConfigError
    from .reducer import DistributedReducer

    try:
        dist = Dist.from_env()
        if not dist.multi:
            return None
        cuda = device in ("auto", "cuda") and torch.cuda.is_available() or device.startswith("cuda")
        dist.init("nccl" if cuda else "gloo")
    except ValueError as e:  # the launcher's variables are incomplete or wrong
        raise ConfigError(str(e)) from None
    return DistributedReducer(f"cuda:{dist.local_rank}" if cuda else "cpu")
