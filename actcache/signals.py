"""SIGTERM as Ctrl-C: a harvest stopped by `kill`, a scheduler (Slurm, Kubernetes) or a terminal that closed commits
its complete shards and exits as on Ctrl-C, instead of dying with the shards it had finished but not committed."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt in the main thread; the previous handler comes back on
    exit (so a second SIGTERM during the commit that follows terminates as usual: the store is crash-safe).
    Outside the main thread (no handler can be set) the block runs unchanged."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
