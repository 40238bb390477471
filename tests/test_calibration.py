"""sae_cli/calibration.py: order statistics pooled over blocks, and the value at a fractional rank."""

from __future__ import annotations

import pytest
import torch

from sae_cli.calibration import pooled_top, value_at_rank


def test_pooled_top_equals_the_top_of_all_blocks_together():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 9, generator=g)
    blocks = x.split(16)
    assert torch.equal(pooled_top(blocks, 40), x.flatten().topk(40).values)
    assert torch.equal(pooled_top(x.split(16), 5, per_column=True), x.topk(5, dim=0).values)
    assert torch.equal(
        pooled_top(x.split(16), 1000), x.flatten().sort(descending=True).values
    )  # fewer than n
    assert pooled_top([], 3) is None


def test_pooled_top_is_exact_through_the_sampled_candidates():
    """n >= 4,000 and blocks >= 4n entries: the selection runs over kernels.flat_topk's candidates and later blocks
    are cut at the n-th largest so far; the result is still the exact sorted top n."""
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(2000, 64, generator=g))
    got = pooled_top(x.split(500), 5000)
    assert torch.equal(got, x.flatten().topk(5000).values)


def test_value_at_rank_interpolates_between_neighbours_and_reads_past_the_end():
    top = torch.tensor([9.0, 7.0, 4.0, 1.0])
    assert float(value_at_rank(top, 2)) == 7.0
    assert float(value_at_rank(top, 2.5)) == 5.5  # midway between the 2nd and 3rd largest
    assert float(value_at_rank(top, 3.25)) == pytest.approx(3.25)
    assert float(value_at_rank(top, 4.5)) == 0.5  # past the end reads 0
    assert float(value_at_rank(top, 4.5, past_end=-1.0)) == 0.0
    assert value_at_rank(top, 4.5, past_end=None) is None
    cols = torch.tensor([[4.0, 2.0], [2.0, 0.0]])
    torch.testing.assert_close(value_at_rank(cols, 1.5), torch.tensor([3.0, 1.0]))
