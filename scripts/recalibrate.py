"""Calibrate the inference thresholds of already trained SAEs, as `sae train` now does at the end of training
(`SAE.calibrate`), and write them back in place: SAEs trained before the calibration existed, or with
`calibrate = false`. Only the thresholds change (BatchTopK-like `threshold`; the steered variants' margin:
ReLU's b_enc, Gated's b_gate, JumpReLU's theta).

The calibration tokens are those the trainer would use: the run's held-back calibration range when it recorded
one, else the seeded normalisation sample of its training range (`data.calibration_sample`). Re-run
`sae eval RUN --store S` afterwards (eval.json is removed here, so a stale one is never read).

    python scripts/recalibrate.py sweeps/quality-L15-v2/members/batchtopk-* --store stores/quality
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch

from sae_cli import data, io
from sae_cli.config import LoopConfig
from sae_cli.evaluate import EVAL_FILE

log = logging.getLogger("recalibrate")


def recalibrate(run: Path, store_path: str | None) -> tuple[float, float]:
    """(L0 on the calibration tokens before, after) of the SAE in `run`, rewritten in place."""
    cfg = io.read_cfg(run)
    tr = cfg["training"]
    sae = io.load_sae(run)
    store = data.open_store(store_path or tr["store"])
    key = (int(tr["layer"]), str(tr["site"]))
    loop = dataclasses.replace(
        LoopConfig(),
        seed=int(tr.get("seed", 0)),
        drop_bos=bool(tr.get("drop_bos", True)),
        max_norm_ratio=float(tr.get("max_norm_ratio") or 0.0),  # the tokens the run trained and calibrated on
    )
    train = tuple(tr["train_range"])
    calib = tuple(tr.get("calibration_range", (train[1], train[1])))
    x_ND = data.calibration_sample(store, [key], loop, train, calib)[key].float()
    with torch.no_grad():
        before = float((sae.encode(x_ND) != 0).sum(-1).float().mean())
        sae.calibrate(x_ND, int(tr["batch_size"]))  # the saved SAE takes raw activations: no scale to apply
        after = float((sae.encode(x_ND) != 0).sum(-1).float().mean())
    summary = {**tr, "recalibrated": {"tokens": len(x_ND), "script": "scripts/recalibrate.py"}}
    io.save_sae(run, sae, summary, freq_F=io.load_densities(run))
    (run / EVAL_FILE).unlink(missing_ok=True)
    return before, after


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="SAE folders (cfg.json + sae.safetensors)")
    ap.add_argument("--store", default=None, help="the store the SAEs were trained on (default: as recorded)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for run in args.runs:
        before, after = recalibrate(run, args.store)
        print(f"{run}: L0 on the calibration tokens {before:.2f} -> {after:.2f}")


if __name__ == "__main__":
    main()
