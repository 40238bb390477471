"""CPU kernels and dispatch: the embedding_bag sparse paths and the dense decode against the eager references,
hand-computed values of the references, and the dispatch rules (Triton never touched by CPU tensors,
SAE_KERNELS=eager)."""

from __future__ import annotations

import sys

import pytest
import torch

import sae_cli.kernels as kernels
from sae_cli.kernels import cpu_sparse
from sae_cli.kernels.reference import (
    jumprelu_encode_ref,
    jumprelu_ref,
    step_ref,
    topk_decode_dense,
    topk_decode_ref,
    topk_encode_ref,
)
from sae_cli.kernels.sparse_topk import sparse_topk_decode, sparse_topk_encode

B, D, F, K = 24, 40, 160, 6


def _decode_inputs(dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # Latents drawn from 12 of the 160: the same latent recurs across tokens, so the W_dec gradient must sum them.
    idx_BK = torch.stack([torch.randperm(12, generator=gen)[:K] for _ in range(B)]) * 13
    vals_BK = torch.rand(B, K, generator=gen).to(dtype).requires_grad_()
    W_FD = torch.randn(F, D, generator=gen).to(dtype).requires_grad_()
    g_BD = torch.randn(B, D, generator=gen).to(dtype)
    return idx_BK, vals_BK, W_FD, g_BD


def _grads(out: torch.Tensor, grad: torch.Tensor, *leaves: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, leaves, grad))


@pytest.mark.parametrize(
    "decode", [topk_decode_dense, lambda i, v, w: sparse_topk_decode(i, v, w, cpu_sparse)]
)
def test_cpu_decode_matches_reference_fp32(decode) -> None:
    idx, vals, W, g = _decode_inputs(torch.float32)
    out = decode(idx, vals, W)
    ref = topk_decode_ref(idx, vals, W)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(_grads(out, g, vals, W), _grads(ref, g, vals, W), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Rows of untouched latents get exactly zero gradient; touched ones sum over every token that used them.
    grad_W = _grads(decode(idx, vals, W), g, W)[0]
    untouched = torch.ones(F, dtype=torch.bool)
    untouched[idx.unique()] = False
    assert grad_W[untouched].abs().max() == 0
    f = int(idx[0, 0])
    by_hand = sum(vals[b, j].item() * g[b] for b in range(B) for j in range(K) if idx[b, j] == f)
    torch.testing.assert_close(grad_W[f], by_hand, atol=1e-5, rtol=1e-5)


def test_cpu_sparse_decode_bf16_close_to_fp32_reference() -> None:
    idx, vals, W, g = _decode_inputs(torch.bfloat16)
    out = sparse_topk_decode(idx, vals, W, cpu_sparse)
    assert out.dtype == torch.bfloat16
    v32, W32 = vals.detach().float().requires_grad_(), W.detach().float().requires_grad_()
    ref = topk_decode_ref(idx, v32, W32)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=2e-2)
    grad_v, grad_W = _grads(out, g, vals, W)
    ref_v, ref_W = _grads(ref, g.float(), v32, W32)
    torch.testing.assert_close(grad_v.float(), ref_v, atol=6e-2, rtol=2e-2)
    torch.testing.assert_close(grad_W.float(), ref_W, atol=3e-2, rtol=2e-2)


def test_dense_decode_sums_duplicates_within_a_row() -> None:
    idx = torch.tensor([[2, 2, 0]])
    vals = torch.tensor([[1.0, 2.0, 3.0]])
    W = torch.tensor([[1.0, 0.0], [5.0, 5.0], [0.0, 1.0]])
    expected = torch.tensor([[3.0, 3.0]])  # 3 * W[0] + (1 + 2) * W[2]
    torch.testing.assert_close(topk_decode_dense(idx, vals, W), expected)
    torch.testing.assert_close(topk_decode_ref(idx, vals, W), expected)
    torch.testing.assert_close(sparse_topk_decode(idx, vals, W, cpu_sparse), expected)


