"""The numbers half of scripts/gpu_check.sh (run that): a GPU harvest of the embedded model against a plain forward
of the same tokens, and one TopK / JumpReLU SAE step with the Triton kernels against the eager paths and against
sparsify's decoder at d_sae 65,536; everything, with the CUDA tests' outcome, as one JSON object.

    python scripts/gpu_check.py --out gpu_check.json [--pytest-rc N --junit junit.xml] [--tokens 32768]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def _tests(rc: int | None, junit: str | None) -> dict:
    """The CUDA tests' outcome from pytest's return code and its JUnit XML."""
    out: dict = {"pytest_returncode": rc}
    if junit and Path(junit).is_file():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for name in ("tests", "failures", "errors", "skipped"):
            out[name] = int(suite.get(name, 0)) if suite is not None else None
    return out


def _harvest(tokens: int, context: int, batch: int) -> dict:
    """Harvest tokens/s against a plain forward (same model, same batches, bf16 on the GPU), median of 2 rounds."""
    from actcache.harvest import HarvestConfig, _windows_from, plan_harvest, run_harvest
    from actcache.models import load_model
    from actcache.store import Store
    from actcache.verify import verify_store

    cfg = HarvestConfig(
        model="smollm2-135m", layers="all", sites="resid_pre,resid_post,mlp_out,attn_out", tokens=tokens,
        context=context, dtype="bf16", batch_size=batch, device="cuda",
    )  # fmt: skip
    plan = plan_harvest(cfg)
    compute = torch.bfloat16
    model = load_model(plan.source, "cuda", compute)
    ids = np.stack([w.token_ids_C for w in _windows_from(plan, 0)]).astype(np.int64)
    batches = [torch.from_numpy(ids[i : i + batch]).cuda() for i in range(0, len(ids), batch)]
    n = plan.spec.tokens_target
    root = Path(tempfile.mkdtemp(prefix="gpu_check_"))

    def forward() -> None:
        with torch.inference_mode():
            for ids_BC in batches:
                model(input_ids=ids_BC, use_cache=False)
        torch.cuda.synchronize()

    def harvest() -> None:
        shutil.rmtree(root / "store", ignore_errors=True)
        run_harvest(plan, root / "store", model=model)

    forward()  # warm-up
    rounds: dict[str, list[float]] = {"forward": [], "harvest": []}
    for _ in range(2):
        for name, fn in (("forward", forward), ("harvest", harvest)):
            t = time.perf_counter()
            fn()
            rounds[name].append(n / (time.perf_counter() - t))
    store = Store.open(root / "store")
    raw = sum(n * plan.spec.d_model * 2 for _ in plan.spec.acts_keys)
    stored = sum(store.stored_bytes(k) for k in plan.spec.acts_keys)
    report = verify_store(root / "store")
    shutil.rmtree(root, ignore_errors=True)
    fw, hv = statistics.median(rounds["forward"]), statistics.median(rounds["harvest"])
    return {
        "model": "smollm2-135m", "tokens": n, "context": context, "batch_windows": batch,
        "arrays": len(plan.spec.acts_keys), "forward_tokens_per_s": fw, "harvest_tokens_per_s": hv,
        "harvest_over_forward": hv / fw, "ratio_stored_over_raw": stored / raw, "verify_ok": bool(report.ok),
        "rounds": rounds,
    }  # fmt: skip


def _kernels(d_sae: int, batch: int, k: int, reps: int) -> dict:
    """One TopK step (Triton vs dense eager vs sparsify's decoder) and the JumpReLU encoder, ms, per d_in."""
    sys.path.insert(0, str(HERE))
    import bench_kernels

    decoder = bench_kernels._sparsify_decoder()
    out: dict = {"d_sae": d_sae, "batch": batch, "k": k, "dtype": "bf16", "sparsify": decoder is not None}
    for d_in in (2304, 3584):
        torch.manual_seed(0)
        r = bench_kernels.bench_cuda_case(d_in, d_sae, batch, k, reps, decoder)
        r["topk_dense_over_ours"] = r["topk_dense"] / r["topk_ours"]
        if "topk_sparsify" in r:
            r["topk_sparsify_over_ours"] = r["topk_sparsify"] / r["topk_ours"]
        r["jumprelu_eager_over_fused"] = r["jr_eager"] / r["jr_fused"]
        out[f"d_in_{d_in}_ms"] = r
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--pytest-rc", type=int, default=None)
    ap.add_argument("--junit", default=None)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--d-sae", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            f"gpu_check: torch {torch.__version__} sees no CUDA device; run on a machine with an NVIDIA GPU"
        )
    result: dict = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cuda_tests": _tests(args.pytest_rc, args.junit),
    }
    for name, fn in (
        ("harvest", lambda: _harvest(args.tokens, args.context, args.batch_size)),
        ("kernels", lambda: _kernels(args.d_sae, 4096, 64, args.reps)),
    ):
        t = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as err:  # one failing part must not lose the others' numbers
            result[name] = {"error": f"{type(err).__name__}: {err}"}
        result[name]["seconds"] = time.perf_counter() - t
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    failed = [n for n in ("harvest", "kernels") if "error" in result[n]]
    if failed or args.pytest_rc not in (None, 0):
        sys.exit(f"gpu_check: {', '.join(failed) or 'the CUDA tests'} failed; see {args.out}")


if __name__ == "__main__":
    main()
