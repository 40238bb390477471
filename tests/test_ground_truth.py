"""Ground truth: 256 known unit features in superposition in d = 64, each token a positive combination of
about 5 of them. TopK and JumpReLU SAEs trained with the base hooks must recover the features: the mean over
true features of the best cosine similarity with a learned decoder row is >= 0.9 (a random decoder scores about
0.37, checked below so the metric is known to discriminate)."""

from __future__ import annotations

import pytest
import torch
from synthetic import fit, make_sae, sparse_data

D, N_FEATURES, ACTIVE, D_SAE = 64, 256, 5, 512


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def data():
    return sparse_data(D, N_FEATURES, ACTIVE, seed=0)


def mean_max_cos(features_FD: torch.Tensor, W_dec_FD: torch.Tensor) -> float:
    W = W_dec_FD.detach() / W_dec_FD.detach().norm(dim=1, keepdim=True)
    return float((features_FD @ W.T).max(dim=1).values.mean())


def test_random_decoder_scores_low(data):
    sae = make_sae("topk", D, D_SAE, ACTIVE)
    sae.init_from_data(data.sample(256))
    assert mean_max_cos(data.features_FD, sae.W_dec_FD) < 0.6


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "steps", "coef"),
    [("topk", 400, 0.0), ("jumprelu", 600, 3e-2)],  # lambda 3e-2 lands JumpReLU near L0 4.4 on this data
)
def test_recovers_true_features(name, steps, coef, data):
    torch.manual_seed(0)
    sae = make_sae(name, D, D_SAE, ACTIVE)
    res = fit(sae, data, steps=steps, batch=512, lr=3e-3, sparsity_coef=coef, decay_frac=0.2)
    l0 = sum(res.l0s[-20:]) / 20
    assert l0 < 2 * ACTIVE, l0  # sparse, not a dense solution
    assert mean_max_cos(data.features_FD, sae.W_dec_FD) >= 0.9
