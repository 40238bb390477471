"""A trained SAE on disk, and atomic file writes. Loading never unpickles: JSON + safetensors only.

An SAE folder holds
- `cfg.json`: {"format": "sae_cli.sae", "format_version": 1, "sae": SAEConfig, "training": summary}; the
  summary records the input scale c that `fold_scale` folded into the weights (the saved SAE takes raw
  activations), the store, layer and site, tokens, steps, final lambda, and so on;
- `sae.safetensors`: the module's state dict (weights in the [d_sae, d_in] layout);
- `densities.safetensors` (optional): `freq_F`, the firing frequency per latent measured during training.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .registry import get_variant
from .variants.base import SAE, SAEConfig

if TYPE_CHECKING:
    from actcache.lock import StoreLock

FORMAT_NAME = "sae_cli.sae"
FORMAT_VERSION = 1
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
DENSITIES_FILE = "densities.safetensors"


class SAEFileError(Exception):
    """A saved SAE or checkpoint is missing, damaged or of another kind; the message names the fix."""


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`, then os.replace it onto `path`; on any failure (a full disk, a
    read-only folder) the temporary file is removed and the old `path` is left as it was, and an OSError names
    `path` (pyarrow's name no file)."""
    tmp = _tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        code = os_errno(e) if isinstance(e, OSError) else None
        if code is not None and e.filename in (None, str(tmp)):  # name the file the user knows, not the tmp
            raise OSError(code, os.strerror(code), str(path)) from None
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Readers see the old or the new file, never a torn one (tmp + fsync + os.replace)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
        f.flush()
        os.fsync(f.fileno())


def write_tensors_atomic(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: dict | None = None
) -> None:
    """As write_json_atomic, for a safetensors file. An I/O failure is an OSError with its errno (safetensors
    raises its own error type, whose message carries the OS error number)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata
            )
        except Exception as e:
            code = os_errno(e)
            if code is None or isinstance(e, OSError):
                raise
            raise OSError(code, os.strerror(code), str(path)) from None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


def os_errno(err: BaseException) -> int | None:
    """The OS error number of `err`: its errno, or the one its message names ('os error 28', '[errno 28]'), as
    safetensors and pyarrow report I/O failures; None if there is none."""
    code = getattr(err, "errno", None)
    if isinstance(code, int):
        return code
    found = re.search(r"(?:os error|errno) (\d+)", str(err), re.IGNORECASE)
    return int(found.group(1)) if found else None


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN/Inf float replaced by None (JSON null): a bare NaN is not valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def non_finite(tensors: Mapping[str, Tensor]) -> str | None:
    """'NAME (n of N values)' for the first floating-point tensor that holds NaN/Inf, None when all are finite."""
    for name, t in tensors.items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return f"{name} ({bad} of {t.numel()} values)"
    return None


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SAEFileError(f"{path} does not exist") from None
    except (json.JSONDecodeError, OSError) as e:
        raise SAEFileError(f"cannot read {path}: {e}") from None


def read_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise SAEFileError(f"{path} does not exist") from None
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise SAEFileError(f"cannot read {path}: {e}") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def save_sae(
    folder: str | Path, sae: SAE, training: Mapping[str, Any] | None = None, freq_F: Tensor | None = None
) -> Path:
    """Write an SAE folder (weights first, cfg.json last: a folder with cfg.json is complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tensors_atomic(folder / WEIGHTS_FILE, sae.state_dict())
    if freq_F is not None:
        write_tensors_atomic(folder / DENSITIES_FILE, {"freq_F": freq_F.float()})
    cfg = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sae": sae.cfg.to_dict(),
        "training": json_safe(dict(training or {})),
    }
    write_json_atomic(folder / CFG_FILE, cfg)
    return folder


def read_cfg(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / CFG_FILE).is_file():
        raise SAEFileError(f"{folder} is not a trained SAE (no {CFG_FILE}); train one with `sae train`")
    cfg = read_json(folder / CFG_FILE)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT_NAME:
        raise SAEFileError(f"{folder / CFG_FILE} is not an sae_cli SAE config")
    if int(cfg.get("format_version", 0)) > FORMAT_VERSION:
        raise SAEFileError(f"{folder} was saved by a newer sae_cli (format {cfg['format_version']}); upgrade")
    return cfg


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Rebuild the variant from cfg.json and load sae.safetensors (strict: every tensor must match)."""
    folder = Path(folder)
    cfg = read_cfg(folder)
    sae_cfg = SAEConfig(**cfg["sae"])
    try:
        sae = get_variant(sae_cfg.variant)(sae_cfg)
    except KeyError as e:
        raise SAEFileError(f"{folder}: {e.args[0]}") from None
    state = read_tensors(folder / WEIGHTS_FILE)
    bad = non_finite(state)
    if bad is not None:
        raise SAEFileError(
            f"{folder / WEIGHTS_FILE} holds NaN/Inf in tensor {bad}; the SAE is damaged: train it again (or "
            "resume its run from a good checkpoint)"
        )
    try:
        sae.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise SAEFileError(
            f"{folder / WEIGHTS_FILE} does not match its cfg.json: {first[-1].strip()}"
        ) from None
    return sae.to(device).eval()


def load_densities(folder: str | Path) -> Tensor | None:
    path = Path(folder) / DENSITIES_FILE
    return read_tensors(path)["freq_F"] if path.is_file() else None


def run_lock(out: Path, what: str = "training run") -> StoreLock:
    """The write lock of a run or sweep folder, acquired (actcache.lock: `.{name}.lock` beside it, dropped when the
    process exits however it exits; `with run_lock(out):` or `.release()`); SAEFileError naming the holder when
    another process trains into `out`."""
    from actcache.lock import LockHeld, StoreLock

    lock = StoreLock(out, what)
    try:
        return lock.acquire()
    except LockHeld as e:
        raise SAEFileError(str(e)) from None
