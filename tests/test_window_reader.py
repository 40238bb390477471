"""WindowReader: whole windows shuffled by window, once per epoch, seeded, rank-sharded, resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actcache.reader import WindowBatch, WindowReader, Windows, iter_windows
from actcache.store import Store, StoreError, make_synthetic_store

KEYS = [(0, "resid_post"), (1, "resid_post")]
CTX = 32


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """40 windows of 32 tokens, chunks of 128 tokens (4 windows), two keys."""
    path = tmp_path_factory.mktemp("windows") / "store"
    return make_synthetic_store(
        path, tokens=40 * CTX, d_model=8, context=CTX, layers=(0, 1), chunk_tokens=128, shard_tokens=512
    )


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Windows larger than a chunk (64 tokens, chunks of 16)."""
    path = tmp_path_factory.mktemp("windows") / "wide"
    return make_synthetic_store(
        path, tokens=10 * 64, d_model=4, context=64, chunk_tokens=16, shard_tokens=128
    )


def take(reader: WindowReader, n: int | None = None) -> list[Windows]:
    out = []
    for batch in reader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def windows_of(batches: list[Windows]) -> np.ndarray:
    return torch.cat([b.window for b in batches]).numpy()


@pytest.mark.parametrize("name", ["store", "wide_store"])
def test_every_window_once_per_epoch_with_the_stored_data(name: str, request: pytest.FixtureRequest) -> None:
    st: Store = request.getfixturevalue(name)
    ctx, n = st.spec.context, st.committed_tokens // st.spec.context
    keys = KEYS if name == "store" else KEYS[:1]
    batches = take(WindowReader(st, keys, 3, seed=1, loop=False))
    wins = windows_of(batches)
    assert [len(b.window) for b in batches] == [3] * (n // 3) + ([n % 3] if n % 3 else [])
    assert np.array_equal(np.sort(wins), np.arange(n))
    assert not np.array_equal(wins, np.arange(n))  # shuffled
    for b in batches[:3]:
        assert b.acts[keys[0]].shape == (len(b.window), ctx, st.spec.d_model)
        assert b.token_ids.dtype == torch.int64 and b.flags.dtype == torch.uint8
        assert torch.equal(b.index, b.window[:, None] * ctx + torch.arange(ctx))
        rows = b.index.reshape(-1).numpy()
        for layer, site in keys:
            ref = st.read_acts(layer, site, 0, st.committed_tokens)[rows]
            assert torch.equal(b.acts[(layer, site)].reshape(-1, st.spec.d_model), torch.from_numpy(ref))
        ref_ids = st.read("token_ids", 0, st.committed_tokens)[rows]
        assert torch.equal(b.token_ids.reshape(-1), torch.from_numpy(ref_ids.astype(np.int64)))
        assert (b.flags[:, 0] == 1).all() and (b.flags[:, 1:] == 0).all()  # BOS first (synthetic store)


def test_orders_differ_by_seed_and_epoch_and_batches_span_epochs(store: Store) -> None:
    looped = windows_of(take(WindowReader(store, KEYS[:1], 7, seed=0), 12))  # 84 windows: 2 epochs + 4
    epochs = [looped[:40], looped[40:80]]
    for e in epochs:
        assert np.array_equal(np.sort(e), np.arange(40))
    assert not np.array_equal(epochs[0], epochs[1])
    other = windows_of(take(WindowReader(store, KEYS[:1], 7, seed=1), 6))[:40]
    assert not np.array_equal(other, epochs[0])
    again = windows_of(take(WindowReader(store, KEYS[:1], 7, seed=0), 12))
    assert np.array_equal(again, looped)  # deterministic for a seed


def test_ranks_are_disjoint_and_cover(store: Store) -> None:
    per_rank = [
        windows_of(take(WindowReader(store, KEYS[:1], 4, seed=5, rank=r, world_size=3, loop=False)))
        for r in range(3)
    ]
    allw = np.concatenate(per_rank)
    assert len(allw) == 40 and np.array_equal(np.sort(allw), np.arange(40))
    assert all(abs(len(p) - 40 / 3) < 1 for p in per_rank)


def test_token_range_keeps_whole_windows_inside(store: Store) -> None:
    batches = take(WindowReader(store, KEYS[:1], 5, token_range=(10, 20 * CTX + 5), loop=False))
    assert np.array_equal(np.sort(windows_of(batches)), np.arange(1, 20))


def test_state_dict_resumes_the_same_batches(store: Store) -> None:
    full = take(WindowReader(store, KEYS, 6, seed=2, rank=1, world_size=2), 10)  # spans epochs (20 per rank)
    reader = WindowReader(store, KEYS, 6, seed=2, rank=1, world_size=2)
    first = take(reader, 4)
    state = reader.state_dict()
    assert state["windows_consumed"] == 24 and state["epoch"] == 1
    resumed = WindowReader(store, KEYS, 6, seed=2, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = take(resumed, 6)
    for a, b in zip(full, first + rest, strict=True):
        assert torch.equal(a.window, b.window)
        assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.flags, b.flags)
        assert all(torch.equal(a.acts[k], b.acts[k]) for k in KEYS)
    with pytest.raises(StoreError, match="seed=2"):
        WindowReader(store, KEYS, 6, seed=3, rank=1, world_size=2).load_state_dict(state)


def test_bad_arguments(store: Store) -> None:
    with pytest.raises(StoreError, match="rank 2"):
        WindowReader(store, KEYS, 4, rank=2, world_size=2)
    with pytest.raises(StoreError, match="cannot be shared"):
        WindowReader(store, KEYS, 4, token_range=(0, 2 * CTX), world_size=3)
    with pytest.raises(StoreError, match="positive"):
        WindowReader(store, KEYS, 0)
    with pytest.raises(StoreError):
        WindowReader(store, [(7, "resid_post")], 4)


def test_iter_windows_batches_carry_the_token_index(store: Store) -> None:
    b = next(iter(iter_windows(store, KEYS[:1], (CTX, 10 * CTX), windows=3)))
    assert isinstance(b, WindowBatch)
    assert torch.equal(b.index, CTX + torch.arange(3 * CTX).reshape(3, CTX))
