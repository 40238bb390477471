"""Pieces several variants share: the auxiliary reconstruction of the residual (AuxK and aux_zipf), the
decoder-bias init from data, and the running threshold that gives batch-level rules a batch-independent
inference rule. No variant is registered here."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels


@torch.no_grad()
def geometric_median(x_BD: Tensor, iters: int = 50, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm; OpenAI (arXiv 2406.04093, sec. A.1) initialise b_dec to the geometric median."""
    x_BD = x_BD.float()
    m_D = x_BD.mean(0)
    for _ in range(iters):
        w_B = 1.0 / (x_BD - m_D).norm(dim=1).clamp_min(1e-8)
        new_D = (w_B[:, None] * x_BD).sum(0) / w_B.sum()
        done = (new_D - m_D).norm() <= tol * m_D.norm().clamp_min(1e-8)
        m_D = new_D
        if done:
            break
    return m_D


@torch.no_grad()
def init_b_dec(b_dec_D: Tensor, x_BD: Tensor, how: str) -> None:
    """Set the decoder bias from a data sample: "median" (geometric), "mean" or "zero"."""
    if how == "median":
        b_dec_D.copy_(geometric_median(x_BD))
    elif how == "mean":
        b_dec_D.copy_(x_BD.float().mean(0))
    elif how == "zero":
        b_dec_D.zero_()
    else:
        raise ValueError(f"b_dec_init must be 'median', 'mean' or 'zero', got {how!r}")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """One-line error for an option outside its set of values."""
    if value not in allowed:
        raise ValueError(f"option {name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _residual_fvu(idx_BK: Tensor, vals_BK: Tensor, W_dec_FD: Tensor, residual_BD: Tensor) -> Tensor:
    """sum_B ||e - e_hat||^2 / sum_B ||e - mean_B(e)||^2 with e_hat = sparse (idx, vals) @ W_dec, no bias."""
    e_hat_BD = kernels.topk_decode(idx_BK, vals_BK, W_dec_FD)
    residual_BD = residual_BD.detach()
    total = (residual_BD - residual_BD.mean(0)).pow(2).sum().clamp_min(1e-12)
    return (e_hat_BD - residual_BD).pow(2).sum() / total


def aux_residual_loss(
    x_in_BD: Tensor,
    W_enc_FD: Tensor,
    b_enc_F: Tensor,
    W_dec_FD: Tensor,
    eligible_F: Tensor | None,
    residual_BD: Tensor,
    k_aux: int,
) -> Tensor:
    """Auxiliary reconstruction of the detached residual e = x - x_hat by the eligible latents only
    (AuxK, arXiv 2406.04093 sec. 2.4; aux_zipf generalises "dead" to "under-used").

    e_hat = TopK_{k_aux}(ReLU(pre-activations of eligible latents)) @ W_dec (no bias);
    loss = sum_B ||e - e_hat||^2 / sum_B ||e - mean_B(e)||^2 (the FVU of the residual, as sparsify and OpenAI's
    normalised MSE), so alpha = 1/32 has the paper's meaning. Only the eligible latents' encoder rows, encoder
    biases and decoder rows (and the pre-encoder bias folded into `x_in_BD`) receive gradient. This form
    runs the encoder matmul over the eligible rows alone, for rules (TopK) that never materialise [B, F], through
    the TopK encoder kernel: its backward touches only the k_aux picks per token (CPU: embedding bags when
    k_aux is a small share of the eligible rows) instead of two dense products over [B, eligible].
    """
    if eligible_F is None or k_aux <= 0:
        return x_in_BD.new_zeros(())
    idx_E = eligible_F.nonzero().squeeze(-1)
    if idx_E.numel() == 0:
        return x_in_BD.new_zeros(())
    k = min(k_aux, idx_E.numel())
    vals_BK, local_BK = kernels.topk_encode(x_in_BD, W_enc_FD[idx_E], b_enc_F[idx_E], k)
    return _residual_fvu(idx_E[local_BK], vals_BK, W_dec_FD, residual_BD)


def aux_residual_loss_from_pre(
    pre_BF: Tensor, eligible_F: Tensor | None, W_dec_FD: Tensor, residual_BD: Tensor, k_aux: int
) -> Tensor:
    """The same loss from an already computed non-negative [B, F] pre-activation (the batch-level rules have
    one): ineligible entries are set to -1 so they never win the top-k; picks beyond the eligible count come
    back as -1 and are clamped to 0. No host synchronisation (no data-dependent shapes)."""
    if eligible_F is None or k_aux <= 0:
        return pre_BF.new_zeros(())
    # No eligible (dead) latent, the usual case: skip the second top-k over [B, F] and the aux decode (about 20 %
    # of a BatchTopK step, docs/benchmarks.md "Training speed"). One host sync, as SAELens's check.
    if not bool(eligible_F.any()):
        return pre_BF.new_zeros(())
    masked_BF = pre_BF.masked_fill(~eligible_F, -1.0)
    vals_BK, idx_BK = masked_BF.topk(min(k_aux, pre_BF.shape[1]), dim=-1, sorted=False)
    loss = _residual_fvu(idx_BK, vals_BK.clamp_min(0.0), W_dec_FD, residual_BD)
    return loss * eligible_F.any()  # no eligible latent: 0, not the residual's FVU


def mse(x_hat_BD: Tensor, x_BD: Tensor) -> Tensor:
    """||x - x_hat||^2 summed over d_in, mean over tokens (methods.md, shared ground)."""
    return (x_hat_BD - x_BD).pow(2).sum(-1).mean()


def fired_from_dense(acts_BF: Tensor) -> Tensor:
    return (acts_BF != 0).sum(0).detach()


def fired_from_topk(idx_BK: Tensor, vals_BK: Tensor, d_sae: int) -> Tensor:
    return torch.bincount(idx_BK[vals_BK > 0].flatten(), minlength=d_sae).detach()


def dense_from_topk(idx_BK: Tensor, vals_BK: Tensor, d_sae: int) -> Tensor:
    return vals_BK.new_zeros(vals_BK.shape[0], d_sae).scatter_(1, idx_BK, vals_BK)


@torch.no_grad()
def update_running(est: Tensor, count: Tensor, value: Tensor, decay: float) -> None:
    """Bias-corrected exponential moving average (as Adam's moments), kept in corrected form:
    est_n = est_{n-1} + r_n (value_n - est_{n-1}), r_n = (1 - decay) / (1 - decay^n). r_1 = 1, so the first
    value is taken as is (no pull towards the initial 0), and r_n -> 1 - decay."""
    count.add_(1)
    rate = (1.0 - decay) / (1.0 - torch.full_like(est, decay).pow(count))  # tensor math: no host sync
    est.add_(rate * (value.to(est.dtype) - est))


def smallest_positive(vals: Tensor, dim: int) -> Tensor:
    """Smallest positive entry along `dim` (0 where there is none); the cut-off the running thresholds track."""
    m = torch.where(vals > 0, vals, torch.full_like(vals, float("inf"))).amin(dim)
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


def zipf_targets(freq_F: Tensor, budget: float, exponent: float = 1.0) -> Tensor:
    """Per-latent target firing frequency: latents ranked by their frequency (most frequent first) get
    t_r = min(1, c * r^-exponent), with c set so that sum_r t_r = budget (the L0 budget k)."""
    F = freq_F.numel()
    w_F = torch.arange(1, F + 1, device=freq_F.device, dtype=torch.float32).pow(-exponent)
    # Water-filling without a loop: if the j most frequent ranks are clipped at 1, c_j = (budget - j) / sum_{r>j} w_r;
    # the right j is the first whose first unclipped rank satisfies c_j * w_{j+1} <= 1.
    tail_F = w_F.flip(0).cumsum(0).flip(0)
    c_F = (budget - torch.arange(F, device=freq_F.device, dtype=torch.float32)) / tail_F
    j = (c_F * w_F <= 1.0).int().argmax()
    t_r = (c_F[j] * w_F).clamp(max=1.0)
    target_F = torch.empty_like(t_r)
    target_F[freq_F.argsort(descending=True)] = t_r
    return target_F


def underused(freq_F: Tensor | None, budget: float, exponent: float = 1.0) -> Tensor | None:
    """aux_zipf eligibility (Ayonrinde 2024, arXiv 2411.02124): latents firing less often than the Zipf target of
    their frequency rank. Dead latents (frequency 0) are always eligible."""
    if freq_F is None:
        return None
    return freq_F < zipf_targets(freq_F.float(), budget, exponent)
