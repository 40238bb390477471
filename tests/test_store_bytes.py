"""Fewer bytes per token (format 3): equal sites stored once, the lossy mode's rounding, and format-2 stores
(tests/fixtures/store_format2, written by the format-2 code before this change) still open, read and verify."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from actcache.cli import app
from actcache.lossy import ERROR_ROW_STRIDE, round_mantissa
from actcache.sites import ARCH_TABLE, equal_sites, parse_module_paths
from actcache.store import Store, StoreError, StoreSpec, StoreWriter, make_synthetic_store
from actcache.verify import verify_store

FIXTURE = Path(__file__).parent / "fixtures" / "store_format2"
FIXTURE_ARGS = dict(
    tokens=512, d_model=8, context=64, layers=(0, 1), sites=("resid_pre", "resid_post"), chunk_tokens=64,
    shard_tokens=256, seed=3,
)  # fmt: skip


@pytest.fixture
def old_store(tmp_path) -> Path:
    path = tmp_path / "old"
    shutil.copytree(FIXTURE, path)
    return path


def test_format2_store_opens_reads_and_verifies_as_written(old_store, tmp_path):
    store = Store.open(old_store)
    assert store.format_version == 2 and store.spec.aliases == {} and store.spec.keep_bits is None
    # The same data written today: same id, same bytes (the manifest's content digest), same values.
    fresh = make_synthetic_store(tmp_path / "new", **FIXTURE_ARGS)
    assert fresh.format_version == 3 and fresh.store_id == store.store_id
    assert fresh.content_digest(512) == store.content_digest(512)
    for layer, site in store.keys:
        assert np.array_equal(store.read_acts(layer, site, 0, 512), fresh.read_acts(layer, site, 0, 512))
    report = verify_store(old_store)
    assert report.ok and report.manifest and report.arrays == 4 + 4
    runner = CliRunner()
    assert runner.invoke(app, ["verify", str(old_store)]).exit_code == 0
    info = runner.invoke(app, ["info", str(old_store)])
    assert info.exit_code == 0 and "format 2" in info.output and " = " not in info.output
    # A writer resumes it (complete: nothing to write) without touching its format.
    writer = StoreWriter.create_or_resume(old_store, store.spec)
    assert writer.committed_tokens == 512 and writer.complete
    writer.close()
    assert Store.open(old_store).format_version == 2


def test_equal_sites_follow_the_architecture_table():
    llama = ARCH_TABLE["llama"]
    both = ("resid_pre", "resid_post", "attn_out")
    assert equal_sites(llama, (3, 4, 5, 7), both) == {
        "acts/resid_pre/4": "acts/resid_post/3",
        "acts/resid_pre/5": "acts/resid_post/4",
    }
    assert all(a.chained for a in ARCH_TABLE.values())
    assert equal_sites(llama, (3, 4), ("resid_pre", "mlp_out")) == {}
    # Hand-given module paths prove nothing about what runs between blocks.
    custom = parse_module_paths("layers=model.decoder.layers,attn_out=self_attn,mlp_out=fc2")
    assert equal_sites(custom, (3, 4), both) == {}


def test_spec_aliases_and_keep_bits_are_checked_and_serialised_only_when_used():
    base = dict(
        model="m", revision=None, dtype="bf16", layers=(0, 1), sites=("resid_pre", "resid_post"), d_model=4,
        context=8, corpus="c", tokenizer="t", tokens_target=64, chunk_tokens=8, shard_tokens=32,
        codec="blosc-zstd1-shuffle",
    )  # fmt: skip
    plain = StoreSpec(**base)
    assert "aliases" not in plain.to_json() and "keep_bits" not in plain.to_json()
    spec = StoreSpec(**base, aliases={"acts/resid_pre/1": "acts/resid_post/0"}, keep_bits=2)
    spec.validate()
    assert StoreSpec.from_json(spec.to_json()) == spec
    assert spec.acts_keys == ["acts/resid_pre/0", "acts/resid_post/0", "acts/resid_post/1"]
    assert spec.stored_key("acts/resid_pre/1") == "acts/resid_post/0"
    # A format-2 spec against today's: the difference is named (a key only one side records included)
    assert plain.diff(StoreSpec(**base, aliases={"acts/resid_pre/1": "acts/resid_post/0"})) == [
        "equal sites stored once: 0 != 1 aliases (format 2 vs 3)"
    ]
    assert spec.diff(plain) == [
        "equal sites stored once: 1 != 0 aliases (format 2 vs 3)",
        "keep_bits: 2 != None",
    ]
    for bad in (
        dict(aliases={"acts/resid_pre/2": "acts/resid_post/1"}),
        dict(aliases={"acts/resid_pre/1": "acts/resid_pre/1"}),
        dict(keep_bits=8),
    ):
        with pytest.raises(StoreError):
            StoreSpec(**(base | bad)).validate()


def test_round_mantissa_is_round_to_nearest_even_by_hand():
    # bf16 1.0 = 0x3F80; mantissa bits (7) of 0x3F80 + m. Keep 2 bits: drop 5, ties to even.
    one = 0x3F80
    cases = {
        one + 0b0001111: one,  # below half: down
        one + 0b0010000: one,  # exactly half, kept part even (00): down
        one + 0b0010001: one + 0b0100000,  # above half: up
        one + 0b0110000: one + 0b1000000,  # half, kept part odd (01): up to even (10)
        one + 0b1110000: 0x4000,  # carry into the exponent: 2.0
        0x8000 | (one + 0b0010001): 0x8000 | (one + 0b0100000),  # sign is kept
    }
    got = round_mantissa(np.array(list(cases), np.uint16), "bfloat16", 2)
    assert got.tolist() == list(cases.values())
    assert round_mantissa(np.array([0x7F80, 0x7FC1], np.uint16), "bfloat16", 0).tolist() == [0x7F80, 0x7FC1]
    # The largest finite values round down, not to Inf; NaN patterns stay (0xFFFF + the rounding would wrap).
    top = round_mantissa(np.array([0x7F7F, 0xFF7F, 0xFFFF, 0x7FC1], np.uint16), "bfloat16", 2)
    assert top.tolist() == [0x7F60, 0xFF60, 0xFFFF, 0x7FC1]
    assert round_mantissa(np.array([65504.0], np.float16), "float16", 2).tolist() == [57344.0]
    x = np.array([1.0 + 2**-3 + 2**-12, 3.0], np.float32)  # fp32: 23 bits, keep 2
    assert round_mantissa(x, "float32", 2).tolist() == [1.25, 3.0]
    assert np.array_equal(round_mantissa(x, "float32", 23), x)


def test_lossy_synthetic_store_verifies_and_info_shows_the_error(tmp_path):
    store = make_synthetic_store(
        tmp_path / "s", tokens=512, d_model=16, context=64, chunk_tokens=64, shard_tokens=256
    )
    spec = StoreSpec.from_json({**store.spec.to_json(), "keep_bits": 1})
    writer = StoreWriter.create_or_resume(tmp_path / "lossy", spec)
    for start in (0, 256):
        arrays = {k: store.read_raw(k, start, start + 256) for k in spec.array_keys}
        writer.write_shard(start, arrays)
        writer.commit(start + 256, {})
    writer.close()
    lossy = Store.open(tmp_path / "lossy")
    raw, got = store.read_acts(0, "resid_post", 0, 512), lossy.read_acts(0, "resid_post", 0, 512)
    rows = slice(None, None, ERROR_ROW_STRIDE)  # every 8th row of each 256-row shard is measured
    raw, got = raw[rows], got[rows]
    err = ((got - raw).astype(np.float64) ** 2).sum()
    sq_err, sq, sq_centered = lossy.rounding["acts/resid_post/0"]
    assert sq_err == pytest.approx(err, rel=1e-9) and sq == pytest.approx((raw.astype(np.float64) ** 2).sum())
    assert verify_store(tmp_path / "lossy").ok
    info = CliRunner().invoke(app, ["info", str(tmp_path / "lossy")])
    assert info.exit_code == 0 and "1 mantissa bits kept" in info.output
    assert f"{sq_err / sq_centered:.2e}" in info.output
