"""Triton kernels of the JumpReLU SAE (CUDA; the tests run them under TRITON_INTERPRET=1).

JumpReLU (Rajamanoharan et al. 2024, arXiv 2407.14435): f = pre * H(pre - theta), trained by straight-through
estimators with the rectangle kernel K(u) = 1[|u| < 1/2] and bandwidth eps (reference.py has the eager forms):

    df/dpre   = H(pre - theta)                      dH/dpre = 0 (the paper's pseudo-code)
    df/dtheta = -(theta / eps) K((pre - theta) / eps)    dH/dtheta = -(1 / eps) K((pre - theta) / eps)

Two levels of fusion:
- `jumprelu_fwd` / `step_fwd` and their backward: one elementwise pass over pre each; the theta gradient is
  reduced over the batch inside the kernel (per row-block partial sums, then a sum over the few blocks: no
  atomics, deterministic).
- `encode_*`: pre = x W_enc^T + b_enc with the threshold as the matmul's epilogue (or as one pass over a cuBLAS
  pre), writing f, the per-token L0 count and a 1-byte code per (token, latent) instead of keeping pre for the
  backward: bit 0 = active (pre > theta), bit 1 = inside the straight-through window |pre - theta| / eps < 1/2.
  Those two bits are everything both estimators need, so the backward reads B*F bytes instead of B*F*2-4.
All arithmetic is fp32 (pre is compared with an fp32 theta, as in the reference after type promotion).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_ACTIVE, _WINDOW = 1, 2


@triton.jit
def _threshold_bits(pre, theta, eps):
    active = pre > theta
    # (pre - theta) / eps exactly as the reference computes it (a multiply by 1/eps can differ by one ulp).
    window = tl.abs((pre - theta) / eps) < 0.5
    return active, window


@triton.jit
def _elementwise_fwd_kernel(
    pre_ptr, theta_ptr, out_ptr, B, F, STEP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr
):
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (offs_b[:, None] < B) & (offs_f[None, :] < F)
    ptrs = offs_b[:, None].to(tl.int64) * F + offs_f[None, :]
    pre = tl.load(pre_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    theta = tl.load(theta_ptr + offs_f, mask=offs_f < F, other=0.0).to(tl.float32)
    active = pre > theta[None, :]
    if STEP:
        out = active.to(tl.float32)
    else:
        out = tl.where(active, pre, 0.0)
    tl.store(out_ptr + ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _elementwise_bwd_kernel(
    pre_ptr,
    theta_ptr,
    grad_ptr,
    grad_pre_ptr,  # written only when not STEP
    partial_ptr,  # [cdiv(B, BLOCK_B), F] fp32
    B,
    F,
    eps,
    STEP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    mask = (offs_b[:, None] < B) & mask_f[None, :]
    ptrs = offs_b[:, None].to(tl.int64) * F + offs_f[None, :]
    pre = tl.load(pre_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    theta = tl.load(theta_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)
    active, window = _threshold_bits(pre, theta[None, :], eps)
    window = window & mask
    if STEP:
        scale = -1.0 / eps + tl.zeros_like(theta)
    else:
        scale = -theta / eps
        tl.store(
            grad_pre_ptr + ptrs, tl.where(active, grad, 0.0).to(grad_pre_ptr.dtype.element_ty), mask=mask
        )
    part = tl.sum(tl.where(window, grad, 0.0), axis=0) * scale
    tl.store(partial_ptr + pid_b.to(tl.int64) * F + offs_f, part, mask=mask_f)


@triton.jit
def _encode_epilogue(pre, theta_ptr, f_ptr, code_ptr, l0_ptr, offs_m, offs_n, B, F, eps):
    """Threshold a [BLOCK_M, BLOCK_N] tile of fp32 pre-activations: store f and the code, add the L0 counts."""
    mask_m = offs_m < B
    mask_n = offs_n < F
    mask = mask_m[:, None] & mask_n[None, :]
    theta = tl.load(theta_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    active, window = _threshold_bits(pre, theta[None, :], eps)
    active = active & mask
    ptrs = offs_m[:, None].to(tl.int64) * F + offs_n[None, :]
    tl.store(f_ptr + ptrs, tl.where(active, pre, 0.0).to(f_ptr.dtype.element_ty), mask=mask)
    code = active.to(tl.int8) + window.to(tl.int8) * 2
    tl.store(code_ptr + ptrs, code, mask=mask)
    # Counts are small integers: fp32 atomics add them exactly, so the result does not depend on the order.
    tl.atomic_add(l0_ptr + offs_m, tl.sum(active.to(tl.float32), axis=1), mask=mask_m)


@triton.jit
def _encode_epilogue_kernel(
    pre_ptr, theta_ptr, f_ptr, code_ptr, l0_ptr, B, F, eps, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr
):
    offs_m = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (offs_m[:, None] < B) & (offs_n[None, :] < F)
    pre = tl.load(pre_ptr + offs_m[:, None].to(tl.int64) * F + offs_n[None, :], mask=mask, other=0.0)
    _encode_epilogue(pre.to(tl.float32), theta_ptr, f_ptr, code_ptr, l0_ptr, offs_m, offs_n, B, F, eps)


@triton.jit
def _encode_matmul_kernel(
    x_ptr,  # [B, D], unit column stride
    w_ptr,  # [F, D], unit column stride
    b_ptr,  # [F]
    theta_ptr,  # [F]
    f_ptr,  # [B, F] contiguous
    code_ptr,  # [B, F] int8 contiguous
    l0_ptr,  # [B] fp32, zero-initialised
    B,
    F,
    D,
    stride_xb,
    stride_wf,
    eps,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share each column tile of W while it is in L2 (Triton's matmul tutorial).
    pid = tl.program_id(0)
    n_m = tl.cdiv(B, BLOCK_M)
    n_n = tl.cdiv(F, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    group_size = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % group_size
    pid_n = (pid % (GROUP_M * n_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xb
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wf
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_tile = tl.load(
            x_rows + offs_k[None, :], mask=(offs_m[:, None] < B) & (offs_k[None, :] < D), other=0.0
        )
        wt_tile = tl.load(
            w_cols + offs_k[:, None], mask=(offs_k[:, None] < D) & (offs_n[None, :] < F), other=0.0
        )
        if UPCAST_DOT:
            # Triton 3.9's interpreter multiplies bf16 tiles as their uint16 storage; fp32 tiles give the same
            # result as the GPU's bf16 dot (bf16 products are exact in fp32, accumulation is fp32 on both).
            x_tile = x_tile.to(tl.float32)
            wt_tile = wt_tile.to(tl.float32)
        acc = tl.dot(x_tile, wt_tile, acc, input_precision=INPUT_PRECISION)
    bias = tl.load(b_ptr + offs_n, mask=offs_n < F, other=0.0).to(tl.float32)
    _encode_epilogue(acc + bias[None, :], theta_ptr, f_ptr, code_ptr, l0_ptr, offs_m, offs_n, B, F, eps)


@triton.jit
def _code_bwd_kernel(
    code_ptr,  # [B, F] int8
    grad_f_ptr,  # [B, F]
    grad_l0_ptr,  # [B] fp32
    theta_ptr,
    grad_pre_ptr,  # [B, F]
    partial_ptr,  # [cdiv(B, BLOCK_B), F] fp32
    B,
    F,
    eps,
    BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    mask = (offs_b[:, None] < B) & mask_f[None, :]
    ptrs = offs_b[:, None].to(tl.int64) * F + offs_f[None, :]
    code = tl.load(code_ptr + ptrs, mask=mask, other=0)
    grad_f = tl.load(grad_f_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    grad_l0 = tl.load(grad_l0_ptr + offs_b, mask=offs_b < B, other=0.0)
    theta = tl.load(theta_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)
    active = (code & 1) != 0
    window = (code & 2) != 0
    tl.store(grad_pre_ptr + ptrs, tl.where(active, grad_f, 0.0).to(grad_pre_ptr.dtype.element_ty), mask=mask)
    # d/dtheta of (f * grad_f + H * grad_l0) = -(1/eps) K(.) (theta * grad_f + grad_l0)
    contrib = tl.where(window, theta[None, :] * grad_f + grad_l0[:, None], 0.0)
    tl.store(
        partial_ptr + pid_b.to(tl.int64) * F + offs_f, tl.sum(contrib, axis=0) * (-1.0 / eps), mask=mask_f
    )


def _tile(t: Tensor) -> tuple[int, int]:
    """Elementwise tile: 32 x 128 on a GPU; small under the interpreter (CPU tensors) so the tests stay fast."""
    return (32, 128) if t.is_cuda else (16, 64)


def _grid2(B: int, F: int, tile: tuple[int, int]) -> tuple[int, int]:
    return (triton.cdiv(B, tile[0]), triton.cdiv(F, tile[1]))


def threshold_fwd(pre_BF: Tensor, theta_F: Tensor, step: bool) -> Tensor:
    """f = pre * H(pre - theta) (step=False) or H(pre - theta) (step=True), in pre's dtype."""
    pre_BF, theta_F = pre_BF.contiguous(), theta_F.contiguous()
    B, F = pre_BF.shape
    out_BF = torch.empty_like(pre_BF)
    if pre_BF.numel():
        tile = _tile(pre_BF)
        _elementwise_fwd_kernel[_grid2(B, F, tile)](
            pre_BF, theta_F, out_BF, B, F, STEP=step, BLOCK_B=tile[0], BLOCK_F=tile[1]
        )
    return out_BF


