#!/usr/bin/env bash
# Prove the GPU paths on a machine with a CUDA GPU, in under 8 minutes, as one JSON of numbers:
#   1. the CUDA tests (tests/test_kernels_cuda.py, tests/test_kernels_triton.py on the GPU);
#   2. a GPU harvest of the embedded SmolLM2-135M (all layers x 4 sites, bf16) against a plain forward, tokens/s;
#   3. one TopK / JumpReLU SAE step: the Triton kernels against the eager paths and sparsify's decoder, d_sae 65,536.
# Usage (from the repository root): scripts/gpu_check.sh [OUT.json]     PYTHON=... picks the interpreter.
# Without CUDA it stops at once: one line, exit 2. Put the numbers in docs/benchmarks.md.
set -uo pipefail
PY=${PYTHON:-python}
OUT=${1:-gpu_check.json}
cd "$(dirname "$0")/.." || exit 2
if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to torch ($($PY -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -1)); run it on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 2
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
t0=$(date +%s)
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_kernels_triton.py \
    --junitxml "$TMP/junit.xml" > "$TMP/pytest.log" 2>&1
rc=$?
tail -3 "$TMP/pytest.log"
echo "CUDA tests: exit $rc in $(( $(date +%s) - t0 )) s"
timeout 270 $PY scripts/gpu_check.py --out "$OUT" --pytest-rc "$rc" --junit "$TMP/junit.xml"
status=$?
echo "gpu_check: $(( $(date +%s) - t0 )) s in all; numbers in $OUT"
exit $status
