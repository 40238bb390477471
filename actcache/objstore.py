"""Stores on object storage: the byte-I/O seam (actcache/byteio.py) over fsspec (`s3://`, `gs://`, `az://`,
`memory://`, anything fsspec serves), and zarr's `FsspecStore` for the shard files.

`FsspecByteStore` maps the seam's operations onto whole-object calls: `write` and `replace_json` are one PUT
(`pipe_file`; atomic by nature on S3/GCS: a reader sees the old object or the new one, never a part, and a
completed PUT is durable), `read_range` a ranged GET, `list` a `find`, `make_durable` nothing. So the commit
protocol holds unchanged: the commit record is written last and is the only thing that makes shards visible.
What S3's consistency model allows a reader to see during a harvest: docs/store-format.md, "Object storage".

Credentials and endpoints come from the usual places (AWS_* variables, ~/.aws, `FSSPEC_S3_ENDPOINT_URL`); an
object store has no `flock`, so one harvest per store is the user's to ensure (docs/store-format.md).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from typing import Any

from zarr.storage import FsspecStore

from actcache.digests import crc32c_hex, readonly_u8

log = logging.getLogger(__name__)


def is_url(path: object) -> bool:
    """Whether a store location names an object store (`proto://...`, not a local path or file://)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


class RemotePath(str):
    """A URL that messages can treat like a Path (`/`, `name`, `parent`, `resolve`); never opened as a file."""

    def __truediv__(self, other: object) -> RemotePath:
        return RemotePath(f"{self.rstrip('/')}/{other}")

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.rstrip("/").rsplit("/", 1)[0])

    def resolve(self) -> RemotePath:
        return self

    def as_posix(self) -> str:
        return str(self)


class FsspecByteStore:
    """The byte-I/O seam on an fsspec filesystem (see the module docstring); `root` is the store's URL."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        from fsspec.core import url_to_fs

        self.url = url.rstrip("/")
        self.root = RemotePath(self.url)
        self.storage_options = dict(storage_options or {})
        self.fs, self.base = url_to_fs(self.url, **self.storage_options)
        self.base = self.base.rstrip("/")

    def _full(self, key: str) -> str:
        return f"{self.base}/{key}" if key else self.base

    def location(self, key: str) -> RemotePath:  # type: ignore[override]
        return self.root / key if key else self.root

    def read(self, key: str) -> bytes:
        return bytes(self.fs.cat_file(self._full(key)))

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:  # one ranged GET; a range past the end returns what is there
            return bytes(self.fs.cat_file(self._full(key), start=offset, end=offset + length))
        except FileNotFoundError:
            raise
        except (OSError, ValueError):  # a range that starts at or past the end (S3: 416 InvalidRange)
            size = self.size(key)
            if size is None:
                raise FileNotFoundError(self.location(key)) from None
            if offset >= size:
                return b""
            raise

    def write(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._full(key), bytes(data))

    def replace_json(self, key: str, obj: Any) -> None:
        self.fs.pipe_file(self._full(key), json.dumps(obj, indent=1).encode())

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def size(self, key: str) -> int | None:
        path = self._full(key)
        self.fs.invalidate_cache(path)
        try:
            info = self.fs.info(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return int(info["size"]) if info.get("type", "file") == "file" else None

    def list(self, prefix: str) -> list[str]:
        base = self._full(prefix)
        self.fs.invalidate_cache(base)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        start = len(self.base) + 1
        return sorted(p[start:] for p in found if p.startswith(self.base + "/"))

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._full(key))
        except FileNotFoundError:
            pass

    def make_durable(self, keys: Iterable[str]) -> None:
        return None  # a completed PUT is durable

    def zarr_store(self, read_only: bool = True) -> DigestingFsspecStore:
        return DigestingFsspecStore.from_url(
            self.url, storage_options=self.storage_options or None, read_only=read_only
        )

    def __repr__(self) -> str:
        return f"FsspecByteStore({self.url!r})"


class DigestingFsspecStore(FsspecStore):
    """zarr's FsspecStore that remembers the (size, crc32c) of every value it writes (the manifest's digests
    without a read back), as `byteio.DigestingLocalStore` does locally."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.digests: dict[str, tuple[int, str]] = {}
        self._digest_lock = threading.Lock()

    def pop_digest(self, key: str) -> tuple[int, str] | None:
        with self._digest_lock:
            return self.digests.pop(key, None)

    async def set(self, key: str, value: Any, byte_range: Any = None) -> None:
        u8 = readonly_u8(memoryview(value.as_buffer_like()).cast("B"))
        with self._digest_lock:
            self.digests[key] = (u8.nbytes, crc32c_hex(u8))
        await super().set(key, value, byte_range)

    def with_read_only(self, read_only: bool = False) -> DigestingFsspecStore:
        clone = type(self)(
            fs=self.fs, path=self.path, read_only=read_only, allowed_exceptions=self.allowed_exceptions
        )
        clone.digests, clone._digest_lock = self.digests, self._digest_lock
        return clone


def store_exists(io: Any) -> bool:
    """Whether anything is stored under an object-store location."""
    return bool(io.list(""))


def remove_store(io: Any) -> None:
    """Delete every object of a store (--overwrite); the commit record first, so no reader sees a half store."""
    keys = io.list("")
    for key in sorted(keys, key=lambda k: k != "commit.json"):
        io.delete(key)


def writer_lock(io: Any) -> Any:
    """The one-writer lock of a store: `lock.StoreLock` (flock beside a local store), StoreError naming the holder;
    None on an object store, which has no flock (one harvest per store is the user's to ensure there)."""
    from actcache.lock import LockHeld, StoreLock
    from actcache.spec import StoreError

    if isinstance(io, FsspecByteStore):
        return None
    try:
        return StoreLock(io.root).acquire()
    except LockHeld as e:
        raise StoreError(str(e)) from None
