"""Round trips through the real sae-lens and sparsify packages (scripts/check_saelens_roundtrip.py, run by the
peers virtualenv's Python in a subprocess): every variant of ours exported and loaded by
`sae_lens.SAE.load_from_disk`, every SAELens inference architecture saved by SAELens and imported, a sparsify
SparseCoder saved by sparsify and imported; encode and decode outputs agree to fp32 rel. error <= 1e-5.
`make test` builds .venv-peers first (`make peers`) and sets REQUIRE_PEERS=1, so CI cannot skip this test;
a plain `pytest` without the virtualenv skips it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sae_cli.registry import variant_names

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
SCRIPT = ROOT / "scripts" / "check_saelens_roundtrip.py"
TOL = 1e-5
SAELENS_ARCH = {"relu": "standard", "gated": "gated", "jumprelu": "jumprelu", "topk": "topk",
                "batchtopk": "jumprelu", "matryoshka": "jumprelu", "mutual-choice": "jumprelu",
                "feature-choice": "jumprelu"}  # fmt: skip
OURS_FROM = {
    "standard": "relu",
    "gated": "gated",
    "jumprelu": "jumprelu",
    "topk": "topk",
    "topk-rescaled": "topk",
}


@pytest.mark.slow
def test_round_trips_with_the_real_packages(tmp_path: Path) -> None:
    if not PEERS_PYTHON.exists():
        if os.environ.get("REQUIRE_PEERS") == "1":
            pytest.fail(f"{PEERS_PYTHON} is missing; `make peers` builds it")
        pytest.skip(".venv-peers is absent (`make peers` builds it; `make test` does)")
    env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1", "PYTHONPATH": str(ROOT)}
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [str(PEERS_PYTHON), str(SCRIPT), "--tol", str(TOL), "--json", str(report_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert report_path.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    sys.stdout.write(f"max rel. error {report['max_rel_error']:.2e}\n")
    exported = report["ours_to_saelens"]
    assert set(exported) == {*variant_names(), "topk/free"}  # every registered variant has a SAELens form
    for name, r in exported.items():
        assert r["architecture"] == SAELENS_ARCH[name.split("/")[0]], (name, r)
        assert r["rescaled"] == (name == "topk/free"), (name, r)
        assert r["encode"] <= TOL and r["decode"] <= TOL and r["l0"] > 1, (name, r)
    imported = report["saelens_to_ours"]
    assert len(imported) == 10
    for case, r in imported.items():
        assert r["variant"] == OURS_FROM[case.split("/")[0]] and r["place"] == [2, "mlp_out"], (case, r)
        assert r["encode"] <= TOL and r["decode"] <= TOL and r["l0"] > 1, (case, r)
    assert report["sparsify_to_ours"]["topk"]["encode"] <= TOL
    assert report["sparsify_to_ours"]["topk"]["decode"] <= TOL
    assert done.returncode == 0, done.stderr[-3000:]