def threshold_bwd(
    pre_BF: Tensor, theta_F: Tensor, grad_BF: Tensor, eps: float, step: bool
) -> tuple[Tensor | None, Tensor]:
    """(grad wrt pre or None for the step, grad wrt theta in fp32) of jumprelu/step, see the module docstring."""
    pre_BF, theta_F, grad_BF = pre_BF.contiguous(), theta_F.contiguous(), grad_BF.contiguous()
    B, F = pre_BF.shape
    tile = _tile(pre_BF)
    grid = _grid2(B, F, tile)
    grad_pre = None if step else torch.empty_like(pre_BF, dtype=grad_BF.dtype)
    partial = torch.zeros(grid[0], F, dtype=torch.float32, device=pre_BF.device)
    if pre_BF.numel():
        _elementwise_bwd_kernel[grid](
            pre_BF,
            theta_F,
            grad_BF,
            grad_pre if grad_pre is not None else partial,  # unused pointer for the step
            partial,
            B,
            F,
            float(eps),
            STEP=step,
            BLOCK_B=tile[0],
            BLOCK_F=tile[1],
        )
    return grad_pre, partial.sum(0)


def _matmul_config(x_BD: Tensor) -> dict:
    if not x_BD.is_cuda:  # the interpreter: tiny tiles, tl.dot needs at least 16
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, UPCAST_DOT=True)
    # A common H100 choice for bf16 GEMMs with a light epilogue; not tuned on hardware in this repository yet.
    block_k = 64 if x_BD.element_size() <= 2 else 32
    return dict(
        BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, UPCAST_DOT=False, num_warps=8, num_stages=3
    )


