"""`sae inspect`'s pass (sae_cli/inspect/scan.py, topbuf.py) against a brute-force computation on a synthetic
store: the top-N contexts (tokens, values, the activations and token ids around them), the firing frequencies,
means and histograms, and the uniform sample of firings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from synthetic import make_sae

from actcache.store import FLAG_BOS, make_synthetic_store
from sae_cli.inspect.scan import HIST_LOG2_RANGE, HIST_PER_OCTAVE, LatentScan, ScanConfig, scan
from sae_cli.inspect.topbuf import Candidates, TopBuffer
from sae_cli.registry import variant_names

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = (0, "resid_post")
CTX = 32


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_synthetic_store(
        tmp_path_factory.mktemp("inspect") / "store",
        tokens=CTX * 20,
        d_model=16,
        context=CTX,
        dtype="float32",
    )


def random_sae(variant: str, d_sae: int = 48, seed: int = 0):
    sae = make_sae(variant, 16, d_sae, 4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 1.0))
        if hasattr(sae, "theta_F"):  # JumpReLU: thresholds of 1
            sae.theta_F.fill_(1.0)
    return sae.eval()


def brute_force(store, sae, lo: int, hi: int):
    """Every token's latents (BOS zeroed), its token ids, in store order."""
    x = torch.from_numpy(store.read_acts(*KEY, lo, hi))
    with torch.no_grad():
        acts = sae.encode(x).float()
    bos = torch.from_numpy(store.read("flags", lo, hi).astype("int64") & FLAG_BOS) != 0
    acts[bos] = 0
    return acts, torch.from_numpy(store.read("token_ids", lo, hi).astype("int64")), int((~bos).sum())


@pytest.mark.parametrize("variant", ["topk", "jumprelu"])
@pytest.mark.parametrize("windows", [1, 3])
def test_scan_equals_brute_force(store, variant: str, windows: int) -> None:
    lo, hi = 4 * CTX, 17 * CTX
    sae = random_sae(variant)
    cfg = ScanConfig(top=5, samples=7, before=3, after=2, windows=windows)
    (s,) = scan(store, KEY, (lo, hi), [sae.encode], [sae.cfg.d_sae], cfg)
    acts, ids, n_valid = brute_force(store, sae, lo, hi)
    assert s.tokens == n_valid == (hi - lo) - (hi - lo) // CTX
    fired = acts != 0
    assert torch.equal(s.count_F, fired.sum(0))
    assert 0 < fired.float().mean() < 0.6  # sparse, but every latent has a chance to fill its buffer
    torch.testing.assert_close(s.freq_F(), fired.double().mean(0) * (hi - lo) / n_valid)
    torch.testing.assert_close(s.mean_F(), (acts.double().sum(0) / fired.sum(0).clamp(min=1)))
    assert torch.equal(s.hist_FH.sum(1), s.count_F)
    for f in range(sae.cfg.d_sae):
        col = acts[:, f]
        order = sorted(torch.nonzero(col).flatten().tolist(), key=lambda t: (-float(col[t]), t))[: cfg.top]
        got = s.top.token_FN[f]
        assert got[: len(order)].tolist() == [lo + t for t in order], f
        assert (got[len(order) :] == -1).all() and torch.isinf(s.top.key_FN[f, len(order) :]).all()
        assert s.top.value_FN[f, : len(order)].tolist() == col[order].tolist()
        for j, t in enumerate(order):  # the span: the latent's activations and the ids around the token
            w0 = t - t % CTX
            for o in range(-cfg.before, cfg.after + 1):
                p = t + o
                inside = w0 <= p < w0 + CTX
                assert float(s.top.span_FNS[f, j, o + cfg.before]) == (float(col[p]) if inside else 0.0)
                assert int(s.top.ids_FNS[f, j, o + cfg.before]) == (int(ids[p]) if inside else -1)
        # The sample: distinct firings of this latent with their true values, as many as it has (up to 7).
        n = min(cfg.samples, int(fired[:, f].sum()))
        toks = s.sample.token_FN[f, :n] - lo
        assert len(set(toks.tolist())) == n and (s.sample.token_FN[f, n:] == -1).all()
        assert torch.equal(s.sample.value_FN[f, :n], col[toks])
        # The histogram puts each firing in its log2 bin.
        bins = torch.floor(torch.log2(col[col != 0]) * HIST_PER_OCTAVE) - HIST_LOG2_RANGE[0] * HIST_PER_OCTAVE
        assert torch.equal(s.hist_FH[f], torch.bincount(bins.long(), minlength=s.n_bins))


