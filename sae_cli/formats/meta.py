"""Where an SAE reads its activations, in the names other tools use, and the record an imported SAE carries.

- `hf_hook_name(layers_path, arch, layer, site)`: the module whose forward OUTPUT is the site (what SAELens's
  HookedProxyLM and sparsify hook): `model.layers.15` for resid_post 15, `model.layers.14` for resid_pre 15,
  `model.layers.15.mlp` for mlp_out; None where no module's output is the site (resid_pre 0).
- `tl_hook_name(layer, site)`: TransformerLens's `blocks.{L}.hook_{site}` (TL applies Gemma-2's post-norms before
  hook_attn_out / hook_mlp_out, as our sites do).
- `parse_hook_name(name)`: (layer, site) back from either kind of name (or sparsify's folder name `layers.15`).
- `run_metadata(cfg)`: what an export says about a run of ours (model, hook names, context, corpus, BOS).
- `imported_training(...)`: the `training` record of an imported SAE's cfg.json (`imported` marks it; `sae eval`
  then holds out the store's default last windows, as no training range exists).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from actcache.sites import SITES, ArchSites

from .common import FormatError

log = logging.getLogger(__name__)

LLAMA_LIKE = ArchSites(layers=("model.layers",), attn_out="self_attn", mlp_out="mlp")
"""The module paths assumed when the store (and so its model's architecture) cannot be opened."""

_TL = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$")
_HF = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.([A-Za-z_]+))?$")
_HF_SUB = {
    "self_attn": "attn_out", "attn": "attn_out", "attention": "attn_out", "post_attention_layernorm": "attn_out",
    "mlp": "mlp_out", "post_feedforward_layernorm": "mlp_out",
}  # fmt: skip


def tl_hook_name(layer: int, site: str) -> str:
    return f"blocks.{layer}.hook_{site}"


def hf_hook_name(arch: ArchSites, layer: int, site: str) -> str | None:
    """The dotted path of the module whose output is `site` of `layer` (the first candidate block list)."""
    blocks = arch.layers[0]
    if site == "resid_post":
        return f"{blocks}.{layer}"
    if site == "resid_pre":
        return f"{blocks}.{layer - 1}" if layer > 0 else None
    sub = arch.attn_out if site == "attn_out" else arch.mlp_out
    return f"{blocks}.{layer}.{sub}" if sub else None


def parse_hook_name(name: str | None) -> tuple[int, str] | None:
    """(layer, site) of a TransformerLens hook name or an HF module path (output of block L = resid_post L);
    None when the name says neither."""
    if not name:
        return None
    found = _TL.match(name)
    if found:
        return int(found.group(1)), found.group(2)
    found = _HF.search(name)
    if found is None:
        return None
    layer, sub = int(found.group(1)), found.group(2)
    if sub is None:
        return layer, "resid_post"
    site = _HF_SUB.get(sub)
    return (layer, site) if site else None


def _store_facts(training: dict[str, Any]) -> tuple[ArchSites, bool | None]:
    """(module paths, prepend_bos) of the run's store when it can be opened, else the Llama-like paths and None."""
    from actcache.models import store_arch
    from actcache.store import Store

    path = (training.get("store_identity") or {}).get("path") or training.get("store")
    try:
        spec = Store.open(path).spec
    except Exception as e:  # the store moved or is gone: the export still works, with the default paths
        log.warning("cannot open the run's store %s (%s); assuming Llama-like module paths", path, e)
        return LLAMA_LIKE, None
    packing = (spec.harvest_config or {}).get("packing") or {}
    bos = packing.get("bos_id") is not None if "bos_id" in packing else None
    try:
        return store_arch(spec), bos
    except Exception as e:  # the model's config cannot be read offline
        log.warning(
            "cannot read the architecture of %s (%s); assuming Llama-like module paths", spec.model, e
        )
        return LLAMA_LIKE, bos


def run_metadata(cfg: dict[str, Any], hook_name: str | None = None) -> dict[str, Any]:
    """What other tools want to know about where the SAE of our run folder reads (SAELens metadata keys)."""
    training = cfg.get("training") or {}
    if "layer" not in training or "site" not in training:
        raise FormatError("the run records no layer and site; it cannot say where it reads its activations")
    layer, site = int(training["layer"]), str(training["site"])
    identity = training.get("store_identity") or {}
    arch, bos = _store_facts(training)
    hf = hook_name or hf_hook_name(arch, layer, site)
    return {
        "model_name": training.get("store_model") or identity.get("model") or training.get("source_model"),
        "hook_name": hf or tl_hook_name(layer, site),
        "hook_name_transformer_lens": tl_hook_name(layer, site),
        "hook_head_index": None,
        "context_size": identity.get("context"),
        "prepend_bos": True if bos is None else bos,
        "dataset_path": identity.get("corpus"),
        "layer": layer,
        "site": site,
        "model_revision": identity.get("revision"),
        "trained_without_bos_tokens": bool(training.get("drop_bos", True)),
    }


def resolve_place(
    found: tuple[int, str] | None, layer: int | None, site: str | None, source: Path, how: str
) -> tuple[int, str]:
    """(layer, site): the flags win over what the source says; FormatError when neither gives both."""
    layer = layer if layer is not None else (found[0] if found else None)
    site = site or (found[1] if found else None)
    if layer is None or site is None:
        raise FormatError(
            f"{source} does not say which layer and site it reads ({how}); pass --layer L --site SITE"
        )
    if site not in SITES:
        raise FormatError(f"unknown site {site!r}; choose one of: {', '.join(SITES)}")
    if layer < 0:
        raise FormatError(f"--layer must be >= 0, got {layer}")
    return int(layer), site


def imported_training(
    fmt: str, source: Path, layer: int, site: str, model: str | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The `training` record of an imported SAE (no training ranges: `sae eval` holds out the store's last
    windows)."""
    return {
        "imported": {"format": fmt, "source": str(Path(source).resolve()), **(extra or {})},
        "layer": layer,
        "site": site,
        "source_model": model,
        "drop_bos": True,
        "input_scale_folded": 1.0,
    }
