"""Environment faults (a full or read-only disk, no permission) as one line that says what to do.

Both CLIs turn these into `error: ...`, exit code 2, instead of a traceback; library code lets them propagate.
"""

from __future__ import annotations

import errno

_FAULTS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
    errno.EROFS: ("the file system is read-only", "write to a writable folder"),
    errno.EACCES: ("permission denied", "write to a folder you may write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "write to a folder you may write to, or fix its permissions"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n)"),
    errno.ENOMEM: ("out of memory", "use smaller batches or a larger machine"),
    errno.EIO: ("an input/output error from the disk", "check the disk (dmesg), then retry"),
    errno.ENOTDIR: ("a folder on the path is a file", "choose another path"),
    errno.EEXIST: ("a file stands where a folder is needed", "choose another path"),
    errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter path"),
    errno.EISDIR: ("a folder stands where a file is needed", "choose another path or remove the folder"),
}


def environment_fault(err: BaseException) -> tuple[str, str] | None:
    """(what happened, including the file; what to do) for an OSError with an errno (the environment), else None."""
    if not isinstance(err, OSError) or err.errno is None:
        return None
    what, fix = _FAULTS.get(err.errno, (err.strerror or type(err).__name__, "check the path and retry"))
    where = err.filename if err.filename is not None else ""
    return (f"{what} ({where})" if where else what), fix


def is_environment_fault(err: BaseException) -> bool:
    return environment_fault(err) is not None
