"""Digests of the store's bytes and records: crc32c (google-crc32c, hardware-accelerated) of shard files,
sha256 of canonical JSON (the manifest chain, the sealed commit record)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np


def readonly_u8(data: Any) -> np.ndarray:
    """A read-only uint8 view (google_crc32c takes only read-only buffers), no copy."""
    u8 = np.frombuffer(data, dtype=np.uint8)
    u8.flags.writeable = False
    return u8


def crc32c_hex(data: Any) -> str:
    """crc32c of a bytes-like object, as 8 hex digits."""
    import google_crc32c

    return f"{google_crc32c.value(readonly_u8(data)):08x}"


def file_digest(path: Path) -> tuple[int, str]:
    """(size, crc32c hex) of a file, read in 16 MiB pieces."""
    import google_crc32c

    crc, size = 0, 0
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            crc = google_crc32c.extend(crc, piece)
            size += len(piece)
    return size, f"{crc:08x}"


def canonical(obj: Any) -> bytes:
    """The bytes a digest is taken of: JSON with sorted keys and no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
