"""`--init-from FOLDER`: start a member from a trained SAE instead of a fresh init (fine-tuning; Karvonen et al.
2025, arXiv 2503.17272: a local SAE fine-tuned end-to-end on a small share of the tokens).

The saved SAE takes raw activations (its input scale c0 was folded into its weights by `SAE.fold_scale`); the run
trains on c*x with its own c, so `load` unfolds with `fold_scale(1/c)`: the member then computes exactly what the
saved SAE computes, in the run's units (pre-activations, thresholds and latents unchanged)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import ConfigError, MemberConfig
from ..variants.base import SAE, SAEConfig


def source_config(cfg: MemberConfig, d_in: int) -> SAEConfig:
    """The SAEConfig a member started from `cfg.init_from` trains: the saved SAE's width and options (the
    member's options over them), checked against the member's variant, L0 target (unless the saved one is
    unknown: 0, as `sae import` records it when the file does not say) and the store's d_in."""
    from .. import io

    folder = Path(cfg.init_from)
    try:
        saved = SAEConfig(**io.read_cfg(folder)["sae"])
    except io.SAEFileError as e:
        raise ConfigError(f"--init-from: {e}") from None
    except (KeyError, TypeError) as e:
        raise ConfigError(f"--init-from: {folder / io.CFG_FILE} has no valid 'sae' record ({e})") from None
    if saved.variant != cfg.variant:
        raise ConfigError(
            f"--init-from {folder} is a {saved.variant} SAE; train {saved.variant} (or drop --init-from)"
        )
    if saved.d_in != d_in:
        raise ConfigError(
            f"--init-from {folder} reads d_in {saved.d_in} and the store's activations have d_model {d_in}: "
            "start from an SAE of this model and site"
        )
    if float(saved.l0_target) <= 0:  # an imported SAE whose target is unknown (sae import): the run's
        saved = dataclasses.replace(saved, l0_target=float(cfg.l0_target))
    elif float(saved.l0_target) != float(cfg.l0_target):
        raise ConfigError(
            f"--init-from {folder} was trained at L0 target {saved.l0_target:g}: pass --l0-target "
            f"{saved.l0_target:g} (fine-tuning keeps the SAE's sparsity)"
        )
    return dataclasses.replace(saved, options={**dict(saved.options), **dict(cfg.options)})


def load(folder: str | Path, sae_cfg: SAEConfig, scale: float) -> SAE:
    """The saved SAE as a member that trains on scale * x: weights loaded, the input scale unfolded."""
    from .. import io

    sae = io.load_sae(folder)
    if sae.cfg.d_sae != sae_cfg.d_sae or sae.cfg.d_in != sae_cfg.d_in:
        raise ConfigError(f"--init-from {folder} changed since the run was planned; start the run again")
    sae.train()
    sae.fold_scale(1.0 / scale)
    return sae
