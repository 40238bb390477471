"""`sae eval`: every metric of a trained SAE on the held-out tokens of its store, and (with the model the store
names) the LM metrics of splicing its reconstruction into the model. Writes eval.json and density.png."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from actcache.store import Store

from . import io
from .by_document import DocumentMetrics
from .config import ConfigError
from .data import DataError, check_keys, indexed_eval_batches, lm_windows, open_store, run_identity, split
from .metrics import ReconstructionMetrics, density_histogram, save_density_png

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
DENSITY_PNG = "density.png"
OTHER_STORE_FIX = (
    "pass that store with --store, or add --other-store to evaluate on all of this one (another text)"
)


def first_windows(token_range: tuple[int, int], tokens: int, context: int) -> tuple[int, int]:
    """The start of `token_range` cut to the whole windows that hold `tokens` tokens (0: all of it)."""
    lo, hi = token_range
    return (lo, min(hi, lo + context * max(1, math.ceil(tokens / context)))) if tokens else (lo, hi)


def same_model(a: Any, b: Any) -> bool:
    """Two model names for the same model: their last path parts, case aside ("HuggingFaceTB/SmolLM2-135M" and
    "smollm2-135m")."""
    return str(a).rsplit("/", 1)[-1].lower() == str(b).rsplit("/", 1)[-1].lower()


def held_out_range(
    training: dict[str, Any], store: Any, tokens: int, other_store: bool = False
) -> tuple[int, int]:
    """The run's held-out range (recorded at training time), cut to `tokens` whole windows when given. An
    imported SAE (sae_cli/formats) has no training range: the store's default held-out windows (its last 10 %).
    `other_store`: `store` holds another text of the SAE's model, none of it trained on: all its tokens (cut to
    `tokens`); DataError when it is the training store itself or another model's."""
    if other_store:
        return other_text_range(training, store, tokens)
    if "imported" in training and "eval_range" not in training:
        source = str(training.get("source_model") or "")
        if source and not same_model(source, store.spec.model):
            log.warning("the SAE was imported for model %r; the store holds %r", source, store.spec.model)
        return first_windows(split(store, 0)[1], tokens, store.spec.context)
    if "eval_range" not in training:
        raise DataError("the run records no held-out range (trained by another tool?); cannot evaluate it")
    lo, hi = (int(v) for v in training["eval_range"])
    run_identity(store, (), training, "this SAE", OTHER_STORE_FIX)
    if training.get("store_model") not in (None, store.spec.model) or hi > store.committed_tokens:
        raise DataError(
            f"{store.path} is not the store this SAE was trained on (model {training.get('store_model')!r}, "
            f"{training.get('store_tokens')} tokens); {OTHER_STORE_FIX}"
        )
    return first_windows((lo, hi), tokens, store.spec.context)


def other_text_range(training: dict[str, Any], store: Any, tokens: int) -> tuple[int, int]:
    """`held_out_range` for another store of the same model: every window from its start (cut to `tokens`), or
    from the end of the tokens `sae calibrate --other-store` calibrated the SAE on, when it was this store."""
    model = training.get("store_model") or training.get("source_model")
    if model and not same_model(model, store.spec.model):
        raise DataError(
            f"{store.path} holds activations of {store.spec.model!r}; the SAE was trained on {model!r}: pass a "
            "store harvested from that model"
        )
    recorded = training.get("store_identity")
    if recorded and store.identity_mismatch(recorded) is None:
        raise DataError(
            f"{store.path} is the store this SAE was trained on; drop --other-store to use the ranges the run "
            "recorded in it"
        )
    start = 0
    recal = training.get("recalibrated") or {}
    identity = recal.get("store_identity")
    if recal.get("other_store") and identity and store.identity_mismatch(identity) is None:
        start = int(recal["range"][1])  # the tokens `sae calibrate` set the thresholds on are not evaluated
        if start >= store.committed_tokens:
            raise DataError(
                f"every token of {store.path} went into the SAE's calibration (`sae calibrate`); evaluate it on "
                "another store, or calibrate it on fewer --tokens"
            )
    return first_windows((start, store.committed_tokens), tokens, store.spec.context)


