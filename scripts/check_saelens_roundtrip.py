"""Round trips with the real libraries: every variant of ours that SAELens can represent is exported
(`sae_cli.formats.saelens.export_saelens`), loaded with `sae_lens.SAE.load_from_disk` and compared with ours on
random inputs; every SAELens inference architecture (standard, gated, jumprelu, topk; with and without
apply_b_dec_to_input, topk with and without rescale_acts_by_decoder_norm) is saved by SAELens (`save_model`),
imported, and compared the same way; a sparsify SparseCoder saved by sparsify (`save_to_disk`) is imported and
compared. Compared: encode outputs and decode outputs (of the same latents), fp32, relative error
||a - b|| / ||a||. Prints one JSON object; exit status 1 when any error is above --tol (default 1e-5).

Run in the peers virtualenv (it has sae-lens and eai-sparsify beside this repository's packages):

    SPARSIFY_DISABLE_TRITON=1 .venv-peers/bin/python scripts/check_saelens_roundtrip.py

tests/test_formats_peers.py runs it (CI builds the virtualenv with `make peers` before `make test`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_cli.formats.saelens import export_saelens, import_saelens  # noqa: E402
from sae_cli.formats.sparsify import import_sparsify  # noqa: E402
from sae_cli.io import load_sae, save_sae  # noqa: E402
from sae_cli.registry import get_variant, variant_names  # noqa: E402
from sae_cli.variants.base import SAEConfig  # noqa: E402

D_IN, D_SAE, K, BATCH = 24, 96, 6, 512
SCALE = 0.37


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def inputs(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, D_IN, generator=g) * 2.0 + 0.5


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Every floating parameter moved by N(0, scale^2): no zero bias or unit norm left to hide a mistake."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        if p.is_floating_point():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


@torch.no_grad()
def our_sae(name: str, seed: int, fold: bool = True) -> Any:
    """A variant of ours with random, non-trivial weights, its threshold calibrated, and an input scale folded in
    (as a finished run saves it; `fold` False: as it trains, e.g. TopK with free decoder norms)."""
    torch.manual_seed(seed)
    sae = get_variant(name)(SAEConfig(variant=name, d_in=D_IN, d_sae=D_SAE, l0_target=K))
    x = inputs(seed + 1)
    sae.init_from_data(x)
    perturb(sae, seed + 2)
    if hasattr(sae, "theta_F"):
        sae.theta_F.copy_(torch.rand(D_SAE) * 0.5)
    sae.calibrate(x, 128)
    if fold:
        sae.fold_scale(SCALE)  # the saved SAE reads x / SCALE as the trained one read x
    return sae.eval()


def compare(ours: Any, theirs: Any, x: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        a, b = ours.encode(x), theirs.encode(x)
        return {
            "encode": rel(a, b),
            "decode": rel(ours.decode(a), theirs.decode(a)),
            "l0": float((a != 0).sum(-1).float().mean()),
        }


def ours_to_saelens(root: Path) -> dict[str, Any]:
    from sae_lens import SAE

    results: dict[str, Any] = {}
    training = {"layer": 3, "site": "resid_post", "store_model": "tiny", "store": str(root / "no-store")}
    cases = [(name, True) for name in variant_names()] + [("topk/free", False)]  # free: rescale_acts_by_...
    for i, (name, fold) in enumerate(cases):
        variant = name.split("/")[0]
        run = save_sae(root / f"run-{i}", our_sae(variant, 10 * i, fold), training)
        out = export_saelens(run, root / f"saelens-{i}")
        sl = SAE.load_from_disk(out)
        ours = load_sae(run)
        x = inputs(100 + i) / (SCALE if fold else 1.0)
        arch = sl.cfg.architecture()
        rescaled = bool(getattr(sl.cfg, "rescale_acts_by_decoder_norm", False))
        results[name] = {"architecture": arch, "rescaled": rescaled, **compare(ours, sl, x)}
    return results


def saelens_cases() -> list[tuple[str, Any, dict[str, Any]]]:
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    cases = []
    for apply in (True, False):
        tag = "b_dec_in" if apply else "no_b_dec_in"
        dims = {"d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": apply}
        cases += [
            (f"standard/{tag}", StandardSAE, StandardSAEConfig(**dims)),
            (f"gated/{tag}", GatedSAE, GatedSAEConfig(**dims)),
            (f"jumprelu/{tag}", JumpReLUSAE, JumpReLUSAEConfig(**dims)),
            (f"topk/{tag}", TopKSAE, TopKSAEConfig(k=K, **dims)),
            (f"topk-rescaled/{tag}", TopKSAE, TopKSAEConfig(k=K, rescale_acts_by_decoder_norm=True, **dims)),
        ]
    return [(name, cls, {"cfg": cfg}) for name, cls, cfg in cases]


def saelens_to_ours(root: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for i, (name, cls, kw) in enumerate(saelens_cases()):
        torch.manual_seed(1000 + i)
        sl = cls(kw["cfg"])
        perturb(sl, 2000 + i, scale=0.2)
        if hasattr(sl, "threshold"):
            with torch.no_grad():
                sl.threshold.copy_(torch.rand(D_SAE) * 0.5)
        sl.cfg.metadata.hook_name = "blocks.2.hook_mlp_out"
        folder = root / f"from-saelens-{i}"
        sl.save_model(folder)
        run = import_saelens(folder, root / f"imported-{i}")
        ours = load_sae(run)
        training = json.loads((run / "cfg.json").read_text())["training"]
        place = [training["layer"], training["site"]]
        results[name] = {"variant": ours.cfg.variant, "place": place, **compare(sl, ours, inputs(3000 + i))}
    return results


def sparsify_to_ours(root: Path) -> dict[str, Any]:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(7)
    sc = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K))
    perturb(sc, 8, scale=0.2)
    folder = root / "sparsify" / "layers.4"
    sc.save_to_disk(folder)
    ours = load_sae(import_sparsify(folder, root / "from-sparsify"))
    x = inputs(9)
    with torch.no_grad():
        enc = sc.encode(x)
        dense = torch.zeros(BATCH, D_SAE).scatter_(1, enc.top_indices, enc.top_acts)
        a = ours.encode(x)
        return {
            "encode": rel(dense, a),
            "decode": rel(sc.decode(enc.top_acts, enc.top_indices), ours.decode(a)),
        }


def worst(results: dict[str, Any]) -> float:
    return max(max(r["encode"], r["decode"]) for r in results.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--json", type=Path, default=None, help="Also write the report to this file.")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the export's "cannot open the run's store" notice
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report = {
            "ours_to_saelens": ours_to_saelens(root),
            "saelens_to_ours": saelens_to_ours(root),
            "sparsify_to_ours": {"topk": sparsify_to_ours(root)},
        }
    report["max_rel_error"] = max(worst(v) for v in report.values() if isinstance(v, dict))
    report["tol"] = args.tol
    print(json.dumps(report, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(report))
    return 0 if report["max_rel_error"] <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
