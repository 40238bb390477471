"""Sparse training path of the threshold rules (JumpReLU, ReLU): only the encoder's forward matmul is dense.

After the nonlinearity the latents are sparse at the L0 a model trains at (32-64 of 4608), so the decoder, the
decoder's backward and the encoder's backward need only the (token, latent) pairs that carry gradient. They are
kept as a flat COO list in row-major order (`nonzero` of a [B, F] mask): rows_N, cols_N (int64), and the products
are embedding bags over it:

    combine    y[b]      = sum_{n: rows[n] = b} v[n] W[cols[n]]     embedding_bag, bags = tokens
    row_dots   out[n]    = W[cols[n]] . g[rows[n]]                   its per_sample_weights gradient
    scatter    G[f]      = sum_{n: cols[n] = f} v[n] X[rows[n]]      sort by latent, bags = latents

The support of a JumpReLU is {pre > theta} plus the rectangle window {|pre - theta| / eps < 1/2} (arXiv
2407.14435, eq. 11-12): entries in the window but below theta output 0 yet their output gradient feeds theta's
straight-through estimate, so they are kept with value 0 (they add nothing to the decode). ReLU is theta = 0
without the theta gradient. Above a density of `CPU_SPARSE_*_MAX_DENSITY` (ReLU at init fires on half the
latents) the caller takes a dense path instead (`kernels.threshold_encode_decode`, `threshold_dense`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _offsets(sorted_keys_N: Tensor, n_bags: int) -> Tensor:
    return torch.searchsorted(sorted_keys_N, torch.arange(n_bags, device=sorted_keys_N.device))


class Pairs:
    """The (token, latent) pairs of one step, row-major (rows_N ascending), with the bag offsets by token and the
    latent-major order computed once and shared by every product over them: the decoder's and the encoder's
    weight gradients both scatter by latent, so the stable sort by latent runs once per step, not once each."""

    def __init__(self, rows_N: Tensor, cols_N: Tensor, n_rows: int, n_cols: int) -> None:
        self.rows_N, self.cols_N, self.n_rows, self.n_cols = rows_N, cols_N, n_rows, n_cols
        self._row_offsets: Tensor | None = None
        self._by_col: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def row_offsets(self) -> Tensor:
        if self._row_offsets is None:
            self._row_offsets = _offsets(self.rows_N, self.n_rows)
        return self._row_offsets

    @classmethod
    def of_mask(cls, mask_BF: Tensor, max_density: float) -> Pairs | None:
        """The True entries of a [B, F] mask, or None when they are more than `max_density` of it (the caller
        then takes its dense path)."""
        if int(mask_BF.count_nonzero()) > max_density * mask_BF.numel():  # a count is cheaper than nonzero
            return None
        rows_N, cols_N = mask_BF.nonzero(as_tuple=True)  # row-major: rows sorted
        return cls(rows_N, cols_N, mask_BF.shape[0], mask_BF.shape[1])

    def fired(self, vals_N: Tensor) -> Tensor:
        """[n_cols]: how many rows each latent is non-zero on."""
        return torch.bincount(self.cols_N[vals_N.detach() != 0], minlength=self.n_cols)

    def by_col(self) -> tuple[Tensor, Tensor, Tensor]:
        """(perm_N, rows in latent-major order, bag offsets by latent); a stable sort keeps each latent's pairs
        in token order (deterministic sums)."""
        if self._by_col is None:
            sorted_cols, perm = self.cols_N.sort(stable=True)
            self._by_col = (perm, self.rows_N[perm], _offsets(sorted_cols, self.n_cols))
        return self._by_col


def coo_combine(pairs: Pairs, vals_N: Tensor, W_FD: Tensor) -> Tensor:
    """y[b] = sum over n with rows[n] = b of vals[n] * W[cols[n]]: [n_rows, D]."""
    return F.embedding_bag(
        pairs.cols_N, W_FD, pairs.row_offsets, mode="sum", per_sample_weights=vals_N.to(W_FD.dtype)
    )


def coo_row_dots(pairs: Pairs, W_FD: Tensor, g_BD: Tensor) -> Tensor:
    """out[n] = W[cols[n]] . g[rows[n]] ([N]) through embedding_bag's fused per_sample_weights backward (no
    [N, D] intermediate; cpu_sparse.row_dots does the same for a padded [B, K] list)."""
    with torch.enable_grad():
        ones_N = torch.ones(pairs.cols_N.shape, dtype=g_BD.dtype, device=g_BD.device, requires_grad=True)
        bag_BD = F.embedding_bag(
            pairs.cols_N,
            W_FD.detach().to(g_BD.dtype),
            pairs.row_offsets,
            mode="sum",
            per_sample_weights=ones_N,
        )
        (out_N,) = torch.autograd.grad(bag_BD, ones_N, g_BD)
    return out_N


def coo_scatter(pairs: Pairs, vals_N: Tensor, X_BD: Tensor) -> Tensor:
    """G[f] = sum over n with cols[n] = f of vals[n] * X[rows[n]]: [n_cols, D]."""
    perm, rows_by_col, col_offsets = pairs.by_col()
    return F.embedding_bag(
        rows_by_col, X_BD, col_offsets, mode="sum", per_sample_weights=vals_N[perm].to(X_BD.dtype)
    )


class CooDecode(torch.autograd.Function):
    """x_hat (no bias) = combine(pairs, vals, W_dec); gradients to vals and W_dec."""

    @staticmethod
    def forward(ctx, pairs: Pairs, vals_N: Tensor, W_dec_FD: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(vals_N, W_dec_FD)
        ctx.pairs = pairs
        return coo_combine(pairs, vals_N, W_dec_FD)

    @staticmethod
    def backward(ctx, grad_BD: Tensor):  # type: ignore[override]
        vals_N, W_dec_FD = ctx.saved_tensors
        pairs = ctx.pairs
        grad_vals = grad_W = None
        if ctx.needs_input_grad[1]:
            grad_vals = coo_row_dots(pairs, W_dec_FD, grad_BD).to(vals_N.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = coo_scatter(pairs, vals_N, grad_BD.to(W_dec_FD.dtype))
        return None, grad_vals, grad_W


class ThresholdEncode(torch.autograd.Function):
    """(vals_N, l0_B) of f = pre * 1[pre > theta] on the support (rows_N, cols_N), given the pre-activations
    pre = x W_enc^T + b_enc (computed by the caller, passed detached). Backward: the pre gradient is
    grad_vals * 1[pre > theta] on the support only, so dL/dx, dL/dW_enc and dL/db_enc are sparse products;
    theta (when given) gets the rectangle-kernel straight-through terms of both f and L0 = sum_F H(pre - theta)
    (kernels.reference._JumpReLU and _Step), summed per latent over the window pairs."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x_BD: Tensor,
        W_enc_FD: Tensor,
        b_enc_F: Tensor,
        theta_F: Tensor | None,
        bandwidth: float,
        pre_BF: Tensor,
        pairs: Pairs,
    ) -> tuple[Tensor, Tensor]:
        rows_N, cols_N = pairs.rows_N, pairs.cols_N
        pre_N = pre_BF[rows_N, cols_N]
        act_N = pre_N > 0 if theta_F is None else pre_N > theta_F[cols_N]
        # every active pair is in the support: count them there, not over [B, F]
        l0_B = torch.bincount(rows_N[act_N], minlength=x_BD.shape[0]).to(torch.float32)
        vals_N = pre_N * act_N
        ctx.save_for_backward(x_BD, W_enc_FD, pre_N, act_N, theta_F)
        ctx.pairs = pairs
        ctx.bandwidth = bandwidth
        ctx.b_dtype = b_enc_F.dtype
        ctx.has_theta = theta_F is not None
        if theta_F is None:
            ctx.mark_non_differentiable(l0_B)
        return vals_N, l0_B

    @staticmethod
    def backward(ctx, grad_vals_N: Tensor, grad_l0_B: Tensor | None):  # type: ignore[override]
        x_BD, W_enc_FD, pre_N, act_N, theta_F = ctx.saved_tensors
        pairs = ctx.pairs
        rows_N, cols_N, n_lat = pairs.rows_N, pairs.cols_N, W_enc_FD.shape[0]
        if grad_vals_N is None:
            grad_vals_N = pre_N.new_zeros(pre_N.shape)
        g_N = grad_vals_N * act_N
        grad_x = grad_W = grad_b = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_x = coo_combine(pairs, g_N, W_enc_FD).to(x_BD.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = coo_scatter(pairs, g_N, x_BD.to(W_enc_FD.dtype))
        if ctx.needs_input_grad[2]:
            grad_b = (
                g_N.new_zeros(n_lat, dtype=torch.float32).index_add_(0, cols_N, g_N.float()).to(ctx.b_dtype)
            )
        if ctx.has_theta and ctx.needs_input_grad[3]:
            eps = ctx.bandwidth
            theta_N = theta_F[cols_N]
            win_N = ((pre_N - theta_N) / eps).abs() < 0.5
            # d f / d theta = -(theta / eps) K(.), d H / d theta = -(1 / eps) K(.) (reference._JumpReLU, _Step)
            per_N = -(theta_N / eps) * grad_vals_N
            if grad_l0_B is not None:
                per_N = per_N - grad_l0_B[rows_N] / eps
            per_N = torch.where(win_N, per_N, torch.zeros_like(per_N))
            grad_theta = torch.zeros_like(theta_F, dtype=torch.float32).index_add_(0, cols_N, per_N.float())
            grad_theta = grad_theta.to(theta_F.dtype)
        return grad_x, grad_W, grad_b, grad_theta, None, None, None


def support(pre_BF: Tensor, theta_F: Tensor | None, bandwidth: float) -> Tensor:
    """[B, F] bool: the pairs that carry gradient (active, plus theta's rectangle window)."""
    if theta_F is None:
        return pre_BF > 0
    # One compare instead of five passes: pre > theta - eps contains the active pairs and the whole window
    # (|pre - theta| < eps / 2) with a margin of eps / 2 against rounding; the extra pairs below the window have
    # value 0 and get no gradient (ThresholdEncode recomputes the window on the support with the reference's
    # expression).
    return pre_BF > theta_F - bandwidth


class GatedEncode(torch.autograd.Function):
    """Gated SAE (arXiv 2404.16014) on the support {pi_gate > 0} (rows_N, cols_N), given proj = (x - b_dec) W^T
    (passed detached): returns f_N = ReLU(pi_mag) and ReLU(pi_gate)_N = pi_gate on the support, with
    pi_gate = proj + b_gate and pi_mag = exp(r_mag) proj + b_mag. f is 0 off the support (the gate is closed),
    ReLU(pi_gate) too, and neither passes gradient there, so the backward is sparse: the proj gradient is
    dL/dgate_pos + dL/df 1[pi_mag > 0] exp(r_mag), then dL/dx and dL/dW as COO products."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x_BD: Tensor,
        W_FD: Tensor,
        b_gate_F: Tensor,
        r_mag_F: Tensor,
        b_mag_F: Tensor,
        proj_BF: Tensor,
        pairs: Pairs,
    ) -> tuple[Tensor, Tensor]:
        cols_N = pairs.cols_N
        proj_N = proj_BF[pairs.rows_N, cols_N]
        scale_N = r_mag_F.exp()[cols_N]
        mag_N = proj_N * scale_N + b_mag_F[cols_N]
        gate_N = proj_N + b_gate_F[cols_N]
        f_N = torch.relu(mag_N)
        ctx.save_for_backward(x_BD, W_FD, proj_N, scale_N, mag_N, r_mag_F)
        ctx.pairs = pairs
        return f_N, gate_N

    @staticmethod
    def backward(ctx, grad_f_N: Tensor | None, grad_gate_N: Tensor | None):  # type: ignore[override]
        x_BD, W_FD, proj_N, scale_N, mag_N, r_mag_F = ctx.saved_tensors
        pairs = ctx.pairs
        cols_N, n_lat = pairs.cols_N, W_FD.shape[0]
        g_mag_N = grad_f_N * (mag_N > 0) if grad_f_N is not None else torch.zeros_like(proj_N)
        g_gate_N = grad_gate_N if grad_gate_N is not None else torch.zeros_like(proj_N)
        g_proj_N = g_gate_N + g_mag_N * scale_N

        def per_latent(v_N: Tensor) -> Tensor:
            return torch.zeros(n_lat, dtype=torch.float32).index_add_(0, cols_N, v_N.float())

        grad_x = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_x = coo_combine(pairs, g_proj_N, W_FD).to(x_BD.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = coo_scatter(pairs, g_proj_N, x_BD.to(W_FD.dtype))
        grad_b_gate = per_latent(g_gate_N).to(W_FD.dtype) if ctx.needs_input_grad[2] else None
        grad_r = (
            per_latent(g_mag_N * proj_N).to(r_mag_F.dtype) * r_mag_F.exp()
            if ctx.needs_input_grad[3]
            else None
        )
        grad_b_mag = per_latent(g_mag_N).to(W_FD.dtype) if ctx.needs_input_grad[4] else None
        return grad_x, grad_W, grad_b_gate, grad_r, grad_b_mag, None, None
