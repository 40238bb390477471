"""Parity of the Triton kernels with the eager references, forward and backward, fp32 and bf16, run WITHOUT a GPU
by Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors and tiny shapes.

Triton 3.x reads TRITON_INTERPRET when `@triton.jit` decorates a function, and that includes triton.language's
own jit helpers (tl.sum, ...), which are decorated when triton is first imported: the variable must be set before
`import triton` in the process. So the parity tests below run in a child pytest started with the variable set
(test_triton_kernels_under_interpreter); this process does not collect them, and nothing leaks into other
test modules. `TRITON_INTERPRET=1 pytest tests/test_kernels_triton.py` runs them directly."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_cli.kernels.reference import (
    jumprelu_encode_ref,
    jumprelu_ref,
    step_ref,
    topk_decode_ref,
    topk_encode_ref,
)
from sae_cli.kernels.sparse_topk import sparse_topk_decode, sparse_topk_encode

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
B, D, F, K = 16, 40, 128, 6  # D and K not powers of two: the masks are exercised
BF16_TOL = dict(atol=4e-2, rtol=2e-2)
FP32_TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(INTERPRETED, reason="this process is the interpreter run itself")
def test_triton_kernels_under_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
    cmd += ["-k", "not under_interpreter"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    # Every parity test ran (none skipped, e.g. by a triton that failed to import in the child).
    assert "skipped" not in summary and " passed" in summary, proc.stdout[-3000:]


@pytest.fixture(scope="module")
def tri():
    pytest.importorskip("triton")
    return tuple(
        importlib.import_module(n) for n in ("sae_cli.kernels.triton_topk", "sae_cli.kernels.triton_jumprelu")
    )


def _leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).detach().requires_grad_()


def _fp32_twins(*leaves: torch.Tensor) -> list[torch.Tensor]:
    """fp32 copies of (bf16) leaves: the reference runs on the same values at full precision."""
    return [t.detach().float().requires_grad_() for t in leaves]


def _close(got: torch.Tensor | None, want: torch.Tensor | None, dtype: torch.dtype) -> None:
    got = torch.zeros_like(want) if got is None else got  # a None gradient is a zero gradient
    torch.testing.assert_close(
        got.float(), want.float(), **(FP32_TOL if dtype == torch.float32 else BF16_TOL)
    )


def _threshold_inputs(dtype: torch.dtype, eps: float):
    gen = torch.Generator().manual_seed(3)
    theta = (0.2 + 0.5 * torch.rand(F, generator=gen)).requires_grad_()  # theta stays fp32 (methods.md)
    pre = torch.randn(B, F, generator=gen)
    # A third of the entries inside the straight-through window |pre - theta| < eps / 2, so theta gets gradient.
    near = theta.detach() + eps * (torch.rand(B, F, generator=gen) - 0.5) * 0.9
    pre = torch.where(torch.rand(B, F, generator=gen) < 0.33, near, pre)
    return _leaf(pre, dtype), theta, torch.randn(B, F, generator=gen).to(dtype)


class TestTritonParity:
    """The parity tests proper; collected only in the TRITON_INTERPRET=1 child (or a run with the variable set)."""

    __test__ = INTERPRETED

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_triton_topk_decode_forward_backward(self, tri, dtype: torch.dtype) -> None:
        topk, _ = tri
        gen = torch.Generator().manual_seed(0)
        # Latents from 10 of the 128 (times 11): duplicates across tokens must be summed into one W_dec row.
        idx = torch.stack([torch.randperm(10, generator=gen)[:K] for _ in range(B)]) * 11
        vals = _leaf(torch.rand(B, K, generator=gen), dtype)
        W = _leaf(torch.randn(F, D, generator=gen), dtype)
        g = torch.randn(B, D, generator=gen).to(dtype)
        out = sparse_topk_decode(idx, vals, W, topk)
        assert out.dtype == dtype
        v32, W32 = _fp32_twins(vals, W)
        ref = topk_decode_ref(idx, v32, W32)
        _close(out, ref, dtype)
        got = torch.autograd.grad(out, (vals, W), g)
        want = torch.autograd.grad(ref, (v32, W32), g.float())
        for a, b in zip(got, want, strict=True):
            _close(a, b, dtype)
        untouched = torch.ones(F, dtype=torch.bool)
        untouched[idx.unique()] = False
        assert got[1][untouched].abs().max() == 0

    def test_triton_topk_decode_strided_weight(self, tri) -> None:
        topk, _ = tri
        gen = torch.Generator().manual_seed(1)
        idx = torch.randint(0, F, (B, K), generator=gen)
        vals = torch.rand(B, K, generator=gen, requires_grad=True)
        # W_FD as a transposed view of a [D, F] tensor: its column stride is not 1.
        W_DF = torch.randn(D, F, generator=gen, requires_grad=True)
        g = torch.randn(B, D, generator=gen)
        out = sparse_topk_decode(idx, vals, W_DF.T, topk)
        ref = topk_decode_ref(idx, vals, W_DF.T)
        _close(out, ref, torch.float32)
        for a, b in zip(
            torch.autograd.grad(out, (vals, W_DF), g), torch.autograd.grad(ref, (vals, W_DF), g), strict=True
        ):
            _close(a, b, torch.float32)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_triton_topk_encode_forward_backward(self, tri, dtype: torch.dtype) -> None:
        topk, _ = tri
        gen = torch.Generator().manual_seed(2)
        x = _leaf(torch.randn(B, D, generator=gen), dtype)
        W = _leaf(torch.randn(F, D, generator=gen) / D**0.5, dtype)
        b = _leaf(0.1 * torch.randn(F, generator=gen), dtype)
        g = torch.randn(B, K, generator=gen).to(dtype)
        vals, idx = sparse_topk_encode(x, W, b, K, topk)
        ref_vals, ref_idx = topk_encode_ref(x, W, b, K)
        # The same forward expression as the reference: the same selection, bit for bit.
        assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)
        # Gradients against fp32 math on the same values and the same selection.
        x32, W32, b32 = _fp32_twins(x, W, b)
        pre32 = torch.relu(x32 @ W32.T + b32).gather(1, idx)
        got = torch.autograd.grad(vals, (x, W, b), g)
        want = torch.autograd.grad(pre32, (x32, W32, b32), g.float())
        for a, c in zip(got, want, strict=True):
            _close(a, c, dtype)

    def test_triton_scatter_rows_sums_duplicates_and_zeroes_the_rest(self, tri) -> None:
        topk, _ = tri
        idx = torch.tensor([[3, 1], [3, 0], [1, 3]])
        vals = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        G, s = topk.scatter_rows(idx, vals, X, 5, torch.float32, with_sum=True)
        # latent 3: 1*[1,0] + 3*[0,1] + 6*[1,1]; latent 1: 2*[1,0] + 5*[1,1]; latent 0: 4*[0,1]; 2 and 4 untouched
        expected = torch.tensor([[0.0, 4.0], [7.0, 5.0], [0.0, 0.0], [7.0, 9.0], [0.0, 0.0]])
        torch.testing.assert_close(G, expected)
        torch.testing.assert_close(s, torch.tensor([4.0, 7.0, 0.0, 10.0, 0.0]))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("kind", ["jumprelu", "step"])
    def test_triton_jumprelu_and_step_elementwise(self, tri, dtype: torch.dtype, kind: str) -> None:
        _, jump = tri
        eps = 0.05
        pre, theta, g = _threshold_inputs(dtype, eps)
        fn, ref_fn = (
            (jump.TritonJumpReLU, jumprelu_ref) if kind == "jumprelu" else (jump.TritonStep, step_ref)
        )
        out = fn.apply(pre, theta, eps)
        ref = ref_fn(pre, theta, eps)  # the reference promotes pre to fp32 against theta as the kernel does
        assert out.dtype == ref.dtype == dtype
        assert torch.equal(out, ref)
        got = torch.autograd.grad(out, (pre, theta), g, allow_unused=True)
        want = torch.autograd.grad(ref, (pre, theta), g)
        assert want[1].abs().sum() > 0
        _close(got[0], want[0], dtype)
        torch.testing.assert_close(got[1], want[1], atol=1e-3, rtol=1e-5)  # fp32 sums of the same terms

    @pytest.mark.parametrize("fuse_matmul", [False, True])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_triton_jumprelu_encode(self, tri, dtype: torch.dtype, fuse_matmul: bool) -> None:
        _, jump = tri
        eps = 0.05
        gen = torch.Generator().manual_seed(4)
        Bx = 20  # not a multiple of the 16-row tiles
        x = _leaf(torch.randn(Bx, D, generator=gen), dtype)
        W = _leaf(torch.randn(F, D, generator=gen) / D**0.5, dtype)
        b = _leaf(0.1 * torch.randn(F, generator=gen), dtype)
        theta = (0.3 + 0.4 * torch.rand(F, generator=gen)).requires_grad_()
        g_f = torch.randn(Bx, F, generator=gen).to(dtype)
        g_l0 = torch.randn(Bx, generator=gen)
        f, l0 = jump.TritonJumpReLUEncode.apply(x, W, b, theta, eps, fuse_matmul)
        assert f.dtype == dtype and l0.dtype == torch.float32
        # The unfused path thresholds the same `x @ W.T + b` as the reference (bf16-rounded in bf16); the fused matmul
        # keeps pre in fp32, so it is compared with the reference run in fp32 on the same values.
        leaves = (x, W, b, theta) if not fuse_matmul else (*_fp32_twins(x, W, b), theta)
        ref_f, ref_l0 = jumprelu_encode_ref(*leaves, eps)
        _close(f, ref_f, dtype)
        assert torch.equal(l0, ref_l0)
        assert ref_l0.min() > 0 and ref_l0.max() < F
        loss = (f.float() * g_f.float()).sum() + (l0 * g_l0).sum()
        ref_loss = (ref_f.float() * g_f.float()).sum() + (ref_l0 * g_l0).sum()
        got = torch.autograd.grad(loss, (x, W, b, theta))
        want = torch.autograd.grad(ref_loss, leaves)
        assert want[3].abs().sum() > 0
        for a, c in zip(got[:3], want[:3], strict=True):
            _close(a, c, dtype)
        # theta's gradient sums terms of size ~(theta * g_f + g_l0) / eps = ~20 that partly cancel; in bf16 the
        # reference also rounds g_l0 to bf16 (its step output is bf16), an error of ~0.1 on those sums.
        theta_atol = 0.25 if dtype == torch.bfloat16 and not fuse_matmul else 1e-2
        torch.testing.assert_close(got[3], want[3], atol=theta_atol, rtol=1e-4)