def check_site(store: Any, key: tuple[int, str], d_in: int) -> None:
    """DataError when the store lacks the SAE's (layer, site) or its width is not the SAE's d_in (an SAE
    imported from another model)."""
    check_keys(store, [key])
    if store.d_model != d_in:
        raise DataError(
            f"the SAE reads d_in={d_in} activations but {store.path} holds d_model={store.d_model} at layer "
            f"{key[0]} {key[1]}; pass a store of the SAE's model with --store"
        )


def check_eval_options(tokens: int = 0, lm_tokens: int = 0, batch_size: int = 1) -> None:
    """ConfigError for a negative --tokens / --lm-tokens (0: all) or a --batch-size below 1."""
    for flag, value in (("--tokens", tokens), ("--lm-tokens", lm_tokens)):
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0 (0: every held-out token), got {value}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")


def evaluate(
    run: str | Path,
    store_path: str | Path | Store | None = None,
    *,
    tokens: int = 0,
    lm_tokens: int = 0,
    with_model: bool = True,
    device: str = "cpu",
    batch_size: int = 4096,
    lm_windows_per_batch: int = 4,
    progress: Callable[[str, int, int], None] | None = None,
    model: Any = None,
    lm: dict[str, Any] | None = None,
    passthrough: bool = True,
    other_store: bool = False,
) -> dict[str, Any]:
    """Evaluate the SAE in `run` (a folder with cfg.json); returns the eval dict (also written to eval.json).
    `tokens`: at most this many held-out tokens for everything (0: all); `lm_tokens`: at most this many of them
    for the LM metrics, which cost three model passes per window (0: as `tokens`). `model`: the store's LM,
    already loaded on `device` (a sweep evaluates many SAEs with one load). `lm`: the LM metrics, already
    computed on `lm_range(...)` of this run (a sweep computes them for all its members at once). `store_path`: the
    store (an open `Store`, or its path; default: the one the run recorded). `passthrough` False: evaluate the SAE
    without its out-of-range rule (cfg.json's passthrough_norm), every token through the SAE. `other_store`: the
    store is another text of the same model (`held_out_range`): evaluate on all of it."""
    check_eval_options(tokens, lm_tokens, batch_size)
    run = Path(run)
    cfg = io.read_cfg(run)
    training = cfg.get("training", {})
    # An open Store is used as is (a sweep evaluates its members on the one it opened); a path is opened here.
    store = (
        store_path if isinstance(store_path, Store) else open_store(store_path or training.get("store", ""))
    )
    key = (int(training["layer"]), str(training["site"]))
    lo, hi = held_out_range(training, store, tokens, other_store)
    sae = io.load_sae(run, device)
    check_site(store, key, sae.cfg.d_in)
    drop_bos = bool(training.get("drop_bos", True))
    report = progress or (lambda stage, done, total: None)

    metrics, documents = reconstruction_metrics(
        sae, store, key, (lo, hi), batch_size, drop_bos, passthrough, report
    )
    result: dict[str, Any] = {
        "run": str(run),
        "store": str(store.path),
        "layer": key[0],
        "site": key[1],
        "variant": sae.cfg.variant,
        "d_sae": sae.cfg.d_sae,
        "l0_target": sae.cfg.l0_target,
        "eval_range": [lo, hi],
        "other_store": other_store,
        "passthrough_norm": sae.cfg.passthrough_norm if passthrough else None,
        **metrics.result(),
    }
    target = sae.cfg.l0_target  # 0: unknown (an imported SAE whose source records none)
    result["l0_error_pct"] = 100.0 * (result["l0"] - target) / target if target > 0 else math.nan
    result.update(documents.result(target))
    freq_F = metrics.freq_F()
    result["density_histogram"] = density_histogram(freq_F)
    save_density_png(freq_F, run / DENSITY_PNG, f"{sae.cfg.variant} L{key[0]} {key[1]} d_sae={sae.cfg.d_sae}")

    def spliced(x: torch.Tensor) -> torch.Tensor:  # the out-of-range rule applies in the splice too
        return sae.reconstruct(x, passthrough)[1]

    if with_model:
        if lm is None:
            lm = lm_metrics(
                [spliced], store, key, first_windows((lo, hi), lm_tokens, store.spec.context), device,
                lm_windows_per_batch, report, model,
            )[0]  # fmt: skip
        result.update(lm)
    io.write_json_atomic(run / EVAL_FILE, io.json_safe(result))  # an undefined metric is null, never NaN
    return result