def _encode_inputs(dtype: torch.dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen).to(dtype).requires_grad_()
    W = (torch.randn(F, D, generator=gen) / D**0.5).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(F, generator=gen)).to(dtype).requires_grad_()
    g = torch.randn(B, K, generator=gen).to(dtype)
    return x, W, b, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_sparse_encode_matches_reference(dtype: torch.dtype) -> None:
    x, W, b, g = _encode_inputs(dtype)
    vals, idx = sparse_topk_encode(x, W, b, K, cpu_sparse)
    ref_vals, ref_idx = topk_encode_ref(x, W, b, K)
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    for got, want in zip(_grads(vals, g, x, W, b), _grads(ref_vals, g, x, W, b), strict=True):
        torch.testing.assert_close(got.float(), want.float(), **tol)


def test_cpu_sparse_encode_zero_values_get_no_gradient() -> None:
    # With every pre-activation negative, ReLU makes all selected values 0: no gradient may flow (ReLU's rule).
    x = torch.randn(4, 8, requires_grad=True)
    W = torch.randn(16, 8, requires_grad=True)
    b = torch.full((16,), -100.0, requires_grad=True)
    vals, _ = sparse_topk_encode(x, W, b, 3, cpu_sparse)
    assert vals.abs().max() == 0
    grads = torch.autograd.grad(vals.sum(), (x, W, b))
    assert all(gr.abs().max() == 0 for gr in grads)


def test_cpu_sparse_functions_pass_gradcheck_in_fp64() -> None:
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 9, (5, 3), generator=gen)
    vals = torch.rand(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, w: sparse_topk_decode(idx, v, w, cpu_sparse), (vals, W))
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.rand(9, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x_, w, b_: sparse_topk_encode(x_, w, b_, 3, cpu_sparse)[0], (x, W, b)
    )


def test_jumprelu_and_step_references_hand_computed() -> None:
    # eps = 0.1: pre 1.03 lies in the window |pre - theta| / eps < 1/2 of theta 1; 0.5 and 2.0 do not.
    pre = torch.tensor([[0.5, 1.03, 2.0], [0.96, 0.2, 2.0]], requires_grad=True)
    theta = torch.tensor([1.0, 1.0, 1.5], requires_grad=True)
    f = jumprelu_ref(pre, theta, 0.1)
    torch.testing.assert_close(f, torch.tensor([[0.0, 1.03, 2.0], [0.0, 0.0, 2.0]]))
    grad_pre, grad_theta = torch.autograd.grad(f.sum(), (pre, theta))
    torch.testing.assert_close(grad_pre, torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]))
    # -(theta / eps) per in-window element: 0.96 (col 0) and 1.03 (col 1) -> -10 each; col 2 none.
    torch.testing.assert_close(grad_theta, torch.tensor([-10.0, -10.0, 0.0]))
    h = step_ref(pre, torch.tensor([1.0, 1.0, 2.5], requires_grad=True), 0.1)
    torch.testing.assert_close(h, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    theta2 = torch.tensor([1.0, 1.0, 2.02], requires_grad=True)
    (grad_theta2,) = torch.autograd.grad(step_ref(pre, theta2, 0.1).sum(), (theta2,))
    # -(1 / eps) = -10 per in-window element: cols 0, 1 once each; col 2 twice (2.0 vs 2.02).
    torch.testing.assert_close(grad_theta2, torch.tensor([-10.0, -10.0, -20.0]))


def test_jumprelu_encode_reference_counts_l0_in_fp32() -> None:
    x = torch.eye(3, dtype=torch.bfloat16)
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [3.0, 3.0, 3.0]], dtype=torch.bfloat16)
    b = torch.zeros(3, dtype=torch.bfloat16)
    theta = torch.tensor([0.5, 2.5, 0.5])
    f, l0 = jumprelu_encode_ref(x, W, b, theta, 0.01)
    # pre = x W^T = W^T: token 0 -> [1, 0, 3], token 1 -> [0, 2, 3], token 2 -> [0, 0, 3]
    torch.testing.assert_close(f.float(), torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 3.0], [0.0, 0.0, 3.0]]))
    assert l0.dtype == torch.float32 and l0.tolist() == [2.0, 1.0, 1.0]


# ---- dispatch ----


