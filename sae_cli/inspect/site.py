"""`sae inspect` end to end: which SAEs (a run folder, or every member of a sweep folder), which tokens (the run's
held-out range, or the whole store), the shared pass per (layer, site), what is read from the weights and the
tokenizer, and the files written: per SAE `inspect.json` (what was inspected, timings), `inspect.safetensors`
(the pass and the weight-side results, so that `--latent N` can show one latent without a second pass) and the
HTML site (html.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actcache.store import Store

from .. import io
from ..data import DataError, run_identity
from ..evaluate import held_out_range
from ..sweep_config import MEMBERS_DIR, SWEEP_FILE
from .html import write_site, write_sweep_index
from .lens import Lens, decoder_neighbours, final_norm_and_unembedding, logit_lens, token_texts
from .report import Inspected, ids_shown, index_row, latent_record
from .scan import LatentScan, ScanConfig, scan

log = logging.getLogger(__name__)

META_FILE = "inspect.json"
TENSORS_FILE = "inspect.safetensors"
LENS_KEYS = ("promoted_ids_FK", "promoted_FK", "suppressed_ids_FK", "suppressed_FK")
Progress = Callable[[str, int, int], None]


@dataclass
class Target:
    """One SAE to inspect."""

    folder: Path
    name: str
    """'' for a run folder (written at the top of --out), the member name in a sweep."""
    training: dict[str, Any]

    @property
    def key(self) -> tuple[int, str]:
        return int(self.training["layer"]), str(self.training["site"])


def targets(run: Path) -> list[Target]:
    """The run folder's SAE, or every trained member of a sweep folder."""
    if (run / SWEEP_FILE).is_file():
        members = sorted(p.parent for p in (run / MEMBERS_DIR).glob(f"*/{io.CFG_FILE}"))
        if not members:
            raise DataError(f"sweep {run} has no trained member yet (no {MEMBERS_DIR}/*/{io.CFG_FILE})")
        return [Target(m, m.name, io.read_cfg(m).get("training", {})) for m in members]
    return [Target(run, "", io.read_cfg(run).get("training", {}))]


def token_range(t: Target, store: Store, all_tokens: bool, other_store: bool = False) -> tuple[int, int]:
    """The run's held-out range, or (all_tokens) every committed token; DataError when the store is not the one
    the SAE was trained on (as `sae eval`). `other_store`: another store of the SAE's model, all of it (as `sae
    eval --other-store`)."""
    if "layer" not in t.training or "site" not in t.training:
        raise DataError(
            f"{t.folder / io.CFG_FILE} records no layer and site; cannot tell which activations to read"
        )
    if other_store:
        return held_out_range(t.training, store, 0, other_store=True)
    if all_tokens:
        run_identity(store, (), t.training, "this SAE")
        return 0, store.committed_tokens
    if "eval_range" not in t.training and "imported" not in t.training:  # imported: the store's default split
        raise DataError(
            f"{t.folder} records no held-out range; pass --all to inspect every token of the store"
        )
    return held_out_range(t.training, store, 0)


class Weights:
    """The store model's tokenizer (loaded at once) and its final norm and unembedding (loaded at the first
    `lens`), once per command; neither without `with_model`."""

    def __init__(self, store: Store, with_model: bool, device: str) -> None:
        from .lens import load_tokenizer

        self.spec, self.with_model, self.device = store.spec, with_model, device
        self.tokenizer = load_tokenizer(store.spec) if with_model else None
        self._head: tuple[torch.nn.Module, torch.Tensor] | None = None
        self.load_s = 0.0
        """Seconds spent loading the model's weights (once, at the first `lens`)."""

    def lens(self, W_dec_FD: torch.Tensor) -> Lens | None:
        """The logit lens of these decoder rows (None without the model)."""
        if not self.with_model:
            return None
        if self._head is None:
            from actcache.models import load_store_model

            t0 = time.perf_counter()
            self._head = final_norm_and_unembedding(load_store_model(self.spec, self.device), self.spec)
            self.load_s = time.perf_counter() - t0
        return logit_lens(W_dec_FD, *self._head)


