"""Creation of a new store (docs/store-format.md, "Commit protocol" step 1): the group, every array and the first
commit record; locally written into a temporary folder that is renamed into place, so a store exists completely
(with 0 committed tokens) or not at all; on an object store written in place, the commit record last (every reader
refuses a store without it)."""

from __future__ import annotations

import logging
import os
import shutil

import zarr

from actcache.byteio import ByteStore, LocalByteStore, fsync_dir
from actcache.codecs import META_CODEC, STORED_DTYPE, get_codec
from actcache.manifest import MANIFEST_DIR, canonical, genesis, meta_digests, seal, sha256_hex
from actcache.spec import (
    COMMIT_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    TOKEN_ARRAYS,
    StoreSpec,
    parse_acts_key,
)

log = logging.getLogger(__name__)


def create_store(io: ByteStore, spec: StoreSpec) -> None:
    """Create the group and every array, the commit record last: locally in a temporary folder renamed into place
    (atomic); on an object store in place (every reader refuses a store without commit.json)."""
    path, local = io.root, isinstance(io, LocalByteStore)
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}") if local else path
    if local:
        shutil.rmtree(tmp, ignore_errors=True)
        if path.exists():
            path.rmdir()  # an empty folder
        path.parent.mkdir(parents=True, exist_ok=True)
    target = LocalByteStore(tmp) if local else io
    # Derived from the spec, not random: two harvests of one spec are bit-identical stores (the content digests
    # of the manifest tell their bytes apart if they ever differ).
    store_id = sha256_hex(canonical(spec.to_json()))[:32]
    attrs = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "store_id": store_id,
        "spec": spec.to_json(),
        "commit_file": COMMIT_FILE,
    }
    where = str(tmp) if local else io.zarr_store(read_only=False)
    group = zarr.open_group(where, mode="w", attributes={"actcache": attrs})
    codec = get_codec(spec.codec)
    stored = STORED_DTYPE[spec.dtype]
    common = dict(fill_value=0, config={"write_empty_chunks": True})
    for key in spec.acts_keys:
        layer, site = parse_acts_key(key)
        group.create_array(
            key,
            shape=(spec.tokens_target, spec.d_model),
            dtype=stored,
            chunks=(spec.chunk_tokens, spec.d_model),
            shards=(spec.shard_tokens, spec.d_model),
            compressors=codec.chunk_codecs(
                stored.itemsize, spec.chunk_tokens * spec.d_model * stored.itemsize
            ),
            dimension_names=("token", "d_model"),
            attributes={"dtype": spec.dtype, "layer": layer, "site": site},
            **common,
        )
    meta_codec = get_codec(META_CODEC)
    for key, dtype in TOKEN_ARRAYS.items():
        group.create_array(
            key,
            shape=(spec.tokens_target,),
            dtype=dtype,
            chunks=(spec.chunk_tokens,),
            shards=(spec.shard_tokens,),
            compressors=meta_codec.chunk_codecs(dtype.itemsize, spec.chunk_tokens * dtype.itemsize),
            dimension_names=("token",),
            **common,
        )
    meta = meta_digests(target, spec.array_keys)
    start = genesis(store_id, spec.to_json(), meta)
    if local:
        (tmp / MANIFEST_DIR).mkdir()
    target.replace_json(
        COMMIT_FILE,
        seal(
            {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "committed_tokens": 0,
                "complete": False,
                "stats": {},
                "store_id": store_id,
                "manifest": {"shards": 0, "chain": start, "genesis": start, "meta": meta},
            }
        ),
    )
    if local:
        os.rename(tmp, path)
        fsync_dir(path.parent)
    log.info("created store %s (%d arrays)", path, len(spec.array_keys))
