"""What `actcache harvest` needs to run as one rank of `torchrun` / `accelerate launch` and to write to object
storage: the `--out` location (a folder or a URL), its existence and free space, and planning on several ranks
(rank 0 checks and prints the plan; the others plan quietly once it said go). The CLI (actcache/cli.py) prints.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .byteio import open_bytes
from .dist import Dist, RemoteError
from .objstore import RemotePath, is_url, store_exists

__all__ = ["RemoteError", "exists", "free_bytes", "join", "location", "plan_on_ranks"]


def location(out: str | Path) -> Path | RemotePath:
    """`--out` as a local Path, or a RemotePath for a URL (`s3://bucket/run.zarr`)."""
    return RemotePath(str(out).rstrip("/")) if is_url(str(out)) else Path(out)


def exists(out: Path | RemotePath) -> bool:
    """Whether anything is at `out` (a file or folder; an object under the URL)."""
    return out.exists() if isinstance(out, Path) else store_exists(open_bytes(str(out)))


def free_bytes(out: Path | RemotePath) -> int | None:
    """Free bytes of the disk that holds `out`; None on object storage (no such limit)."""
    if not isinstance(out, Path):
        return None
    probe = out.resolve()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def join() -> Dist:
    """This process's rank (from torchrun's variables), in the gloo process group when there are several: the
    harvest exchanges only small objects (decisions, a barrier), so it needs no GPU collectives. HarvestError
    (one line) when the launcher's variables are incomplete or wrong."""
    from .harvest_plan import HarvestError

    try:
        dist = Dist.from_env()
        dist.init("gloo")
    except ValueError as e:
        raise HarvestError(str(e)) from None
    return dist


def plan_on_ranks(plan_and_check: Callable[[], Any], plan: Callable[[], Any]) -> tuple[Any, Dist]:
    """Join the job (`join`); then `plan_and_check()` on rank 0 (it prints, checks `--out` and returns the plan or
    None: nothing to run), while the other ranks wait for its verdict, then `plan()` quietly (the plan is
    deterministic) or return None. An error on rank 0 is `dist.RemoteError` on the others. (plan, dist)."""
    dist = join()
    if not dist.multi:
        return plan_and_check(), dist
    planned: list[Any] = []

    def main() -> bool:
        planned.append(plan_and_check())
        return planned[0] is not None

    go = dist.run_main(main)
    if planned:
        return planned[0], dist
    return (plan() if go else None), dist
