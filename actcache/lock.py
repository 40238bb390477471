"""An advisory lock on a store (or an sae run folder) being written: one writer at a time.

The lock is ``fcntl.flock`` on a small file beside the store (``.{name}.lock`` in the same folder, so that it also
guards the creation of a store that does not exist yet). The kernel drops it when the holder exits, however it
exits (kill -9 included), so a crashed harvest never leaves a stale lock. The file holds the holder's pid, host and
start time, for the message a second writer gets. It is never deleted: removing a file that others may be
waiting on would let two writers lock two different files.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any


class LockHeld(Exception):
    """Another process holds the lock; the message names it (pid, host, since when)."""


def lock_path(store_path: Path) -> Path:
    return store_path.parent / f".{store_path.name}.lock"


class StoreLock:
    """``with StoreLock(path): ...`` or ``acquire()`` / ``release()``; LockHeld when another writer holds it."""

    def __init__(self, store_path: str | os.PathLike, what: str = "harvest") -> None:
        self.store_path = Path(store_path)
        self.what = what
        """What writes the folder, for the message a second writer gets ("harvest", "training run", ...)."""
        self.path = lock_path(self.store_path)
        self._fd: int | None = None

    def acquire(self) -> StoreLock:
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_holder(fd)
            os.close(fd)
            raise LockHeld(
                f"{self.store_path} is being written by {_describe(info)} (lock {self.path}); wait for that "
                f"{info.get('what') or self.what} to "
                "finish or stop it, then rerun"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        info = {
            "what": self.what,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # a full or read-only disk must not keep the lock: closing the file releases it
        finally:
            os.close(fd)

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(info: dict[str, Any]) -> str:
    if not info.get("pid"):
        return "another process"
    return f"pid {info['pid']} on {info.get('host', '?')} (since {info.get('since', '?')})"