def test_kernel_path_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAE_KERNELS", "auto")
    r = kernels.CPU_SPARSE_DECODE_MAX_DENSITY
    assert kernels.kernel_path("topk_decode", "cpu", k=16, d_sae=16384) == "cpu-sparse"
    assert kernels.kernel_path("topk_decode", "cpu", k=int(r * 1000) + 1, d_sae=1000) == "cpu-dense"
    assert kernels.kernel_path("topk_encode", "cpu", k=16, d_sae=16384) == "cpu-sparse"
    assert kernels.kernel_path("jumprelu", "cpu") == "eager"
    monkeypatch.setattr(kernels, "_triton_importable", lambda: True)
    assert kernels.kernel_path("topk_decode", "cuda", k=64, d_sae=16384) == "triton"
    monkeypatch.setattr(kernels, "_triton_importable", lambda: False)
    assert kernels.kernel_path("topk_decode", "cuda", k=64, d_sae=16384) == "eager"
    monkeypatch.setenv("SAE_KERNELS", "eager")
    monkeypatch.setattr(kernels, "_triton_importable", lambda: True)
    for op in ("topk_decode", "topk_encode", "jumprelu", "step", "jumprelu_encode"):
        for device in ("cpu", "cuda"):
            assert kernels.kernel_path(op, device, k=16, d_sae=16384) == "eager"


def _run_every_entry_point() -> dict[str, str]:
    """Call each entry point on small CPU tensors; return the autograd node type of each output."""
    idx, vals, W, _ = _decode_inputs(torch.float32)
    x, W_enc, b, _ = _encode_inputs(torch.float32)
    theta = torch.full((F,), 0.1, requires_grad=True)
    pre = torch.randn(B, F, requires_grad=True)
    outs = {
        "topk_decode": kernels.topk_decode(idx, vals, W),
        "topk_encode": kernels.topk_encode(x, W_enc, b, K)[0],
        "jumprelu": kernels.jumprelu(pre, theta, 0.01),
        "step": kernels.step(pre, theta, 0.01),
        "jumprelu_encode": kernels.jumprelu_encode(x, W_enc, b, theta, 0.01)[0],
    }
    for out in outs.values():
        out.float().sum().backward()
    return {name: type(out.grad_fn).__name__ for name, out in outs.items()}


def test_cpu_tensors_never_touch_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    # A CPU machine with a triton that cannot even be imported (sys.modules entry None makes `import` raise).
    monkeypatch.setenv("SAE_KERNELS", "auto")
    monkeypatch.setitem(sys.modules, "triton", None)
    for name in ("sae_cli.kernels.triton_topk", "sae_cli.kernels.triton_jumprelu"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    nodes = _run_every_entry_point()
    assert nodes["topk_decode"] == "SparseDecodeBackward"  # k / d_sae = 6 / 160 is below the crossover
    assert nodes["topk_encode"] == "SparseEncodeBackward"
    assert "sae_cli.kernels.triton_topk" not in sys.modules
    assert "sae_cli.kernels.triton_jumprelu" not in sys.modules


def test_env_switch_eager_runs_the_references(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAE_KERNELS", "eager")
    nodes = _run_every_entry_point()
    # The references' own autograd nodes: gather-sum, topk, the reference Functions, the composition.
    assert nodes == {
        "topk_decode": "SumBackward1",
        "topk_encode": "TopkBackward0",
        "jumprelu": "_JumpReLUBackward",
        "step": "_StepBackward",
        "jumprelu_encode": "_JumpReLUBackward",
    }
    assert not kernels.fast_paths_enabled()
    monkeypatch.setenv("SAE_KERNELS", "auto")
    assert kernels.fast_paths_enabled()


def test_entry_points_match_references_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAE_KERNELS", "auto")
    idx, vals, W, g = _decode_inputs(torch.float32)
    # Above the crossover (dense) and below it (sparse): both equal the reference.
    for width in (F, 4 * K):
        idx_w = idx % width
        W_w = W[:width]
        torch.testing.assert_close(kernels.topk_decode(idx_w, vals, W_w), topk_decode_ref(idx_w, vals, W_w))
    x, W_enc, b, _ = _encode_inputs(torch.float32)
    got, want = kernels.topk_encode(x, W_enc, b, K), topk_encode_ref(x, W_enc, b, K)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
