"""SAELens v6 folders (`SAE.load_from_disk`): `cfg.json` + `sae_weights.safetensors` (+ `sparsity.safetensors`,
the log10 firing frequency per latent).

Layout: `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc`, `b_dec`; SAELens's `encode` subtracts `b_dec` from
the input first when `apply_b_dec_to_input`. Architectures (docs/formats.md has the whole mapping):

| ours                                              | SAELens    | apply_b_dec_to_input | extra                     |
|---------------------------------------------------|------------|----------------------|---------------------------|
| relu                                              | standard   | false                |                           |
| gated                                             | gated      | true                 | b_gate, r_mag, b_mag      |
| jumprelu                                          | jumprelu   | false                | threshold                 |
| topk                                              | topk       | true                 | k, rescale_acts_by_...    |
| batchtopk, matryoshka, mutual-choice, feature-ch. | jumprelu   | true                 | threshold: the inference  |
|                                                   |            |                      | threshold (per latent)    |

The class of the SAE (sae_cli/variants) decides the row, so a subclass of BatchTopK exports as BatchTopK does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import load_densities, load_sae, read_cfg, write_json_atomic, write_tensors_atomic
from ..variants.base import SAE
from ..variants.batchtopk import BatchTopKSAE
from ..variants.gated import GatedSAE
from ..variants.jumprelu import JumpReLUSAE
from ..variants.relu import ReLUSAE
from ..variants.topk import TopKSAE
from . import common as C
from .meta import imported_training, parse_hook_name, resolve_place, run_metadata

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
FORMAT_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: SAELens reads configs without one as pre-6.0 and renames their keys."""
LOG_EPS = 1e-10
"""log10(frequency + eps), as SAELens writes sparsity.safetensors."""
ARCHITECTURES = ("standard", "gated", "jumprelu", "topk")

log = logging.getLogger("sae_cli.formats")


# ---- export ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def saelens_state(sae: SAE) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
    """(architecture, SAELens state dict, architecture fields of cfg.json) computing what `sae.encode` and
    `sae.decode` compute; FormatError for a variant SAELens has no form for."""
    W_enc, b_enc = sae.W_enc_FD.T.float(), sae.b_enc_F.float()
    base = {"W_enc": W_enc, "W_dec": sae.W_dec_FD.float(), "b_dec": sae.b_dec_D.float()}
    # BatchTopK, Matryoshka, the choice rules (subclasses): pre * 1[pre > theta], theta >= 0
    if isinstance(sae, BatchTopKSAE):
        theta = sae.threshold.float().clamp_min(0.0).expand(sae.cfg.d_sae)
        return "jumprelu", {**base, "b_enc": b_enc, "threshold": theta}, {"apply_b_dec_to_input": True}
    if isinstance(sae, TopKSAE):
        extra = {"k": int(sae.k), "rescale_acts_by_decoder_norm": not sae.unit_norm_decoder}
        return "topk", {**base, "b_enc": b_enc}, {"apply_b_dec_to_input": True, **extra}
    if isinstance(sae, JumpReLUSAE):
        theta = sae.theta_F.float().clamp_min(0.0)
        return "jumprelu", {**base, "b_enc": b_enc, "threshold": theta}, {"apply_b_dec_to_input": False}
    if isinstance(sae, GatedSAE):
        gated = {"b_gate": b_enc, "r_mag": sae.r_mag_F.float(), "b_mag": sae.b_mag_F.float()}
        return "gated", {**base, **gated}, {"apply_b_dec_to_input": True}
    if isinstance(sae, ReLUSAE):
        return "standard", {**base, "b_enc": b_enc}, {"apply_b_dec_to_input": False}
    raise C.FormatError(
        f"variant {sae.cfg.variant!r} has no SAELens form: its inference rule is none of standard, gated, "
        "jumprelu or topk"
    )


