"""Gemma Scope `params.npz` (arXiv 2408.05147): a JumpReLU SAE as five arrays and nothing else.

`W_enc [d_model, d_sae]`, `W_dec [d_sae, d_model]`, `b_enc [d_sae]`, `b_dec [d_model]`, `threshold [d_sae]`;
encode: pre = x W_enc + b_enc, f = ReLU(pre) * 1[pre > threshold] (no b_dec subtracted from the input);
decode: f W_dec + b_dec. That is our `jumprelu` with theta = max(threshold, 0). The file names no layer, site or
model (they are in the release's folder names): `--layer` and `--site` are required.
"""

from __future__ import annotations

from pathlib import Path

from . import common as C
from .meta import imported_training, resolve_place

KEYS = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}


def import_gemmascope(
    src: Path, out: Path, *, layer: int | None = None, site: str | None = None, model: str | None = None,
    l0_target: float | None = None, overwrite: bool = False,
) -> Path:  # fmt: skip
    """Read a Gemma Scope `params.npz` (or the folder holding one) into our run folder `out`."""
    from ..io import save_sae

    src = Path(src)
    path = src / "params.npz" if src.is_dir() else src
    state = C.read_npz(path)
    d_model, d_sae = C.dims(state, "W_enc", 2, path)
    C.unexpected(state, KEYS, path, "Gemma Scope params.npz")
    params = {
        "W_enc_FD": C.take(state, "W_enc", (d_model, d_sae), path).T.contiguous(),
        "W_dec_FD": C.take(state, "W_dec", (d_sae, d_model), path),
        "b_enc_F": C.take(state, "b_enc", (d_sae,), path),
        "b_dec_D": C.take(state, "b_dec", (d_model,), path),
        "theta_F": C.take(state, "threshold", (d_sae,), path).clamp_min(0.0),
    }
    where = resolve_place(None, layer, site, path, "params.npz holds weights only")
    sae = C.build_sae("jumprelu", d_model, d_sae, l0_target or 0.0, params)
    training = imported_training("gemmascope", path, *where, model)
    with C.whole_folder(out, overwrite) as tmp:
        save_sae(tmp, sae, training)
    return Path(out)
