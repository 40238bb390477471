"""Kernels with one entry point each. Fast paths run only where they are valid (Triton: CUDA tensors only, and only
if triton imports; CPU tensors never touch Triton); `SAE_KERNELS=eager` turns every fast path off. The eager
references live in `reference.py`; docs/kernels.md describes each kernel and the dispatch rule.

    op                CUDA + triton                     CPU                                    other / eager
    topk_decode       triton sparse decoder             embedding_bag if k/d_sae <= r_dec,     reference
                                                        else dense scatter + matmul
    topk_encode       matmul + topk, triton sparse bwd  same, embedding_bag sparse backward    reference
                                                        if k/d_sae <= r_enc, else reference
    jumprelu, step    triton elementwise fwd + bwd      reference                              reference
    jumprelu_encode   matmul + triton threshold pass    reference                              reference
    threshold_encode_decode  reference                  COO sparse decode + encoder backward   reference
                                                        (sparse_latents) if the density of
                                                        pairs carrying gradient <= r_enc,
                                                        else one fused dense pass
                                                        (threshold_dense); fp32, no autocast
    gated_encode_decode      reference                  the same COO sparse path, else one     reference
                                                        fused dense pass (fp32, no autocast)
    batch_topk_encode_decode COO sparse on CPU (the caller checks sparse_latents_ok)
    flat_topk         topk                              sampled cut + top-k of the candidates  topk
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
from torch import Tensor

from . import cpu_sparse
from .reference import (
    jumprelu_encode_ref,
    jumprelu_ref,
    step_ref,
    topk_decode_dense,
    topk_decode_ref,
    topk_encode_ref,
)
from .sparse_latents import CooDecode, GatedEncode, Pairs, ThresholdEncode, support
from .sparse_topk import sparse_topk_decode, sparse_topk_encode
from .threshold_dense import GatedDense, ThresholdDense

logger = logging.getLogger(__name__)

# Crossovers measured on the 2-core CPU with scripts/bench_kernels.py (d_in 576, batch 4096, fp32, forward +
# backward; docs/benchmarks.md, "Kernels"): sparse decode / encoder backward were faster up to k/d_sae = 0.167
# (1.06x / 1.09x) and slower at 0.222 (0.73x / 0.97x) at d_sae 4608, 1.48x / 1.24x faster at 0.111 and 0.91x /
# 0.99x at 0.222 at d_sae 1152. Take the sparse paths up to a density of 0.15, a little below both crossovers.
CPU_SPARSE_DECODE_MAX_DENSITY = 0.15
CPU_SPARSE_ENCODE_MAX_DENSITY = 0.15


def fast_paths_enabled() -> bool:
    """False when the environment says SAE_KERNELS=eager (every entry point then runs its eager reference)."""
    return os.environ.get("SAE_KERNELS", "auto").strip().lower() != "eager"


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install that fails at import
        logger.info("triton is not importable (%s); CUDA tensors use the eager kernels", exc)
        return False
    return True


def kernel_path(op: str, device: torch.device | str, k: int = 0, d_sae: int = 1) -> str:
    """Which implementation an entry point runs for tensors on `device` (for logs and tests):
    "eager" (the reference), "triton", "cpu-sparse" or "cpu-dense"."""
    device = torch.device(device)
    if not fast_paths_enabled():
        return "eager"
    if device.type == "cuda":
        return "triton" if _triton_importable() else "eager"
    if device.type == "cpu" and op in ("topk_decode", "topk_encode"):
        limit = CPU_SPARSE_DECODE_MAX_DENSITY if op == "topk_decode" else CPU_SPARSE_ENCODE_MAX_DENSITY
        if k / max(d_sae, 1) <= limit:
            return "cpu-sparse"
        return "cpu-dense" if op == "topk_decode" else "eager"
    return "eager"


def topk_encode(x_BD: Tensor, W_enc_FD: Tensor, b_enc_F: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """ReLU(TopK(x W_enc^T + b_enc)) as (values [B, k], indices [B, k]); the backward touches only the selected
    latents on the fast paths."""
    path = kernel_path("topk_encode", x_BD.device, k, W_enc_FD.shape[0]) if x_BD.dim() == 2 else "eager"
    if path == "triton":
        from . import triton_topk

        return sparse_topk_encode(x_BD, W_enc_FD, b_enc_F, k, triton_topk)
    if path == "cpu-sparse":
        return sparse_topk_encode(x_BD, W_enc_FD, b_enc_F, k, cpu_sparse)
    return topk_encode_ref(x_BD, W_enc_FD, b_enc_F, k)


def topk_decode(idx_BK: Tensor, vals_BK: Tensor, W_dec_FD: Tensor) -> Tensor:
    """x_hat[b] = sum_j vals[b, j] * W_dec[idx[b, j]] (no bias)."""
    k = idx_BK.shape[-1]
    path = kernel_path("topk_decode", W_dec_FD.device, k, W_dec_FD.shape[0]) if idx_BK.dim() == 2 else "eager"
    if path == "triton":
        from . import triton_topk

        return sparse_topk_decode(idx_BK, vals_BK, W_dec_FD, triton_topk)
    if path == "cpu-sparse":
        return sparse_topk_decode(idx_BK, vals_BK, W_dec_FD, cpu_sparse)
    if path == "cpu-dense":
        return topk_decode_dense(idx_BK, vals_BK, W_dec_FD)
    return topk_decode_ref(idx_BK, vals_BK, W_dec_FD)


def jumprelu(pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    """f = pre * H(pre - theta) with the straight-through gradient to theta."""
    if pre_BF.dim() == 2 and kernel_path("jumprelu", pre_BF.device) == "triton":
        from .triton_jumprelu import TritonJumpReLU

        return TritonJumpReLU.apply(pre_BF, theta_F, bandwidth)
    return jumprelu_ref(pre_BF, theta_F, bandwidth)


def step(pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    """H(pre - theta) with the straight-through gradient to theta (for the L0 penalty)."""
    if pre_BF.dim() == 2 and kernel_path("step", pre_BF.device) == "triton":
        from .triton_jumprelu import TritonStep

        return TritonStep.apply(pre_BF, theta_F, bandwidth)
    return step_ref(pre_BF, theta_F, bandwidth)


def jumprelu_encode(
    x_BD: Tensor,
    W_enc_FD: Tensor,
    b_enc_F: Tensor,
    theta_F: Tensor,
    bandwidth: float,
    *,
    fuse_matmul: bool = False,
) -> tuple[Tensor, Tensor]:
    """(f [B, F], L0 per token [B] fp32) with f = jumprelu(x W_enc^T + b_enc, theta) and L0 = sum_F step(...),
    both with the straight-through gradients (theta gets both). On CUDA the threshold runs as one pass over the
    pre-activations (fuse_matmul=True: inside a Triton matmul; not yet measured against cuBLAS, so off by
    default) and backward keeps 1 byte per (token, latent) instead of pre."""
    if x_BD.dim() == 2 and kernel_path("jumprelu_encode", x_BD.device) == "triton":
        from .triton_jumprelu import TritonJumpReLUEncode

        return TritonJumpReLUEncode.apply(x_BD, W_enc_FD, b_enc_F, theta_F, bandwidth, fuse_matmul)
    return jumprelu_encode_ref(x_BD, W_enc_FD, b_enc_F, theta_F, bandwidth)


def sparse_latents_ok(x_BD: Tensor, *weights: Tensor) -> bool:
    """Whether the COO latent paths (`sparse_latents`) may run: fast paths on, CPU, a 2-D batch, fp32 throughout
    and no autocast (the dense references keep every other case, CUDA included)."""
    return (
        fast_paths_enabled()
        and x_BD.device.type == "cpu"
        and x_BD.dim() == 2
        and all(t.dtype == torch.float32 for t in (x_BD, *weights))
        and not torch.is_autocast_enabled(x_BD.device.type)
    )


def top_candidates(v_N: Tensor, n: int, row_len: int = 1) -> Tensor | None:
    """Indices of a short list of entries of a 1-D tensor that holds its n largest: every entry at or above a cut
    estimated from a strided sample (stride coprime with `row_len`, so every column is sampled) and set 25 % low.
    None when the whole tensor should be taken instead: fast paths off, not CPU, n small (< 4,000) or a large share
    of the entries, or fewer than n entries at or above the cut. Exact: when at least n entries are >= the cut,
    all n largest are among them."""
    N = v_N.numel()
    stride = max(1, min(64, n // 1000))
    while math.gcd(stride, row_len) != 1:
        stride += 1
    if not fast_paths_enabled() or v_N.device.type != "cpu" or stride < 4 or n * 4 > N:
        return None
    sample = v_N[::stride]
    n_sample = min(sample.numel(), math.ceil(n / stride * 1.25))
    cut = sample.topk(n_sample, sorted=False).values.min()
    cand_C = (v_N >= cut).nonzero().squeeze(1)
    return cand_C if cand_C.numel() >= n else None


def flat_topk(v_N: Tensor, n: int, row_len: int = 1) -> tuple[Tensor, Tensor]:
    """(values, indices) of the n largest entries of a 1-D tensor, unsorted: the same entries as
    `v_N.topk(n, sorted=False)` up to the order and which of equal values at the cut is taken.

    torch's CPU topk over a long vector with a large n is slow (2.0 s for n = 131,072 of 18.9M, 4 ms over 164k
    candidates; 2-core CPU, loaded). So on CPU the top-k runs over `top_candidates` when there is such a list."""
    cand_C = top_candidates(v_N, n, row_len)
    if cand_C is None:
        return v_N.topk(n, sorted=False)
    vals, j = v_N[cand_C].topk(n, sorted=False)
    return vals, cand_C[j]


def batch_topk_encode_decode(
    x_in_BD: Tensor, W_enc_FD: Tensor, b_enc_F: Tensor, n_keep: int, W_dec_FD: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchTopK's training pass without AuxK: keep the n_keep largest entries of ReLU(x_in W_enc^T + b_enc) over
    the whole [B, F] matrix (the same flat top-k as the variant's dense `select`, so the same pairs); returns
    (f W_dec [B, D] without bias, the kept values [n_keep] detached (for the threshold cut-off), fired count per
    latent [F]). Everything after the encoder matmul and the selection runs on the kept pairs: decode and
    encoder backward as COO products (`sparse_latents`). The caller checks `sparse_latents_ok` and takes its
    dense path otherwise (and whenever the AuxK term needs the full pre-activations)."""
    pre_BF = x_in_BD @ W_enc_FD.T + b_enc_F
    n_lat = W_enc_FD.shape[0]
    with torch.no_grad():
        vals_N, idx_N = flat_topk(torch.relu(pre_BF).flatten(), n_keep, row_len=n_lat)
        idx_N = idx_N.sort().values  # row-major, as the bags need
        pairs = Pairs(idx_N // n_lat, idx_N % n_lat, x_in_BD.shape[0], n_lat)
    f_N, _ = ThresholdEncode.apply(x_in_BD, W_enc_FD, b_enc_F, None, 0.0, pre_BF.detach(), pairs)
    x_hat_BD = CooDecode.apply(pairs, f_N, W_dec_FD)
    return x_hat_BD, vals_N, pairs.fired(f_N)


def gated_encode_decode(
    x_in_BD: Tensor,
    W_FD: Tensor,
    b_gate_F: Tensor,
    r_mag_F: Tensor,
    b_mag_F: Tensor,
    W_dec_FD: Tensor,
    weight_F: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gated SAE training pass (arXiv 2404.16014, weight tying): with proj = x_in W^T, f = 1[proj + b_gate > 0]
    ReLU(exp(r_mag) proj + b_mag). Returns (f W_dec, sum_F ReLU(gate) weight_F averaged over tokens,
    ReLU(gate) sg(W_dec), fired count per latent [F]); both products without bias. On CPU fp32 with at most
    CPU_SPARSE_ENCODE_MAX_DENSITY of the gates open, everything after the matmul runs on the open gates
    (`sparse_latents.GatedEncode`), with more one fused dense pass (`threshold_dense.GatedDense`); elsewhere
    the dense reference (`gated_encode_decode_ref`)."""
    proj_BF = x_in_BD @ W_FD.T
    if sparse_latents_ok(x_in_BD, W_FD, b_gate_F, r_mag_F, b_mag_F, W_dec_FD):
        with torch.no_grad():
            pairs = Pairs.of_mask((proj_BF + b_gate_F) > 0, CPU_SPARSE_ENCODE_MAX_DENSITY)
        if pairs is not None:
            n = x_in_BD.shape[0]
            f_N, gate_N = GatedEncode.apply(
                x_in_BD, W_FD, b_gate_F, r_mag_F, b_mag_F, proj_BF.detach(), pairs
            )
            x_hat_BD = CooDecode.apply(pairs, f_N, W_dec_FD)
            sparsity = (gate_N * weight_F[pairs.cols_N]).sum() / n
            x_frozen_BD = CooDecode.apply(pairs, gate_N, W_dec_FD.detach())
            return x_hat_BD, sparsity, x_frozen_BD, pairs.fired(f_N)
        # too many open gates for the sparse path (init): one fused dense pass (threshold_dense)
        acts_BF, gate_pos_BF, fired_F = GatedDense.apply(proj_BF, b_gate_F, r_mag_F, b_mag_F)
        sparsity = (gate_pos_BF @ weight_F).mean()
        return acts_BF @ W_dec_FD, sparsity, gate_pos_BF @ W_dec_FD.detach(), fired_F
    return _gated_dense(proj_BF, b_gate_F, r_mag_F, b_mag_F, W_dec_FD, weight_F)


def gated_encode_decode_ref(
    x_in_BD: Tensor,
    W_FD: Tensor,
    b_gate_F: Tensor,
    r_mag_F: Tensor,
    b_mag_F: Tensor,
    W_dec_FD: Tensor,
    weight_F: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dense reference of `gated_encode_decode`."""
    return _gated_dense(x_in_BD @ W_FD.T, b_gate_F, r_mag_F, b_mag_F, W_dec_FD, weight_F)


def _gated_dense(
    proj_BF: Tensor, b_gate_F: Tensor, r_mag_F: Tensor, b_mag_F: Tensor, W_dec_FD: Tensor, weight_F: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gate_BF, mag_BF = proj_BF + b_gate_F, proj_BF * r_mag_F.exp() + b_mag_F
    acts_BF = (gate_BF > 0) * torch.relu(mag_BF)
    gate_pos_BF = torch.relu(gate_BF)
    sparsity = (gate_pos_BF * weight_F).sum(-1).mean()
    fired_F = (acts_BF != 0).sum(0).detach()
    return acts_BF @ W_dec_FD, sparsity, gate_pos_BF @ W_dec_FD.detach(), fired_F


def threshold_encode_decode_ref(
    x_BD: Tensor,
    W_enc_FD: Tensor,
    b_enc_F: Tensor,
    theta_F: Tensor | None,
    bandwidth: float,
    W_dec_FD: Tensor,
    weight_F: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Dense reference of `threshold_encode_decode`."""
    pre_BF = x_BD @ W_enc_FD.T + b_enc_F
    return _threshold_dense(pre_BF, theta_F, bandwidth, W_dec_FD, weight_F)


def _threshold_dense(
    pre_BF: Tensor, theta_F: Tensor | None, bandwidth: float, W_dec_FD: Tensor, weight_F: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    if theta_F is None:
        acts_BF = torch.relu(pre_BF)
        l0_B = (acts_BF > 0).sum(-1, dtype=torch.float32)
    else:
        acts_BF = jumprelu(pre_BF, theta_F, bandwidth)  # Triton on CUDA, else the reference
        # fp32 sum: under bf16 autocast a bf16 count is not exact beyond 256
        l0_B = step(pre_BF, theta_F, bandwidth).sum(-1, dtype=torch.float32)
    x_hat_BD = acts_BF @ W_dec_FD
    l1 = (acts_BF * weight_F).sum(-1).mean() if weight_F is not None else None
    return x_hat_BD, l0_B, l1, (acts_BF != 0).sum(0).detach()


def threshold_encode_decode(
    x_BD: Tensor,
    W_enc_FD: Tensor,
    b_enc_F: Tensor,
    theta_F: Tensor | None,
    bandwidth: float,
    W_dec_FD: Tensor,
    weight_F: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """One training pass of a threshold rule: f = pre * 1[pre > theta] with pre = x W_enc^T + b_enc (JumpReLU with
    its straight-through theta gradients; theta_F=None: ReLU, no theta). Returns (f W_dec [B, D] without the
    decoder bias, L0 per token [B] fp32 (with theta's straight-through gradient for JumpReLU; detached for
    ReLU), sum_F f * weight_F averaged over tokens (None without weight_F), fired count per latent [F]).

    On CPU fp32 without autocast, when the pairs carrying gradient are at most CPU_SPARSE_ENCODE_MAX_DENSITY of
    [B, F], everything after the encoder's forward matmul runs on those pairs only (`sparse_latents`), and above
    that density one fused dense pass (`threshold_dense`); on other devices and with SAE_KERNELS=eager, the
    dense reference (`threshold_encode_decode_ref`)."""
    if not sparse_latents_ok(x_BD, W_enc_FD, b_enc_F, W_dec_FD):
        return threshold_encode_decode_ref(x_BD, W_enc_FD, b_enc_F, theta_F, bandwidth, W_dec_FD, weight_F)
    pre_BF = torch.addmm(b_enc_F, x_BD, W_enc_FD.T)  # bias fused into the matmul: one pass less over [B, F]
    with torch.no_grad():
        pairs = Pairs.of_mask(support(pre_BF, theta_F, bandwidth), CPU_SPARSE_ENCODE_MAX_DENSITY)
    if pairs is None:  # too many pairs for the sparse path (init): one fused dense pass (threshold_dense)
        acts_BF, l0_B, active_BF = ThresholdDense.apply(pre_BF, theta_F, bandwidth)
        l1 = (acts_BF @ weight_F).mean() if weight_F is not None else None
        # a bool count as uint8 into int32 is twice as fast as the bool sum (2-core CPU, [4096, 4608])
        return acts_BF @ W_dec_FD, l0_B, l1, active_BF.view(torch.uint8).sum(0, dtype=torch.int32).long()
    vals_N, l0_B = ThresholdEncode.apply(x_BD, W_enc_FD, b_enc_F, theta_F, bandwidth, pre_BF.detach(), pairs)
    x_hat_BD = CooDecode.apply(pairs, vals_N, W_dec_FD)
    l1 = (vals_N * weight_F[pairs.cols_N]).sum() / x_BD.shape[0] if weight_F is not None else None
    return x_hat_BD, l0_B, l1, pairs.fired(vals_N)


__all__ = [
    "fast_paths_enabled",
    "flat_topk",
    "gated_encode_decode",
    "gated_encode_decode_ref",
    "jumprelu",
    "jumprelu_encode",
    "kernel_path",
    "batch_topk_encode_decode",
    "sparse_latents_ok",
    "step",
    "top_candidates",
    "threshold_encode_decode",
    "threshold_encode_decode_ref",
    "topk_decode",
    "topk_encode",
]
