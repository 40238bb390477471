"""Metrics against hand-computed numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sae_cli.metrics import ReconstructionMetrics, density_histogram, fvu, save_density_png


def test_fvu_of_identity_is_0_and_of_the_mean_is_1() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 4.0]])
    assert fvu(x, x) == 0.0
    assert fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)
    # By hand: mean (2, 2); sum ||x - mean||^2 = (1+0) + (1+4) + (0+4) = 10; x_hat = 0 -> sum ||x||^2 = 34.
    assert fvu(x, torch.zeros_like(x)) == pytest.approx(34 / 10)


def test_streamed_metrics_match_hand_computed_values() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 4.0], [0.0, 0.0]])
    x_hat = 0.5 * x
    acts = torch.tensor(
        [
            [1.0, 0.0, 0.0, 2.0, 0.0],
            [0.0, 0.0, 0.0, 3.0, 0.0],
            [0.5, 0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0, 0.0],
        ]
    )
    m = ReconstructionMetrics(d_in=2, d_sae=5, massive_ratio=1e9)
    m.update(x[:2], x_hat[:2], acts[:2])  # two batches: streaming must equal one pass
    m.update(x[2:], x_hat[2:], acts[2:])
    r = m.result()
    assert r["tokens"] == 4
    assert r["l0"] == pytest.approx((2 + 1 + 2 + 1) / 4)
    # errors: 0.25 * ||x||^2 = 0.25 * (5 + 9 + 20 + 0) = 8.5; mean (1.5, 1.5): sum ||x - mean||^2 = 34 - 4 * 4.5 = 16
    assert r["mse"] == pytest.approx(8.5 / 4)
    assert r["fvu"] == pytest.approx(8.5 / 16)
    # latent 0 fires on 2/4 tokens, latent 3 on 4/4, latents 1, 2, 4 never: 60 % dead, 40 % dense (> 10 %).
    assert r["dead_pct"] == pytest.approx(60.0)
    assert r["dense_pct"] == pytest.approx(40.0)
    # x_hat = x / 2: gamma = E||x_hat||^2 / E<x_hat, x> = 0.25 / 0.5 = 0.5 (shrunk by half).
    assert r["shrinkage"] == pytest.approx(0.5)
    assert m.freq_F().tolist() == [0.5, 0.0, 0.0, 1.0, 0.0]


def test_fvu_without_massive_tokens_drops_exactly_those_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=gen)
    x[7] *= 100.0  # one massive token: norm ~ 100x the median
    x_hat = x + 0.1 * torch.randn(1000, 8, generator=gen)
    m = ReconstructionMetrics(8, 4)
    m.update(x, x_hat, torch.ones(1000, 4))
    r = m.result()
    keep = torch.ones(1000, dtype=torch.bool)
    keep[7] = False
    assert r["massive_tokens"] == 1
    assert r["fvu"] == pytest.approx(fvu(x, x_hat), rel=1e-9)
    assert r["fvu_typical"] == pytest.approx(fvu(x[keep], x_hat[keep]), rel=1e-9)
    assert r["fvu_typical"] > 10 * r["fvu"]  # the massive token carried most of the variance


def test_density_histogram_and_png(tmp_path: Path) -> None:
    freq = torch.tensor([0.0, 0.0, 1e-3, 1e-2, 1e-2, 0.5])
    h = density_histogram(freq, bins=3)
    assert h["dead"] == 2 and sum(h["counts"]) == 4
    assert h["log10_edges"][0] == pytest.approx(-3.0) and h["log10_edges"][-1] == pytest.approx(
        math.log10(0.5)
    )
    save_density_png(freq, tmp_path / "d.png", "t")
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