@pytest.mark.parametrize("variant", variant_names())
def test_every_variant(store, variant: str) -> None:
    """Frequencies and top-N tokens of every registered variant equal brute force (its own encode rule)."""
    lo, hi = 2 * CTX, 8 * CTX
    sae = random_sae(variant)
    (s,) = scan(store, KEY, (lo, hi), [sae.encode], [sae.cfg.d_sae], ScanConfig(top=4, samples=2, windows=2))
    acts, _, n_valid = brute_force(store, sae, lo, hi)
    assert s.tokens == n_valid and torch.equal(s.count_F, (acts != 0).sum(0)) and s.count_F.sum() > 0
    for f in range(sae.cfg.d_sae):
        col = acts[:, f]
        order = sorted(torch.nonzero(col).flatten().tolist(), key=lambda t: (-float(col[t]), t))[:4]
        assert s.top.token_FN[f, : len(order)].tolist() == [lo + t for t in order], (variant, f)


def test_sample_is_uniform() -> None:
    """The reservoir by random keys: with 1 latent firing on 10 tokens a batch and a sample of 2, every token is
    kept about equally often over many seeds."""
    hits = torch.zeros(40)
    for seed in range(400):
        s = LatentScan(1, ScanConfig(top=1, samples=2, before=0, after=0, seed=seed))
        for b in range(4):  # four batches of 10 tokens, all firing
            s.update(
                torch.ones(10, 1),
                torch.zeros(10, dtype=torch.int64),
                torch.ones(10, dtype=torch.bool),
                10 * b,
                10,
            )
        hits[s.sample.token_FN[0]] += 1
    assert hits.sum() == 800 and hits.min() > 8 and hits.max() < 35  # mean 20, sd ~4.4


def test_buffer_ties_keep_the_earlier_token() -> None:
    buf = TopBuffer(2, 2, 1)
    ones = torch.ones(3)
    zero = lambda c: (torch.zeros(len(c.latent_C), 1), torch.zeros(len(c.latent_C), 1, dtype=torch.int32))  # noqa: E731
    buf.offer(Candidates(torch.tensor([0, 0, 1]), ones, torch.tensor([5, 6, 7]), ones), zero)
    buf.offer(
        Candidates(
            torch.tensor([0, 1, 1]), ones * 2 - torch.tensor([1, 0, 1]), torch.tensor([8, 9, 10]), ones
        ),
        zero,
    )
    assert buf.token_FN.tolist() == [[5, 6], [9, 7]]
    assert buf.key_FN.tolist() == [[1, 1], [2, 1]]


def test_state_round_trip(store, tmp_path: Path) -> None:
    from sae_cli.io import read_tensors, write_tensors_atomic

    sae = random_sae("topk")
    cfg = ScanConfig(top=3, samples=2)
    (s,) = scan(store, KEY, (0, 4 * CTX), [sae.encode], [sae.cfg.d_sae], cfg)
    write_tensors_atomic(tmp_path / "s.safetensors", s.state())
    back = LatentScan.from_state(read_tensors(tmp_path / "s.safetensors"), cfg)
    assert back.tokens == s.tokens and math.isclose(float(back.mean_F().sum()), float(s.mean_F().sum()))
    for k, v in s.state().items():
        assert torch.equal(back.state()[k], v), k