def reconstruction_metrics(
    sae: Any,
    store: Any,
    key: tuple[int, str],
    token_range: tuple[int, int],
    batch_size: int,
    drop_bos: bool,
    passthrough: bool,
    report: Callable[[str, int, int], None],
) -> tuple[ReconstructionMetrics, DocumentMetrics]:
    """Every reconstruction metric of `sae` over `token_range` of `store`, in all and per document."""
    lo, hi = token_range
    device = sae.W_dec_FD.device
    documents = DocumentMetrics(sae.cfg.d_in, device=device)
    metrics = ReconstructionMetrics(sae.cfg.d_in, sae.cfg.d_sae, device=device, documents=documents)
    doc_ids = torch.from_numpy(store.read("doc_ids", lo, hi))
    done = 0
    with torch.no_grad():
        for x_BD, index_B in indexed_eval_batches(store, key, (lo, hi), batch_size, drop_bos):
            x_BD = x_BD.to(device).float()
            acts_BF, x_hat_BD = sae.reconstruct(x_BD, passthrough)
            passed_B = sae.passed_through(x_BD) if passthrough else None
            metrics.update(x_BD, x_hat_BD, acts_BF, passed_B, doc_B=doc_ids[index_B - lo])
            done += len(x_BD)
            report("reconstruction", done, hi - lo)
    return metrics, documents


def lm_range(run: str | Path, store: Any, tokens: int = 0, lm_tokens: int = 0) -> tuple[int, int]:
    """The token range `evaluate` splices into the model for the SAE in `run` (the first whole windows of its
    held-out range)."""
    lo, hi = held_out_range(io.read_cfg(Path(run)).get("training", {}), store, tokens)
    return first_windows((lo, hi), lm_tokens, store.spec.context)


def lm_metrics(
    sae_fns: list[Callable[[torch.Tensor], torch.Tensor]],
    store: Any,
    key: tuple[int, str],
    token_range: tuple[int, int],
    device: str = "cpu",
    windows: int = 4,
    report: Callable[[str, int, int], None] | None = None,
    model: Any = None,
) -> list[dict[str, Any]]:
    """delta LM loss, CE recovered and KL of splicing each of `sae_fns` (activations -> reconstruction) into the
    store's model at `key`, on the whole windows of `token_range` (sae_cli/splice.py): one dict per SAE. The SAEs
    share the clean and zero-ablated passes; each one's numbers equal those it gets alone."""
    from actcache.models import load_store_model, store_arch

    from .splice import splice_metrics

    spec = store.spec
    arch = store_arch(spec)  # the module paths the harvest hooked
    if model is None:  # fp32 on CPU (exact CE); on a GPU the harvest's compute dtype (store_compute_dtype)
        model = load_store_model(spec, device)
    lo, hi = token_range
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if report is not None:
            report("lm", done, hi - lo)

    outs = splice_metrics(
        model, arch, key[0], key[1], sae_fns, lm_windows(store, key, token_range, windows), progress=step
    )
    return [_finish_lm(out, spec.model) for out in outs]


def _finish_lm(out: dict[str, Any], model_name: str) -> dict[str, Any]:
    out["model"] = model_name
    if out.get("site_match_rel_err", 0) > 0.05:
        log.warning(
            "the model's live activations differ from the store's by %.1f %% (relative); LM metrics may not "
            "describe the SAE's training data",
            100 * out["site_match_rel_err"],
        )
    return out