def export_saelens(run: Path, out: Path, *, overwrite: bool = False, hook_name: str | None = None) -> Path:
    """Write the SAE of run folder `run` as a SAELens v6 folder `out` (whole or not at all)."""
    run, out = Path(run), Path(out)
    cfg = read_cfg(run)
    sae = load_sae(run)
    arch, state, extra = saelens_state(sae)
    cfg_json = {
        "architecture": arch,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        **extra,
        "normalize_activations": "none",  # the input scale is folded into the weights (io.save_sae)
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": FORMAT_VERSION,
            "sae_lens_training_version": None,
            **run_metadata(cfg, hook_name),
            "exported_by": "sae_cli",
            "variant": sae.cfg.variant,
            "l0_target": sae.cfg.l0_target,
            # SAELens has no out-of-range rule: recorded here, not applied by sae_lens (docs/formats.md)
            **({"passthrough_norm": sae.cfg.passthrough_norm} if sae.cfg.passthrough_norm else {}),
        },
    }
    if sae.cfg.passthrough_norm:
        log.warning(
            "%s passes tokens with norm above %.4g through unchanged (trained with --max-norm-ratio); SAELens has no "
            "such rule: the exported SAE encodes them as any other token",
            run,
            sae.cfg.passthrough_norm,
        )
    freq_F = load_densities(run)
    with C.whole_folder(out, overwrite) as tmp:
        write_tensors_atomic(tmp / WEIGHTS_FILE, {k: v.contiguous() for k, v in state.items()})
        if freq_F is not None:
            write_tensors_atomic(tmp / SPARSITY_FILE, {"sparsity": torch.log10(freq_F.float() + LOG_EPS)})
        write_json_atomic(tmp / CFG_FILE, cfg_json)
    return out


# ---- import ----------------------------------------------------------------------------------------------------
def _dim(cfg: dict[str, Any], key: str, where: Path) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise C.FormatError(f"{where} has no positive integer {key!r} (got {value!r})")
    return value


