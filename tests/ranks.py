"""Launching N processes the way `torchrun` does (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free
port), for the multi-process tests."""

from __future__ import annotations

import os
import socket
import subprocess

from actcache.harvest import SLOW_COMMIT_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ranks(
    cmd: list[str], world: int, slow: float = 0.0, env: dict | None = None
) -> list[subprocess.Popen]:
    """`world` processes of `cmd`, one per rank, in one gloo group on 127.0.0.1."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        rank_env = os.environ | {
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", SLOW_COMMIT_ENV: str(slow),
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **(env or {}),
        }  # fmt: skip
        if world == 1:
            for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                rank_env.pop(name)
        procs.append(
            subprocess.Popen(cmd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 180) -> list[tuple[int, str]]:
    """(return code, stderr) of every process."""
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out