def encode_fwd(
    x_BD: Tensor, W_enc_FD: Tensor, b_enc_F: Tensor, theta_F: Tensor, eps: float, fuse_matmul: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(f [B, F] in x's dtype, L0 per token [B] fp32, code [B, F] int8) of pre = x W_enc^T + b_enc.

    fuse_matmul=True computes pre in the Triton matmul (fp32 accumulation, never rounded to x's dtype);
    False runs `x @ W_enc.T + b_enc` (the reference's expression, cuBLAS on a GPU) and thresholds in one pass."""
    B, F, D = x_BD.shape[0], W_enc_FD.shape[0], x_BD.shape[1]
    theta_F = theta_F.contiguous()
    f_BF = torch.empty(B, F, dtype=x_BD.dtype, device=x_BD.device)
    code_BF = torch.empty(B, F, dtype=torch.int8, device=x_BD.device)
    l0_B = torch.zeros(B, dtype=torch.float32, device=x_BD.device)
    if f_BF.numel() == 0:
        return f_BF, l0_B, code_BF
    if fuse_matmul:
        x_BD = x_BD if x_BD.stride(1) == 1 else x_BD.contiguous()
        W_enc_FD = W_enc_FD if W_enc_FD.stride(1) == 1 else W_enc_FD.contiguous()
        cfg = _matmul_config(x_BD)
        grid = (triton.cdiv(B, cfg["BLOCK_M"]) * triton.cdiv(F, cfg["BLOCK_N"]),)
        tf32 = x_BD.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
        _encode_matmul_kernel[grid](
            x_BD,
            W_enc_FD,
            b_enc_F.contiguous(),
            theta_F,
            f_BF,
            code_BF,
            l0_B,
            B,
            F,
            D,
            x_BD.stride(0),
            W_enc_FD.stride(0),
            float(eps),
            INPUT_PRECISION="tf32" if tf32 else "ieee",
            **cfg,
        )
    else:
        pre_BF = (x_BD @ W_enc_FD.T + b_enc_F).contiguous()
        tile = _tile(pre_BF)
        _encode_epilogue_kernel[_grid2(B, F, tile)](
            pre_BF, theta_F, f_BF, code_BF, l0_B, B, F, float(eps), BLOCK_B=tile[0], BLOCK_F=tile[1]
        )
    return f_BF, l0_B, code_BF


def encode_bwd_pre(
    code_BF: Tensor, theta_F: Tensor, grad_f_BF: Tensor, grad_l0_B: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """(grad wrt pre [B, F] in grad_f's dtype, grad wrt theta [F] fp32) from the saved code."""
    B, F = code_BF.shape
    grad_f_BF = grad_f_BF.contiguous()
    tile = _tile(code_BF)
    grid = _grid2(B, F, tile)
    grad_pre_BF = torch.empty_like(grad_f_BF)
    partial = torch.zeros(grid[0], F, dtype=torch.float32, device=code_BF.device)
    if code_BF.numel():
        _code_bwd_kernel[grid](
            code_BF,
            grad_f_BF,
            grad_l0_B.float().contiguous(),
            theta_F.contiguous(),
            grad_pre_BF,
            partial,
            B,
            F,
            float(eps),
            BLOCK_B=tile[0],
            BLOCK_F=tile[1],
        )
    return grad_pre_BF, partial.sum(0)


class TritonJumpReLU(torch.autograd.Function):
    """jumprelu_ref with both passes in one Triton kernel each."""

    @staticmethod
    def forward(ctx, pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.bandwidth = bandwidth
        return threshold_fwd(pre_BF, theta_F, step=False)

    @staticmethod
    def backward(ctx, grad_BF: Tensor):  # type: ignore[override]
        pre_BF, theta_F = ctx.saved_tensors
        grad_pre, grad_theta = threshold_bwd(pre_BF, theta_F, grad_BF, ctx.bandwidth, step=False)
        return grad_pre, grad_theta.to(theta_F.dtype), None


class TritonStep(torch.autograd.Function):
    """step_ref in Triton. The gradient wrt pre is None (zero, as in the reference) instead of a [B, F] zero tensor."""

    @staticmethod
    def forward(ctx, pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.bandwidth = bandwidth
        return threshold_fwd(pre_BF, theta_F, step=True)

    @staticmethod
    def backward(ctx, grad_BF: Tensor):  # type: ignore[override]
        pre_BF, theta_F = ctx.saved_tensors
        _, grad_theta = threshold_bwd(pre_BF, theta_F, grad_BF, ctx.bandwidth, step=True)
        return None, grad_theta.to(theta_F.dtype), None


class TritonJumpReLUEncode(torch.autograd.Function):
    """jumprelu_encode_ref: (f, L0 per token) of x, with the threshold fused into the encoder matmul (or its
    output pass) and a 1-byte code saved for backward instead of pre."""

    @staticmethod
    def forward(ctx, x_BD, W_enc_FD, b_enc_F, theta_F, bandwidth: float, fuse_matmul: bool):  # type: ignore[override]
        f_BF, l0_B, code_BF = encode_fwd(x_BD, W_enc_FD, b_enc_F, theta_F, bandwidth, fuse_matmul)
        ctx.save_for_backward(x_BD, W_enc_FD, theta_F, code_BF)
        ctx.bandwidth = bandwidth
        ctx.b_dtype = b_enc_F.dtype
        return f_BF, l0_B

    @staticmethod
    def backward(ctx, grad_f_BF: Tensor | None, grad_l0_B: Tensor | None):  # type: ignore[override]
        x_BD, W_enc_FD, theta_F, code_BF = ctx.saved_tensors
        B, F = code_BF.shape
        if grad_f_BF is None:
            grad_f_BF = torch.zeros(B, F, dtype=x_BD.dtype, device=x_BD.device)
        if grad_l0_B is None:
            grad_l0_B = torch.zeros(B, dtype=torch.float32, device=x_BD.device)
        grad_pre_BF, grad_theta_F = encode_bwd_pre(code_BF, theta_F, grad_f_BF, grad_l0_B, ctx.bandwidth)
        grad_pre_BF = grad_pre_BF.to(x_BD.dtype)
        needs = ctx.needs_input_grad
        grad_x = grad_pre_BF @ W_enc_FD if needs[0] else None
        grad_W = grad_pre_BF.T @ x_BD if needs[1] else None
        grad_b = grad_pre_BF.sum(0, dtype=torch.float32).to(ctx.b_dtype) if needs[2] else None
        grad_theta = grad_theta_F.to(theta_F.dtype) if needs[3] else None
        return grad_x, grad_W, grad_b, grad_theta, None, None
