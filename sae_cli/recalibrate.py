"""`sae calibrate`: set a trained SAE's inference thresholds again, on the run's own calibration tokens or on the
first tokens of another text (a store of the same model), so that its L0 lands on its target on that text.

A threshold fixes how strongly a latent must respond, not how many latents a text calls on: under the threshold
calibrated at the end of training, an SAE fires more latents on text of another kind (docs/benchmarks.md, "L0 by
document and on another text": up to +14 % on other plays of the same corpus, +46 to +148 % on Shakespeare for
SAEs trained on Python source). TopK fires k on every token and has nothing to set. Calibration needs no labels,
only activations of the new text: `sae calibrate RUN --store S --other-store` takes its first `tokens` tokens
(whole windows), and `sae eval OUT --store S --other-store` then evaluates on the rest of S, never on them.

What changes: the thresholds only (BatchTopK-like `threshold`; the steered variants' margin: ReLU's b_enc,
Gated's b_gate, JumpReLU's theta), by `SAE.calibrate`, the rule `sae train` applies after its last step; with
`l0_target` also the target (and TopK's k, which needs no calibration): an SAE at another sparsity without
training (docs/benchmarks.md compares it with SAEs trained at that L0).
cfg.json's "training" keeps its record and gains "recalibrated" (the store, its identity, the token range, the
L0 on those tokens before and after). Tokens are filtered as in training (BOS, `max_norm_ratio`)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from . import data, io
from .config import ConfigError, LoopConfig
from .evaluate import EVAL_FILE, check_site, other_text_range
from .registry import get_variant

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 16384  # sae_cli/cli_calibrate.py repeats it
"""Calibration tokens read from another store (the trainer holds back as many). The pooled rule puts the L0 on its
target on these tokens exactly; on the rest of the text it landed within 2.3 % (docs/benchmarks.md, "L0 by
document and on another text")."""


def recalibrate(
    run: str | Path,
    store_path: str | Path,
    *,
    other_store: bool = False,
    tokens: int = DEFAULT_TOKENS,
    out: str | Path | None = None,
    overwrite: bool = False,
    l0_target: float | None = None,
) -> dict[str, Any]:
    """Calibrate the SAE in `run` on `store_path` and write it to `out` (default: in place; eval.json removed, as
    it described the old thresholds). `other_store` False: the store must be the run's own and the tokens are
    those the trainer calibrated on (its held-back range, or its normalisation sample); True: the first `tokens`
    tokens of another store of the same model. `l0_target`: a new target (TopK: a new k, nothing to calibrate;
    the others: calibrated to it); default the SAE's own. Returns the "recalibrated" record."""
    if tokens < 1:
        raise ConfigError(f"--tokens must be at least 1, got {tokens}")
    run = Path(run)
    target = Path(out) if out is not None else run
    cfg = io.read_cfg(run)
    training = dict(cfg.get("training", {}))
    sae = io.load_sae(run)
    calibrates = get_variant(sae.cfg.variant).calibrates
    if not calibrates and l0_target is None:
        raise ConfigError(
            f"{sae.cfg.variant} fires exactly its k latents on every token: it has no threshold to calibrate "
            "(--l0-target sets another k)"
        )
    target_before = sae.cfg.l0_target
    if l0_target is not None:
        sae = retarget(sae, l0_target)
    if target != run and target.exists() and not overwrite:
        raise ConfigError(f"{target} exists; pass --overwrite to replace it, or another --out")
    store = data.open_store(store_path)
    key = (int(training.get("layer", -1)), str(training.get("site", "")))
    check_site(store, key, sae.cfg.d_in)
    x_ND, (lo, hi) = calibration_tokens(run, training, store, key, other_store, tokens)
    if not len(x_ND):
        raise ConfigError(
            f"no calibration token left in {store.path} [{lo}, {hi}) after the BOS / norm filters"
        )
    x_ND = x_ND.float()
    batch = int(training.get("batch_size") or 4096)
    with torch.no_grad():
        before = float((sae.encode(x_ND) != 0).sum(-1).float().mean())
        if calibrates:
            sae.calibrate(x_ND, batch)  # a saved SAE takes raw activations: no scale to apply
        after = float((sae.encode(x_ND) != 0).sum(-1).float().mean())
    record = {
        "store": str(store.path),
        "store_identity": {**store.identity(hi), "path": str(store.path.resolve())},
        "other_store": other_store,
        "range": [lo, hi],
        "tokens": len(x_ND),
        "l0_before": before,
        "l0_after": after,
        "l0_target_before": target_before,
        "l0_target": sae.cfg.l0_target,
    }
    log.info("%s: L0 on %d calibration tokens of %s %.2f -> %.2f", run, len(x_ND), store.path, before, after)
    with io.run_lock(target, "calibration"):  # not into a folder that `sae train` writes at the same time
        write(run, target, sae, {**training, "recalibrated": record})
    return record


def calibration_tokens(
    run: Path, training: dict[str, Any], store: Any, key: tuple[int, str], other_store: bool, tokens: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """(the calibration tokens, the store range they come from): the first `tokens` of another store, or the
    tokens the trainer calibrated on; filtered as in training (BOS, `max_norm_ratio`)."""
    loop = dataclasses.replace(
        LoopConfig(),
        seed=int(training.get("seed", 0)),
        drop_bos=bool(training.get("drop_bos", True)),
        max_norm_ratio=float(training.get("max_norm_ratio") or 0.0),  # the tokens the run trained on
    )
    if other_store:
        lo, hi = other_text_range(training, store, tokens)
        x_ND = data.calibration_sample(store, [key], loop, (lo, lo), (lo, hi), finite=True)[key]
    else:
        if "train_range" not in training:
            raise ConfigError(
                f"{run} records no training range (an imported SAE?): calibrate it on a store with --other-store"
            )
        data.run_identity(
            store, (), training, "this SAE", "pass that store with --store, or add --other-store"
        )
        train = (int(training["train_range"][0]), int(training["train_range"][1]))
        lo, hi = (int(v) for v in training.get("calibration_range") or (train[1], train[1]))
        x_ND = data.calibration_sample(store, [key], loop, train, (lo, hi), finite=True)[key]
    return x_ND, (lo, hi)


def retarget(sae: Any, l0_target: float) -> Any:
    """The same weights under another L0 target (TopK-like rules take k from it; `calibrate` aims at it)."""
    if not 0 < l0_target < sae.cfg.d_sae:
        raise ConfigError(f"--l0-target must be in (0, {sae.cfg.d_sae}) (d_sae), got {l0_target:g}")
    new = get_variant(sae.cfg.variant)(dataclasses.replace(sae.cfg, l0_target=float(l0_target)))
    new.load_state_dict(sae.state_dict(), strict=True)
    return new.eval()


def write(run: Path, target: Path, sae: Any, training: dict[str, Any]) -> None:
    """The recalibrated SAE into `target`: in place (eval.json, which described the old thresholds, removed), or a
    new SAE folder (cfg.json, weights, the training densities)."""
    if target != run:
        shutil.rmtree(target, ignore_errors=True)
    (target / EVAL_FILE).unlink(missing_ok=True)
    io.save_sae(target, sae, training, freq_F=io.load_densities(run))