def _pre6(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """A config written before SAELens 6 (no sae_lens_version): its activation function, not its architecture,
    says top-k ("standard" + activation_fn "topk" with activation_fn_kwargs.k); any other non-ReLU one is refused."""
    if (cfg.get("metadata") or {}).get("sae_lens_version") or cfg.get("sae_lens_version"):
        return cfg
    act = cfg.get("activation_fn", cfg.get("activation_fn_str")) or "relu"
    if cfg.get("architecture", "standard") != "standard" or act == "relu":
        return cfg
    if act == "topk":
        return {**cfg, "architecture": "topk", "k": (cfg.get("activation_fn_kwargs") or {}).get("k")}
    raise C.FormatError(f"{where}: activation_fn {act!r} of a standard SAE has no form here")


def _check_cfg(cfg: dict[str, Any], where: Path) -> str:
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise C.FormatError(
            f"{where}: unknown architecture {arch!r}; sae import reads {', '.join(ARCHITECTURES)} (SAELens saves "
            "batchtopk and matryoshka SAEs as jumprelu)"
        )
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise C.FormatError(
            f"{where}: normalize_activations {norm!r} is applied at run time and cannot be folded into the weights; "
            "fold it in SAELens first (fold_activation_norm_scaling_factor) or export with 'none'"
        )
    if (cfg.get("reshape_activations") or "none") != "none":
        raise C.FormatError(
            f"{where}: reshape_activations {cfg['reshape_activations']!r} (hook_z) is not supported"
        )
    return str(arch)


def _drop_scaling_factor(state: dict[str, Tensor], where: Path) -> None:
    s = state.pop("scaling_factor", None)
    if s is not None and not torch.allclose(s, torch.ones_like(s)):
        raise C.FormatError(f"{where} holds a finetuning 'scaling_factor' that is not 1; it is not supported")


def _ours(arch: str, cfg: dict[str, Any], state: dict[str, Tensor], where: Path) -> tuple[str, dict, dict]:
    """(variant, our state dict, options) computing SAELens's encode/decode of `arch`."""
    d_in, d_sae = _dim(cfg, "d_in", where.parent / CFG_FILE), _dim(cfg, "d_sae", where.parent / CFG_FILE)
    W_enc = C.take(state, "W_enc", (d_in, d_sae), where)
    common = {"W_enc_FD": W_enc.T.contiguous(), "W_dec_FD": C.take(state, "W_dec", (d_sae, d_in), where)}
    b_dec = C.take(state, "b_dec", (d_in,), where)
    shift = b_dec @ W_enc  # x @ W_enc = (x - b_dec) @ W_enc + shift
    apply = bool(cfg.get("apply_b_dec_to_input", True))
    common["b_dec_D"] = b_dec
    if arch == "gated":
        C.unexpected(state, {"W_enc", "W_dec", "b_dec", "b_gate", "r_mag", "b_mag"}, where, "gated SAE")
        r_mag = C.take(state, "r_mag", (d_sae,), where)
        b_gate, b_mag = C.take(state, "b_gate", (d_sae,), where), C.take(state, "b_mag", (d_sae,), where)
        if not apply:  # ours always subtracts b_dec first: move it into the biases
            b_gate, b_mag = b_gate + shift, b_mag + shift * r_mag.exp()
        return "gated", {**common, "b_enc_F": b_gate, "r_mag_F": r_mag, "b_mag_F": b_mag}, {}
    b_enc = C.take(state, "b_enc", (d_sae,), where)
    if arch == "topk":
        C.unexpected(state, {"W_enc", "W_dec", "b_dec", "b_enc"}, where, "topk SAE")
        k = _dim(cfg, "k", where.parent / CFG_FILE)
        if k > d_sae:
            raise C.FormatError(f"{where.parent / CFG_FILE}: k {k} exceeds d_sae {d_sae}")
        free = bool(cfg.get("rescale_acts_by_decoder_norm", False))
        b = b_enc if apply else b_enc + shift
        return "topk", {**common, "b_enc_F": b}, {"decoder_norm": "free" if free else "unit"}
    b = b_enc - shift if apply else b_enc  # ours: W_enc x + b_enc, no b_dec subtraction
    if arch == "jumprelu":
        C.unexpected(state, {"W_enc", "W_dec", "b_dec", "b_enc", "threshold"}, where, "jumprelu SAE")
        # SAELens applies ReLU before the step: a threshold < 0 acts as 0
        theta = C.take(state, "threshold", (d_sae,), where).clamp_min(0.0)
        return "jumprelu", {**common, "b_enc_F": b, "theta_F": theta}, {}
    C.unexpected(state, {"W_enc", "W_dec", "b_dec", "b_enc"}, where, "standard SAE")
    return "relu", {**common, "b_enc_F": b}, {}


def _frequencies(src: Path, d_sae: int) -> Tensor | None:
    path = src / SPARSITY_FILE
    if not path.is_file():
        return None
    log_F = C.take(C.read_safetensors(path), "sparsity", (d_sae,), path)
    return torch.pow(10.0, log_F).sub(LOG_EPS).clamp(0.0, 1.0)


def import_saelens(
    src: Path, out: Path, *, layer: int | None = None, site: str | None = None, model: str | None = None,
    l0_target: float | None = None, overwrite: bool = False,
) -> Path:  # fmt: skip
    """Read SAELens folder `src` into our run folder `out`."""
    from ..io import save_sae

    src = Path(src)
    cfg = _pre6(C.read_json_file(src / CFG_FILE), src / CFG_FILE)
    arch = _check_cfg(cfg, src / CFG_FILE)
    state = C.read_safetensors(src / WEIGHTS_FILE)
    _drop_scaling_factor(state, src / WEIGHTS_FILE)
    variant, params, options = _ours(arch, cfg, state, src / WEIGHTS_FILE)
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    freq_F = _frequencies(src, d_sae)
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    found = (int(meta["layer"]), str(meta["site"])) if "layer" in meta and "site" in meta else None
    where = resolve_place(found or parse_hook_name(hook), layer, site, src, f"hook_name {hook!r}")
    if l0_target is None:
        l0_target = cfg["k"] if arch == "topk" else (float(freq_F.sum()) if freq_F is not None else 0.0)
    sae = C.build_sae(variant, d_in, d_sae, l0_target, params, **options)
    training = imported_training(
        "saelens", src, *where, model or meta.get("model_name"), {"architecture": arch, "hook_name": hook}
    )
    with C.whole_folder(out, overwrite) as tmp:
        save_sae(tmp, sae, training, freq_F)
    return Path(out)
