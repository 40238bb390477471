"""Ctrl-C / SIGTERM: the loop checkpoints and returns."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("sae_cli.trainer")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """Within the block, Ctrl-C / SIGTERM set a flag (the loop checkpoints and returns); a second Ctrl-C
    raises KeyboardInterrupt as usual. Yields `should_stop`."""
    flag = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True
        log.warning("signal %d: checkpointing and stopping after this step", signum)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: no handlers, never stops early
        pass
    try:
        yield lambda: flag["stop"]
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
