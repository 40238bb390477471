"""dictionary_learning (saprmarks/dictionary_learning) checkpoints: `ae.pt` (a torch.save'd state dict, read with
`torch.load(weights_only=True)`: tensors only, nothing unpickled) + `config.json` ({"trainer": {"dict_class",
"activation_dim", "dict_size", "k", "layer", "lm_name", "submodule_name", ...}, "buffer": {...}}).

Key sets (nn.Linear weights are [out, in]: `encoder.weight [F, D]`, `decoder.weight [D, F]`):

| dict_class          | tensors                                                             | ours      |
|---------------------|---------------------------------------------------------------------|-----------|
| AutoEncoder         | encoder.weight, encoder.bias, decoder.weight, bias                  | relu      |
| GatedAutoEncoder    | encoder.weight, decoder.weight, decoder_bias, gate_bias, mag_bias,  | gated     |
|                     | r_mag                                                               |           |
| JumpReluAutoEncoder | W_enc [D, F], b_enc, W_dec [F, D], b_dec, threshold                 | jumprelu  |
| AutoEncoderTopK     | encoder.weight, encoder.bias, decoder.weight, b_dec, k, threshold   | topk      |
| BatchTopKSAE        | encoder.weight, encoder.bias, decoder.weight, b_dec, k, threshold   | batchtopk |

Rules: AutoEncoder f = ReLU(W (x - bias) + b), x_hat = f W_dec + bias (our b_enc = b - W bias); Gated: the paper's
(ours); JumpRelu: f = ReLU(pre * 1[pre > threshold]), pre = x W_enc + b_enc; TopK: top-k of ReLU(W (x - b_dec) + b)
(`k` from the tensor); BatchTopK at inference: ReLU(W (x - b_dec) + b) * 1[. > threshold] (threshold -1, never
set: 0). The two top-k classes share their keys; config.json's dict_class tells them apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from . import common as C
from .meta import imported_training, resolve_place

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
LINEAR = {"encoder.weight", "encoder.bias", "decoder.weight"}
KEY_SETS: dict[str, set[str]] = {
    "AutoEncoder": LINEAR | {"bias"},
    "GatedAutoEncoder": {
        "encoder.weight",
        "decoder.weight",
        "decoder_bias",
        "gate_bias",
        "mag_bias",
        "r_mag",
    },
    "JumpReluAutoEncoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "AutoEncoderTopK": LINEAR | {"b_dec", "k", "threshold"},
    "BatchTopKSAE": LINEAR | {"b_dec", "k", "threshold"},
}


def _dict_class(state: dict[str, Tensor], trainer: dict[str, Any], path: Path) -> str:
    """The dict_class config.json names, else the one class whose key set the file has."""
    named = trainer.get("dict_class")
    if named is not None:
        C.one_of(str(named), tuple(KEY_SETS), "dict_class")
        missing = sorted(KEY_SETS[named] - set(state))
        if missing:
            raise C.FormatError(f"{path} has no tensor {missing[0]!r}, which a {named} state dict holds")
        C.unexpected(state, KEY_SETS[named], path, named)
        return str(named)
    fits = [name for name, keys in KEY_SETS.items() if keys == set(state)]
    if len(fits) != 1:
        what = " and ".join(fits) if fits else "no dictionary_learning class"
        raise C.FormatError(
            f"{path}: its keys ({', '.join(sorted(state))}) fit {what}; put its config.json (with "
            "trainer.dict_class) beside it"
        )
    return fits[0]


def _params(cls: str, state: dict[str, Tensor], path: Path) -> tuple[str, int, int, dict[str, Tensor], dict]:
    """(variant, d_in, d_sae, our state dict, extra: k and the variant's options)."""
    if cls == "JumpReluAutoEncoder":
        d, f = C.dims(state, "W_enc", 2, path)
        return "jumprelu", d, f, {
            "W_enc_FD": C.take(state, "W_enc", (d, f), path).T.contiguous(),
            "b_enc_F": C.take(state, "b_enc", (f,), path),
            "W_dec_FD": C.take(state, "W_dec", (f, d), path),
            "b_dec_D": C.take(state, "b_dec", (d,), path),
            "theta_F": C.take(state, "threshold", (f,), path).clamp_min(0.0),
        }, {}  # fmt: skip
    f, d = C.dims(state, "encoder.weight", 2, path)
    W = C.take(state, "encoder.weight", (f, d), path)
    W_dec = C.take(state, "decoder.weight", (d, f), path).T.contiguous()
    if cls == "GatedAutoEncoder":
        return "gated", d, f, {
            "W_enc_FD": W, "W_dec_FD": W_dec, "b_dec_D": C.take(state, "decoder_bias", (d,), path),
            "b_enc_F": C.take(state, "gate_bias", (f,), path), "r_mag_F": C.take(state, "r_mag", (f,), path),
            "b_mag_F": C.take(state, "mag_bias", (f,), path),
        }, {}  # fmt: skip
    b = C.take(state, "encoder.bias", (f,), path)
    if cls == "AutoEncoder":
        bias = C.take(state, "bias", (d,), path)
        return "relu", d, f, {"W_enc_FD": W, "b_enc_F": b - W @ bias, "W_dec_FD": W_dec, "b_dec_D": bias}, {}
    k = int(C.take(state, "k", (), path).item())
    if not 1 <= k <= f:
        raise C.FormatError(f"tensor 'k' in {path} is {k}; it must be in 1..{f} (dict_size)")
    params = {"W_enc_FD": W, "b_enc_F": b, "W_dec_FD": W_dec, "b_dec_D": C.take(state, "b_dec", (d,), path)}
    if cls == "AutoEncoderTopK":
        return "topk", d, f, params, {"k": k, "decoder_norm": "unit"}  # the weights as they are
    threshold = C.take(state, "threshold", (), path).clamp_min(0.0)
    return "batchtopk", d, f, {**params, "threshold": threshold}, {"k": k}


def import_dictionary_learning(
    src: Path, out: Path, *, layer: int | None = None, site: str | None = None, model: str | None = None,
    l0_target: float | None = None, overwrite: bool = False,
) -> Path:  # fmt: skip
    """Read a dictionary_learning `ae.pt` (or the folder holding it and its config.json) into `out`."""
    from ..io import save_sae

    src = Path(src)
    path = src / WEIGHTS_FILE if src.is_dir() else src
    config_path = path.parent / CONFIG_FILE
    config = C.read_json_file(config_path) if config_path.is_file() else {}
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    state = C.read_torch_weights(path)
    cls = _dict_class(state, trainer, path)
    variant, d_in, d_sae, params, extra = _params(cls, state, path)
    for key, size in (("activation_dim", d_in), ("dict_size", d_sae)):
        if trainer.get(key) not in (None, size):
            raise C.FormatError(f"{config_path} says {key} {trainer[key]} but {path} has {size}")
    # dictionary_learning names a submodule, not a site: config.json's layer is taken, the site must be given
    if layer is None and isinstance(trainer.get("layer"), int):
        layer = trainer["layer"]
    where = resolve_place(None, layer, site, path, "config.json names no site")
    target = l0_target or extra.pop("k", 0.0)
    sae = C.build_sae(variant, d_in, d_sae, target, params, **extra)
    info = {"dict_class": cls, "submodule_name": trainer.get("submodule_name")}
    training = imported_training("dictionary_learning", path, *where, model or trainer.get("lm_name"), info)
    with C.whole_folder(out, overwrite) as tmp:
        save_sae(tmp, sae, training)
    return Path(out)
