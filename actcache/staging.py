"""Several processes, one store: the staged shards of a multi-process harvest, and rank 0's fold of them into the
commit record.

Every rank writes whole shards (disjoint shard files: no two ranks ever write the same object). When all arrays
of a shard are written and durable, the rank writes a *staging record*, ``pending/{shard:08d}.json``: the shard's
rows, the (size, crc32c) of every array's shard file and the statistics of its rows. Rank 0 alone writes the
manifest and the commit record: it folds the staging records in shard order, as far as they go without a gap
(``Staging.fold``), so the commit record only ever covers shards their rank has finished. Statistics merge in
shard order and the records equal those of one process, so the finished store is the one-process store, bit for
bit. A staging record is deleted once its shard is committed; readers never look at ``pending/``.

A rerun (any number of processes) first folds what a killed run left staged, after checking that each shard file
still has its recorded size, and keeps the staged shards beyond the first gap (`resume_staged`): only the missing
shards are harvested again.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from actcache.digests import canonical
from actcache.stats import RunningStats
from actcache.view import Store
from actcache.writer import StoreWriter

log = logging.getLogger(__name__)

PENDING_DIR = "pending"


def pending_key(shard: int) -> str:
    return f"{PENDING_DIR}/{shard:08d}.json"


class Staging:
    """A rank's side (`stage`) and rank 0's side (`fold`) of the staged shards of one store."""

    def __init__(self, writer: StoreWriter, rank: int) -> None:
        self.writer, self.rank = writer, rank
        self._lock = threading.Lock()

    def stage(self, shard: int, rows: int, stats: Mapping[str, RunningStats]) -> None:
        """Record a finished shard (its files durable first); rank 0 then folds what it can."""
        w = self.writer
        io, keys = w.io, w.spec.array_keys
        io.make_durable(Store.shard_key(k, shard) for k in keys)
        record = {
            "shard": shard,
            "rows": rows,
            "rank": self.rank,
            "arrays": {k: list(w.shard_digest(k, shard)) for k in keys},
            "stats": {k: s.to_json() for k, s in stats.items()},
        }
        io.write(pending_key(shard), canonical(record))
        io.make_durable([pending_key(shard)])
        if self.rank == 0:
            self.fold()

    def fold(self) -> int:
        """Rank 0: commit every staged shard that follows the commit record without a gap; the committed tokens."""
        w = self.writer
        io, spec = w.io, w.spec
        with self._lock:
            while not w.complete and w.committed_tokens < spec.tokens_target:
                shard = w.committed_tokens // spec.shard_tokens
                record = _read(io, shard)
                if record is None:
                    break
                if not _sizes_hold(io, spec.array_keys, shard, record):
                    log.warning("staged shard %d no longer has its recorded size; harvesting it again", shard)
                    io.delete(pending_key(shard))
                    break
                w.adopt(shard, int(record["rows"]), record["arrays"])
                # In the order of the arrays, as one process merges them (commit.json is then byte-identical).
                stats = {k: RunningStats.from_json(record["stats"][k]) for k in spec.acts_keys}
                w.commit(shard * spec.shard_tokens + int(record["rows"]), stats)
                io.delete(pending_key(shard))
            return w.committed_tokens


def resume_staged(writer: StoreWriter) -> set[int]:
    """Rank 0 at the start of a run: commit what a killed run left staged as far as it reaches without a gap, and
    keep the staged shards beyond the gap whose files still have their recorded sizes (they are not harvested
    again; the fold commits them once the gap is filled). Every other staging record is removed. The kept shards."""
    Staging(writer, 0).fold()
    io, spec, kept = writer.io, writer.spec, set()
    first = -(-writer.committed_tokens // spec.shard_tokens)
    for key in io.list(PENDING_DIR):
        shard = int(key.rsplit("/", 1)[-1].split(".")[0]) if key.endswith(".json") else -1
        record = _read(io, shard) if shard >= first else None
        if record is not None and _sizes_hold(io, spec.array_keys, shard, record):
            kept.add(shard)
        else:
            io.delete(key)
    return kept


def fold_leftovers(writer: StoreWriter) -> int:
    """Rank 0 at the start of a run (what a killed run left staged) and at its end: commit the staged shards in
    order, without a gap, and remove the rest (harvested again) and the local folder. The committed tokens."""
    committed = Staging(writer, 0).fold()
    for key in writer.io.list(PENDING_DIR):
        writer.io.delete(key)
    folder = writer.io.location(PENDING_DIR)
    if isinstance(folder, Path) and folder.is_dir():
        folder.rmdir()
    return committed


def _read(io: Any, shard: int) -> dict[str, Any] | None:
    try:
        record = json.loads(io.read(pending_key(shard)))
    except FileNotFoundError:
        return None
    except ValueError:  # a torn record cannot exist (atomic writes); an edited one is not trusted
        return None
    return record if record.get("shard") == shard else None


def _sizes_hold(io: Any, keys: list[str], shard: int, record: dict[str, Any]) -> bool:
    return all(io.size(Store.shard_key(k, shard)) == int(record["arrays"][k][0]) for k in keys)