def out_dir(out: Path, t: Target) -> Path:
    return out / t.name if t.name else out


def inspect(
    run: Path,
    store: Store,
    out: Path,
    *,
    all_tokens: bool = False,
    other_store: bool = False,
    cfg: ScanConfig = ScanConfig(),
    device: str = "cpu",
    with_model: bool = True,
    progress: Progress | None = None,
    weights: Weights | None = None,
) -> list[Path]:
    """Inspect the SAE in `run` (or every member of a sweep: members of one (layer, site) share one pass) on
    `store`; write each one's site under `out`; returns the index pages written. `weights`: the store model's,
    already loaded (default: loaded here when `with_model`)."""
    report = progress or (lambda stage, done, total: None)
    todo = targets(Path(run))
    groups: dict[tuple, list[Target]] = {}
    loaded: dict[Path, Any] = {}
    for t in todo:  # every check before the first pass: a bad member writes nothing
        rng = token_range(t, store, all_tokens, other_store)
        groups.setdefault((t.key, rng, bool(t.training.get("drop_bos", True))), []).append(t)
        loaded[t.folder] = io.load_sae(t.folder, device)
        if loaded[t.folder].cfg.d_in != store.d_model:
            raise DataError(
                f"{t.folder} reads d_in {loaded[t.folder].cfg.d_in} but {store.path} holds d_model {store.d_model}"
            )
    weights = weights or Weights(store, with_model, device)
    pages = []
    for (key, rng, drop_bos), group in groups.items():
        saes = [loaded[t.folder] for t in group]
        t0 = time.perf_counter()
        scans = scan(
            store, key, rng, [s.encode for s in saes], [s.cfg.d_sae for s in saes], cfg, drop_bos=drop_bos,
            device=device, progress=lambda done, total: report("pass", done, total),
        )  # fmt: skip
        scan_s = time.perf_counter() - t0
        for t, sae, s in zip(group, saes, scans, strict=True):
            meta = {
                "run": str(t.folder), "store": str(store.path), "layer": key[0], "site": key[1],
                "variant": sae.cfg.variant, "d_sae": sae.cfg.d_sae, "token_range": list(rng),
                "tokens": s.tokens, "scan": cfg.to_dict(), "scan_s": scan_s, "shared_with": len(group),
                "tokens_per_s": (rng[1] - rng[0]) / scan_s,
            }  # fmt: skip
            pages.append(write_one(out_dir(out, t), sae, s.to("cpu"), meta, weights, report))
    if len(todo) > 1:
        pages.append(write_sweep_index(out, [(t.name, f"L{t.key[0]} {t.key[1]}") for t in todo]))
    return pages


def write_one(
    folder: Path, sae: Any, s: LatentScan, meta: dict[str, Any], weights: Weights, report: Progress
) -> Path:
    """The weight-side results of one SAE, its files and its site."""
    t0 = time.perf_counter()
    W_dec_FD = sae.W_dec_FD.detach()
    loaded = weights.load_s
    lens = weights.lens(W_dec_FD)
    neighbours = decoder_neighbours(W_dec_FD)
    meta["model_load_s"] = weights.load_s - loaded  # 0 after the first SAE of a command
    meta["weights_s"] = time.perf_counter() - t0 - meta["model_load_s"]
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {**s.state(), "neighbour_ids_FK": neighbours[0], "neighbour_cos_FK": neighbours[1]}
    if lens is not None:
        tensors.update({k: getattr(lens, k) for k in LENS_KEYS})
    io.write_tensors_atomic(folder / TENSORS_FILE, tensors)
    x = inspected(meta, s, lens, neighbours, weights.tokenizer)
    t0 = time.perf_counter()

    def records():
        for f in range(s.d_sae):
            report("pages", f + 1, s.d_sae)
            yield latent_record(x, f)

    index = write_site(folder, records(), s.d_sae, x.title, meta, index_row)
    meta["render_s"] = time.perf_counter() - t0
    io.write_json_atomic(folder / META_FILE, meta)
    return index


