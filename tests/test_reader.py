"""ActivationReader: coverage, mixing, determinism, resume, rank sharding, outlier drop; iter_windows; splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from actcache.reader import ActivationReader, iter_windows, split_ranges
from actcache.store import FLAG_BOS, FLAG_PAD, Store, StoreError, StoreSpec, StoreWriter, make_synthetic_store

KEY = (0, "resid_post")


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """100k tokens of 128-token windows, chunks of 1024 tokens (8 windows), two keys."""
    path = tmp_path_factory.mktemp("reader") / "big"
    return make_synthetic_store(
        path, tokens=100_352, d_model=16, context=128, layers=(0, 1), chunk_tokens=1024, shard_tokens=8192
    )


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    path = tmp_path_factory.mktemp("reader") / "small"
    return make_synthetic_store(path, tokens=4096, d_model=8, context=64, chunk_tokens=128, shard_tokens=512)


def collect(reader: ActivationReader, n_batches: int | None = None) -> list:
    out = []
    for batch in reader:
        out.append(batch)
        if n_batches is not None and len(out) == n_batches:
            break
    return out


def non_bos(store: Store, lo: int = 0, hi: int | None = None) -> np.ndarray:
    hi = store.committed_tokens if hi is None else hi
    flags = store.read("flags", lo, hi)
    return np.arange(lo, hi)[(flags & FLAG_BOS) == 0]


def test_every_non_bos_token_once_per_epoch_with_matching_data(small_store: Store) -> None:
    reader = ActivationReader(small_store, [KEY], 100, seed=3, mix_chunks=4, loop=False)
    batches = collect(reader)
    index = torch.cat([b.index for b in batches]).numpy()
    assert [len(b.index) for b in batches[:-1]] == [100] * (len(batches) - 1)
    assert np.array_equal(np.sort(index), non_bos(small_store))
    assert not np.array_equal(index, np.sort(index))  # actually shuffled
    b = batches[5]
    ref = small_store.read_acts(0, "resid_post", 0, 4096)[b.index.numpy()]
    assert torch.equal(b.acts[KEY], torch.from_numpy(ref))
    assert torch.equal(
        b.token_ids, torch.from_numpy(small_store.read("token_ids", 0, 4096)[b.index.numpy()]).long()
    )


def test_batch_mixes_many_windows(big_store: Store) -> None:
    reader = ActivationReader(big_store, [KEY, (1, "resid_post")], 4096, seed=0, mix_chunks=64)
    batch = next(iter(reader))
    windows = torch.unique(batch.index // 128)
    assert len(windows) >= 256
    assert set(batch.acts) == {KEY, (1, "resid_post")} and batch.acts[KEY].shape == (4096, 16)
    assert batch.acts[KEY].dtype == torch.float32


def test_same_seed_same_batches_different_seed_differs(small_store: Store) -> None:
    def first_indices(seed: int) -> torch.Tensor:
        reader = ActivationReader(small_store, [KEY], 256, seed=seed, mix_chunks=4)
        return torch.cat([b.index for b in collect(reader, 6)])

    a, b, c = first_indices(7), first_indices(7), first_indices(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_resume_from_state_dict_continues_the_same_sequence(small_store: Store) -> None:
    # Batches of 300 straddle group boundaries (4 chunks x 126 kept tokens) and, with loop, epoch boundaries.
    full = collect(ActivationReader(small_store, [KEY], 300, seed=1, mix_chunks=4), 20)
    reader = ActivationReader(small_store, [KEY], 300, seed=1, mix_chunks=4)
    first = collect(reader, 7)
    state = reader.state_dict()
    assert state["tokens_consumed"] == 7 * 300
    resumed = ActivationReader(small_store, [KEY], 300, seed=1, mix_chunks=4)
    resumed.load_state_dict(state)
    rest = collect(resumed, 13)
    got = torch.cat([b.index for b in first + rest])
    assert torch.equal(got, torch.cat([b.index for b in full]))
    assert resumed.state_dict()["epoch"] >= 1  # crossed into the reshuffled second epoch
    with pytest.raises(StoreError, match="seed"):
        ActivationReader(small_store, [KEY], 300, seed=2, mix_chunks=4).load_state_dict(state)


def test_epochs_reshuffle(small_store: Store) -> None:
    n = len(non_bos(small_store))
    reader = ActivationReader(small_store, [KEY], n, seed=0, mix_chunks=4)
    e0, e1 = collect(reader, 2)
    assert torch.equal(e0.index.sort().values, e1.index.sort().values)
    assert not torch.equal(e0.index, e1.index)


def test_rank_sharding_is_disjoint_and_covering(small_store: Store) -> None:
    parts = []
    for rank in range(3):
        reader = ActivationReader(
            small_store, [KEY], 64, seed=5, rank=rank, world_size=3, mix_chunks=2, loop=False
        )
        parts.append(torch.cat([b.index for b in collect(reader)]).numpy())
    for i in range(3):
        for j in range(i + 1, 3):
            assert not set(parts[i]) & set(parts[j])
    assert np.array_equal(np.sort(np.concatenate(parts)), non_bos(small_store))


def test_max_norm_ratio_drops_planted_outliers(tmp_path: Path) -> None:
    spec = StoreSpec(
        model="tiny", revision=None, dtype="float32", layers=(0,), sites=("resid_post",), d_model=8, context=64,
        corpus="c", tokenizer="t", tokens_target=1024, chunk_tokens=128, shard_tokens=1024, codec="zstd-1",
    )  # fmt: skip
    writer = StoreWriter.create_or_resume(tmp_path / "s", spec)
    x_ND = torch.randn(1024, 8, generator=torch.Generator().manual_seed(0))
    outliers = [5, 77, 300, 901]
    x_ND[outliers] *= 100.0
    pos = np.arange(1024) % 64
    flags = np.where(pos == 0, FLAG_BOS, 0).astype(np.uint8)
    flags[500] = FLAG_PAD
    z = np.zeros(1024, np.int32)
    writer.write_shard(
        0, {"acts/resid_post/0": x_ND, "token_ids": z, "doc_ids": z, "positions": pos, "flags": flags}
    )
    writer.commit(1024, {})
    store = Store.open(tmp_path / "s")  # opened once, handed to the readers
    kept = torch.cat(
        [b.index for b in collect(ActivationReader(store, [KEY], 1000, max_norm_ratio=10.0, loop=False))]
    )
    expected = set(range(1024)) - set(range(0, 1024, 64)) - set(outliers) - {500}
    assert set(kept.tolist()) == expected and len(kept) == len(expected)
    with_pad = ActivationReader(store, [KEY], 2000, drop_pad=False, drop_bos=False, loop=False)
    assert len(next(iter(with_pad)).index) == 1024


def test_token_range_and_split_ranges(small_store: Store) -> None:
    train, evaluation = split_ranges(small_store, 100)
    assert train == (0, 4096 - 128) and evaluation == (4096 - 128, 4096)  # two 64-token windows held out
    reader = ActivationReader(small_store, [KEY], 50, token_range=evaluation, loop=False)
    got = torch.cat([b.index for b in collect(reader)]).numpy()
    assert np.array_equal(np.sort(got), non_bos(small_store, *evaluation))
    with pytest.raises(StoreError, match="committed"):
        ActivationReader(small_store, [KEY], 50, token_range=(0, 10**6))
    with pytest.raises(StoreError, match="cannot hold out"):
        split_ranges(small_store, 4096)


def test_iter_windows_in_order(small_store: Store) -> None:
    batches = list(
        iter_windows(small_store, [KEY], token_range=(64, 64 * 10), windows=4, dtype=torch.bfloat16)
    )
    assert [b.start for b in batches] == [64, 64 * 5, 64 * 9]
    assert [b.acts[KEY].shape[0] for b in batches] == [4, 4, 1]
    acts = torch.cat([b.acts[KEY] for b in batches]).float().reshape(-1, 8).numpy()
    assert np.array_equal(acts, small_store.read_acts(0, "resid_post", 64, 640))
    flags = torch.cat([b.flags for b in batches])
    assert flags.shape == (9, 64) and flags[:, 0].eq(FLAG_BOS).all() and flags[:, 1:].eq(0).all()
    tokens = torch.cat([b.token_ids for b in batches]).reshape(-1).numpy()
    assert np.array_equal(tokens, small_store.read("token_ids", 64, 640))


def test_reads_only_committed_tokens_of_a_growing_store(tmp_path: Path) -> None:
    store = make_synthetic_store(tmp_path / "g", tokens=2048, d_model=8, context=64, chunk_tokens=128,
                                 shard_tokens=512, commit_tokens=1024)  # fmt: skip
    assert store.committed_tokens == 1024
    got = torch.cat([b.index for b in collect(ActivationReader(store, [KEY], 128, loop=False))])
    assert got.max() < 1024 and len(got) == 1024 - 16
    assert sum(len(b.token_ids) for b in iter_windows(store, [KEY])) == 16


def test_wait_seconds_is_measured(small_store: Store) -> None:
    reader = ActivationReader(small_store, [KEY], 512, mix_chunks=2, loop=False)
    collect(reader)
    assert reader.wait_seconds > 0.0
