"""The byte-I/O seam under the store: every byte the store reads or writes outside zarr goes through a `ByteStore`.

Keys are '/'-separated paths relative to the store root ('commit.json', 'manifest/00000003.json',
'acts/resid_post/5/c/3/0'). The contract (what each operation guarantees, what an fsspec/S3 backend must do) is
in docs/store-format.md, "Byte I/O seam"; `tests/test_store_contract.py` runs the store's contract against every
backend in its `BACKENDS` list. zarr writes and reads the shard files through its own Store abstraction
(`zarr_store()`: the other half of the seam; `actcache.manifest.DigestingLocalStore` for the local backend).

`LocalByteStore` is today's behaviour: `os.pread` for ranges, tmp + fsync + `os.replace` (+ folder fsync) for the
atomic JSON replace, fsync of files and their folders for `make_durable`.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from zarr.storage import LocalStore

from actcache.digests import crc32c_hex, readonly_u8


@runtime_checkable
class ByteStore(Protocol):
    """Byte access to one store's objects (see the module docstring and docs/store-format.md)."""

    root: Path
    """Where the store is, for messages (a local folder; a URL-like path for a remote backend)."""

    def location(self, key: str) -> Path:
        """The object's full name, for messages and for zarr (never opened by the caller)."""
        ...

    def read(self, key: str) -> bytes:
        """The whole object; FileNotFoundError when it does not exist."""
        ...

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of the object (fewer at its end); FileNotFoundError when missing."""
        ...

    def write(self, key: str, data: bytes) -> None:
        """Write a whole object, atomically: a reader sees the old object (or none) or the new one, never a part.
        Not durable until `make_durable` covers it."""
        ...

    def replace_json(self, key: str, obj: Any) -> None:
        """Replace a small JSON object atomically AND durably: when this returns the new object survives a crash
        and no reader ever saw a torn one (the commit point of the store)."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int | None:
        """Bytes of the object, None when it does not exist."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Keys of the objects directly or indirectly under `prefix` ('' = everything), sorted."""
        ...

    def delete(self, key: str) -> None:
        """Remove an object; no error when it does not exist."""
        ...

    def make_durable(self, keys: Iterable[str]) -> None:
        """Every named object already written (by `write` or by zarr) survives a crash once this returns."""
        ...

    def zarr_store(self, read_only: bool = True) -> Any:
        """A zarr v3 Store rooted at the same place (the writer's one records a digest of every shard it writes:
        `pop_digest(key) -> (size, crc32c hex) | None`)."""
        ...


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that readers see the old or the new file, never a torn one (tmp + fsync + os.replace, then
    the folder is fsynced)."""
    tmp = _tmp_name(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class LocalByteStore:
    """The local filesystem backend: a folder, one file per key."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def location(self, key: str) -> Path:
        return self.root / key if key else self.root

    def read(self, key: str) -> bytes:
        return self.location(key).read_bytes()

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        with open(self.location(key), "rb") as f:
            return os.pread(f.fileno(), length, offset)

    def write(self, key: str, data: bytes) -> None:
        path = self.location(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(path)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def replace_json(self, key: str, obj: Any) -> None:
        write_json_atomic(self.location(key), obj)

    def exists(self, key: str) -> bool:
        return self.location(key).is_file()

    def size(self, key: str) -> int | None:
        try:
            return self.location(key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def list(self, prefix: str) -> list[str]:
        base = self.location(prefix)
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def delete(self, key: str) -> None:
        self.location(key).unlink(missing_ok=True)

    def make_durable(self, keys: Iterable[str]) -> None:
        folders: set[Path] = set()
        for key in keys:
            path = self.location(key)
            if not path.exists():
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            folders.add(path.parent)
        for folder in sorted(folders):
            fsync_dir(folder)

    def zarr_store(self, read_only: bool = True) -> Any:
        return DigestingLocalStore(self.root, read_only=read_only)

    def __repr__(self) -> str:
        return f"LocalByteStore({str(self.root)!r})"


class DigestingLocalStore(LocalStore):
    """zarr's LocalStore that remembers the (size, crc32c) of every value it writes, keyed by its store key.

    The harvest writes whole shard files, so each digest is that of a complete shard, taken from the bytes in
    memory as they go to disk.
    """

    def __init__(self, root: Path | str, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self.digests: dict[str, tuple[int, str]] = {}
        self._digest_lock = threading.Lock()

    def _remember(self, key: str, value: Any) -> None:
        u8 = readonly_u8(memoryview(value.as_buffer_like()).cast("B"))
        digest = (u8.nbytes, crc32c_hex(u8))
        with self._digest_lock:
            self.digests[key] = digest

    def pop_digest(self, key: str) -> tuple[int, str] | None:
        with self._digest_lock:
            return self.digests.pop(key, None)

    async def _set(self, key: str, value: Any, exclusive: bool = False) -> None:
        self._remember(key, value)
        await super()._set(key, value, exclusive=exclusive)

    def set_sync(self, key: str, value: Any) -> None:
        self._remember(key, value)
        super().set_sync(key, value)

    def with_read_only(self, read_only: bool = False) -> DigestingLocalStore:
        clone = type(self)(root=self.root, read_only=read_only)
        clone.digests, clone._digest_lock = self.digests, self._digest_lock
        return clone


def open_bytes(path: str | os.PathLike | ByteStore) -> ByteStore:
    """The ByteStore of a store location: a ByteStore as is, a URL (`s3://...`) as an `objstore.FsspecByteStore`, a
    local path as a LocalByteStore."""
    from actcache.objstore import FsspecByteStore, is_url

    if is_url(path):
        return FsspecByteStore(str(path))
    if isinstance(path, str | os.PathLike):
        return LocalByteStore(path)
    return path