def title(meta: dict[str, Any]) -> str:
    lo, hi = meta["token_range"]
    return (
        f"{meta['variant']} L{meta['layer']} {meta['site']} d_sae {meta['d_sae']} ({meta['run']}) on "
        f"{meta['store']} tokens {lo:,}-{hi:,}"
    )


def inspected(
    meta: dict[str, Any], s: LatentScan, lens: Lens | None, neighbours: tuple, tokenizer: Any
) -> Inspected:
    return Inspected(title(meta), s, token_texts(tokenizer, ids_shown(s, lens).tolist()), lens, neighbours)


def load_inspected(folder: Path, run: Path, token_range: tuple[int, int], tokenizer: Any) -> Inspected | None:
    """The pass `inspect` saved in `folder`, if it is of the SAE in `run` on `token_range` (else None)."""
    if not (folder / META_FILE).is_file() or not (folder / TENSORS_FILE).is_file():
        return None
    meta = io.read_json(folder / META_FILE)
    if Path(meta.get("run", "")).resolve() != run.resolve() or list(meta.get("token_range", [])) != list(
        token_range
    ):
        return None
    tensors = io.read_tensors(folder / TENSORS_FILE)
    s = LatentScan.from_state(tensors, ScanConfig(**meta["scan"]))
    lens = Lens(*(tensors[k] for k in LENS_KEYS)) if LENS_KEYS[0] in tensors else None
    return inspected(meta, s, lens, (tensors["neighbour_ids_FK"], tensors["neighbour_cos_FK"]), tokenizer)


def inspect_latent(
    run: Path,
    store: Store,
    latent: int,
    out: Path | None = None,
    *,
    all_tokens: bool = False,
    other_store: bool = False,
    cfg: ScanConfig = ScanConfig(),
    device: str = "cpu",
    with_model: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The record of one latent of the SAE in `run` (a run folder, not a sweep): from the pass saved in `out` when
    it is of this SAE and range, else from a new pass (written to `out` with the site when `out` is given)."""
    (t,) = _single(Path(run))
    rng = token_range(t, store, all_tokens, other_store)
    d_sae = int(io.read_cfg(t.folder)["sae"]["d_sae"])
    if not 0 <= latent < d_sae:  # before any pass over the store
        raise DataError(f"--latent {latent} is outside the SAE's {d_sae} latents (0-{d_sae - 1})")
    weights = Weights(store, with_model, device)
    x = load_inspected(out, Path(run), rng, weights.tokenizer) if out is not None else None
    if x is None and out is not None:
        inspect(
            run, store, out, all_tokens=all_tokens, other_store=other_store, cfg=cfg, device=device,
            progress=progress, weights=weights,
        )  # fmt: skip
        x = load_inspected(out, Path(run), rng, weights.tokenizer)
    if x is None:  # no --out: the pass in memory
        sae = io.load_sae(t.folder, device)
        report = progress or (lambda stage, done, total: None)
        (s,) = scan(
            store, t.key, rng, [sae.encode], [sae.cfg.d_sae], cfg, drop_bos=bool(t.training.get("drop_bos", True)),
            device=device, progress=lambda done, total: report("pass", done, total),
        )  # fmt: skip
        W = sae.W_dec_FD.detach()
        meta = {"run": str(run), "store": str(store.path), "layer": t.key[0], "site": t.key[1], "variant":
                sae.cfg.variant, "d_sae": sae.cfg.d_sae, "token_range": list(rng)}  # fmt: skip
        x = inspected(meta, s.to("cpu"), weights.lens(W), decoder_neighbours(W), weights.tokenizer)
    return {**latent_record(x, latent), "title": x.title}


def _single(run: Path) -> list[Target]:
    todo = targets(run)
    if len(todo) > 1:
        raise DataError(
            f"{run} is a sweep; pass one member folder ({run / MEMBERS_DIR}/<name>) with --latent"
        )
    return todo
