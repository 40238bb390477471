"""What the readers share (actcache/reader.py, actcache/windows.py): the open store, its keys, a token range."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from actcache.store import Store, StoreError

Key = tuple[int, str]


def as_range(store: Store, token_range: Any) -> tuple[int, int]:
    """``token_range`` (None: every committed token; a (lo, hi) pair or a range) -> (lo, hi), checked."""
    if token_range is None:
        return 0, store.committed_tokens
    if isinstance(token_range, range):
        token_range = (token_range.start, token_range.stop)
    lo, hi = int(token_range[0]), int(token_range[1])
    if not 0 <= lo < hi <= store.committed_tokens:
        raise StoreError(
            f"token_range {lo}..{hi} is empty or beyond the {store.committed_tokens} committed tokens of {store.path}"
        )
    return lo, hi


def open_store(store: Store) -> Store:
    """The store the caller opened, handed on: readers never open a store by path (one Store per run)."""
    if not isinstance(store, Store):
        raise TypeError(
            f"pass an open actcache Store (actcache.store.Store.open(path)), not {type(store).__name__} {store!r}"
        )
    return store


def check_keys(store: Store, keys: Sequence[Key]) -> list[Key]:
    """(layer, site) keys as a list; StoreError naming what exists when one is not in the store."""
    if not keys:
        raise StoreError("the reader needs at least one (layer, site) key")
    keys = [(int(layer), str(site)) for layer, site in keys]
    for layer, site in keys:
        store.acts(layer, site)  # raises StoreError naming what exists
    return keys
