"""Environment faults (a full or read-only disk, no permission) as one line that says what to do.

Both CLIs turn these into `error: ...`, exit code 2, instead of a traceback; library code lets them propagate.
"""

from __future__ import annotations

import errno

_FAULTS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free space or choose another folder"),
    errno.EDQUOT: ("no space left: over quota", "free space or raise the quota"),
    errno.EROFS: ("read-only file system", "write to a folder on a writable disk"),
    errno.EACCES: ("no permission", "choose a folder you can write to, or fix its permissions"),
    errno.EPERM: (
        "no permission (operation not permitted)",
        "choose a folder you can write to, or fix its permissions",
    ),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n)"),
    errno.ENOMEM: ("out of memory", "use smaller batches or a larger machine"),
    errno.EIO: ("an input/output error from the disk", "check the disk (dmesg), then retry"),
    errno.ENOTDIR: ("a folder on the path is a file", "choose another path"),
    errno.EEXIST: ("a file stands where a folder is needed", "choose another path"),
    errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter path"),
    errno.EISDIR: ("a folder stands where a file is needed", "choose another path or remove the folder"),
}


def environment_fault(err: BaseException, code: int | None = None) -> tuple[str, str] | None:
    """(what happened, including the file; what to do) for an OSError with an errno (the environment), else None.
    `code`: the errno when the error carries it only in its message (safetensors, pyarrow)."""
    code = code if code is not None else getattr(err, "errno", None)
    if not isinstance(err, OSError) or not isinstance(code, int):
        return None
    what, fix = _FAULTS.get(code, (err.strerror or type(err).__name__, "check the path and retry"))
    where = err.filename if err.filename is not None else ""
    return (f"{what} ({where})" if where else what), fix
