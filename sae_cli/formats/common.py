"""What every format reader and writer shares: the one error type, strict tensor reads (safetensors, npz and
`torch.load(weights_only=True)`; never an unpickling of arbitrary objects), key and shape checks that name the key
and the shape, building one of our variants from named parameters (the registry's class, strict state dict), and
writing a folder whole or not at all (a temporary folder beside it, renamed at the end)."""

from __future__ import annotations

import os
import shutil
import threading
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..io import SAEFileError, non_finite
from ..registry import get_variant
from ..variants.base import SAE, SAEConfig

PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")
"""A pickle stream starts with the PROTO opcode 0x80; torch.save writes a zip archive."""


class FormatError(SAEFileError):
    """A file of another tool that cannot be read or written as asked (the message names the key, the shape or
    the fix); the CLI prints it as one line and exits 2."""


def looks_pickled(path: Path) -> bool:
    """A pickle stream or a torch.save zip archive (a safetensors file starts with an 8-byte header length, whose
    first byte may be 0x80 too, then its JSON header's '{')."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return False
    return head[:1] == PICKLE_MAGIC[0] or head[:4] == PICKLE_MAGIC[1]


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file (fp32 copies); FormatError when the file is missing, is a pickle or a
    torch.save archive (never unpickled), or is damaged."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FormatError(f"{path} does not exist")
    if looks_pickled(path):
        raise FormatError(
            f"{path} is a pickle / torch.save file, not safetensors; it is not unpickled: convert it to "
            "safetensors with the tool that wrote it"
        )
    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise FormatError(f"{path} is not a readable safetensors file: {' '.join(str(e).split())}") from None


def read_npz(path: Path) -> dict[str, Tensor]:
    """The arrays of an .npz file as fp32 tensors; object arrays are refused (allow_pickle=False)."""
    if not path.is_file():
        raise FormatError(f"{path} does not exist")
    if not zipfile.is_zipfile(path):
        what = "a pickle" if looks_pickled(path) else "not a zip archive"
        raise FormatError(f"{path} is {what}, not an .npz archive of arrays; it is not unpickled")
    with zipfile.ZipFile(path) as z:
        other = [n for n in z.namelist() if not n.endswith(".npy")]
    if other:
        raise FormatError(
            f"{path} holds {other[0]!r}, which is not an array (a torch.save archive?); not read"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(np.asarray(data[k], dtype=np.float32)) for k in data.files}
    except (ValueError, TypeError) as e:
        raise FormatError(f"{path}: {e} (object arrays are not read: they would be unpickled)") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise FormatError(f"{path} is not a readable .npz file: {e}") from None


def read_torch_weights(path: Path) -> dict[str, Tensor]:
    """A torch.save'd state dict read with `torch.load(weights_only=True)`: tensors and plain values only, no
    arbitrary object is rebuilt; a file that needs one is refused."""
    if not path.is_file():
        raise FormatError(f"{path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refusals are UnpicklingError; damaged archives are RuntimeError
        first = " ".join(str(e).split())[:200]
        raise FormatError(
            f"{path} is not a state dict torch.load(weights_only=True) can read (nothing is unpickled): {first}"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise FormatError(f"{path} does not hold a state dict of tensors")
    return {str(k): v for k, v in state.items()}


def read_json_file(path: Path) -> dict[str, Any]:
    import json

    if not path.is_file():
        raise FormatError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path} does not hold a JSON object")
    return data


def take(state: Mapping[str, Tensor], key: str, shape: tuple[int, ...], where: Path | str) -> Tensor:
    """`state[key]` as fp32, checked to have `shape`; FormatError naming the key (and the keys there are) or the
    two shapes."""
    if key not in state:
        have = ", ".join(sorted(state)) or "none"
        raise FormatError(f"{where} has no tensor {key!r} (it has: {have})")
    t = state[key].float()
    if tuple(t.shape) != tuple(shape):
        raise FormatError(f"tensor {key!r} in {where} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    return t


def dims(state: Mapping[str, Tensor], key: str, ndim: int, where: Path | str) -> tuple[int, ...]:
    """The shape of `state[key]`, which must have `ndim` dimensions (the sizes every other check uses)."""
    if key not in state:
        have = ", ".join(sorted(state)) or "none"
        raise FormatError(f"{where} has no tensor {key!r} (it has: {have})")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise FormatError(f"tensor {key!r} in {where} has shape {shape}; expected {ndim} dimensions")
    return shape


def unexpected(state: Mapping[str, Tensor], known: set[str], where: Path | str, what: str) -> None:
    """FormatError naming the tensors a `what` layout does not have (the file is of another kind)."""
    extra = sorted(set(state) - known)
    if extra:
        raise FormatError(f"{where} holds tensor(s) {', '.join(extra)} that a {what} does not have")


def build_sae(
    variant: str, d_in: int, d_sae: int, l0_target: float, params: Mapping[str, Tensor], **options: Any
) -> SAE:
    """One of our variants (the registry's class, options checked by it) with `params` over its initial state
    dict (bookkeeping buffers `params` lacks, e.g. a threshold's update count, keep their initial values)."""
    cfg = SAEConfig(variant=variant, d_in=d_in, d_sae=d_sae, l0_target=float(l0_target), options=options)
    sae = get_variant(variant)(cfg)
    state = {**sae.state_dict(), **{k: v.detach().float() for k, v in params.items()}}
    bad = non_finite(state)
    if bad is not None:
        raise FormatError(f"tensor {bad} is NaN/Inf; the file is damaged")
    sae.load_state_dict(state, strict=True)
    return sae.eval()


@contextmanager
def whole_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; on success it replaces `out` (a folder that existed is
    removed only with `overwrite`); on any failure it is removed and `out` is left as it was."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FormatError(f"{out} already exists; pass --overwrite to replace it, or choose another OUT")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        with suppress(OSError):
            shutil.rmtree(tmp)
        raise


def one_of(value: str, allowed: tuple[str, ...], what: str) -> str:
    """`value`, or FormatError naming the values there are."""
    if value not in allowed:
        raise FormatError(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")
    return value
