"""The compiled Triton paths on a real GPU through the public entry points (skipped without CUDA; the same kernels
run under the interpreter in test_kernels_triton.py on every machine)."""

from __future__ import annotations

import pytest
import torch

import sae_cli.kernels as kernels
from sae_cli.kernels.reference import jumprelu_encode_ref, topk_decode_ref, topk_encode_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fast_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("SAE_KERNELS", "auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_topk_encode_decode_match_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    B, D, F, k = 256, 320, 4096, 32
    x = torch.randn(B, D, device="cuda", dtype=dtype, requires_grad=True)
    W_enc = (torch.randn(F, D, device="cuda") / D**0.5).to(dtype).requires_grad_()
    b_enc = torch.zeros(F, device="cuda", dtype=dtype, requires_grad=True)
    W_dec = torch.randn(F, D, device="cuda", dtype=dtype, requires_grad=True)
    assert kernels.kernel_path("topk_decode", "cuda", k, F) == "triton"
    leaves = (x, W_enc, b_enc, W_dec)

    def loss(encode, decode):
        vals, idx = encode(x, W_enc, b_enc, k)
        out = decode(idx, vals, W_dec)
        return out, torch.autograd.grad((out.float() ** 2).sum(), leaves)

    out, grads = loss(kernels.topk_encode, kernels.topk_decode)
    ref, ref_grads = loss(topk_encode_ref, topk_decode_ref)
    tol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.25, rtol=3e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("fuse_matmul", [False, True])
def test_cuda_jumprelu_encode_matches_reference(fuse_matmul: bool) -> None:
    torch.manual_seed(1)
    B, D, F = 256, 320, 4096
    x = torch.randn(B, D, device="cuda", requires_grad=True)
    W = (torch.randn(F, D, device="cuda") / D**0.5).requires_grad_()
    b = torch.zeros(F, device="cuda", requires_grad=True)
    theta = torch.full((F,), 0.5, device="cuda", requires_grad=True)
    leaves = (x, W, b, theta)
    f, l0 = kernels.jumprelu_encode(x, W, b, theta, 0.05, fuse_matmul=fuse_matmul)
    ref_f, ref_l0 = jumprelu_encode_ref(x, W, b, theta, 0.05)
    # IEEE fp32 in both (tf32 off by default in torch): L0 counts may differ only where pre ties theta to 1e-6.
    assert (l0 - ref_l0).abs().max() <= 1
    torch.testing.assert_close(f, ref_f, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad((f**2).sum() + l0.sum(), leaves)
    ref_grads = torch.autograd.grad((ref_f**2).sum() + ref_l0.sum(), leaves)
    for a, c in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, c, atol=1e-2, rtol=1e-3)
