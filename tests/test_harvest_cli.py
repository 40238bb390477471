"""`actcache harvest` bad input: one-line error, exit code 2, nothing written; --dry-run writes nothing."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import numpy as np
import pytest
from conftest import make_tokenizer
from typer.testing import CliRunner

import actcache.harvest
from actcache.cli import app
from actcache.harvest import HarvestInterrupted
from actcache.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(*args: str):
    return CliRunner().invoke(app, ["harvest", *map(str, args)])


def _base(model, corpus, out, *extra) -> list:
    return [model, "--dataset", corpus, "--context", 32, "--tokens", 256, "--shard-tokens", 64,
            "--device", "cpu", "--out", out, *extra]  # fmt: skip


def _assert_bad_input(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture
def empty_corpus(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "a.txt").write_text("")
    return folder


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(
    tmp_path, tiny_llama_dir, tiny_corpus, empty_corpus, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "sub" / "store"
    cases = [
        (_base(tmp_path / "no-such-model", tiny_corpus, out), ["does not exist"]),
        (_base("no-such-org/no-such-model", tiny_corpus, out), ["not in the Hugging Face cache", "offline"]),
        (_base(tiny_llama_dir, tiny_corpus, out, "--layers", "4"), ["layer 4 is outside", "0-3"]),
        (_base(tiny_llama_dir, tiny_corpus, out, "--layers", "2-9"), ["outside the model"]),
        (_base(tiny_llama_dir, tiny_corpus, out, "--sites", "resid_mid"), ["unknown site resid_mid"]),
        (_base(tiny_llama_dir, empty_corpus, out), ["holds no tokens"]),
        (_base(tiny_llama_dir, tmp_path / "missing.jsonl", out), ["does not exist"]),
        (_base(tiny_llama_dir, tiny_corpus, out, "--dtype", "int8"), ["unknown dtype"]),
        (_base(tiny_llama_dir, tiny_corpus, out, "--context", "4096"), ["exceeds the model's 512 positions"]),
        (
            _base(tiny_llama_dir, tiny_corpus, out, "--module-paths", "layers=model.blocks"),
            ["--module-paths"],
        ),
    ]
    for args, needles in cases:
        _assert_bad_input(_invoke(*args), *needles)
        assert not out.exists() and not out.parent.exists(), args


def test_unknown_architecture_names_the_flag_and_module_paths_fix_it(tmp_path, tiny_corpus):
    import transformers as T

    folder = tmp_path / "opt"
    config = T.OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                         word_embed_proj_dim=64, max_position_embeddings=512)  # fmt: skip
    T.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    out = tmp_path / "store"
    _assert_bad_input(
        _invoke(*_base(folder, tiny_corpus, out)), "unknown architecture 'opt'", "--module-paths"
    )
    assert not out.exists()
    paths = "layers=model.decoder.layers,attn_out=self_attn,mlp_out=fc2"
    result = _invoke(*_base(folder, tiny_corpus, out, "--module-paths", paths, "--dtype", "fp32"))
    assert result.exit_code == 0, result.output
    store = Store.open(out)
    assert store.spec.layers == (0, 1) and store.committed_tokens == 256
    assert store.spec.harvest_config["module_paths"]["mlp_out"] == "fc2"


def test_existing_store_with_other_config_newer_format_and_disk_space(
    tmp_path, tiny_llama_dir, tiny_corpus, monkeypatch
):
    out = tmp_path / "store"
    assert _invoke(*_base(tiny_llama_dir, tiny_corpus, out, "--layers", "1")).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    # A different config: point to resuming (same command) or --overwrite; nothing changes.
    _assert_bad_input(
        _invoke(*_base(tiny_llama_dir, tiny_corpus, out, "--layers", "2")), "--overwrite", "layers"
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # The same command again: complete, nothing to do.
    again = _invoke(*_base(tiny_llama_dir, tiny_corpus, out, "--layers", "1"))
    assert again.exit_code == 0 and "already complete" in again.stderr

    # A newer format version.
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["actcache"]["format_version"] = 99
    (out / "zarr.json").write_text(json.dumps(meta))
    _assert_bad_input(_invoke(*_base(tiny_llama_dir, tiny_corpus, out, "--layers", "1")), "newer")
    _assert_bad_input(
        _invoke(*_base(tiny_llama_dir, tiny_corpus, out, "--layers", "1", "--overwrite")), "newer"
    )

    # Too little disk: refused before anything is created; --force overrides.
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    fresh = tmp_path / "fresh"
    _assert_bad_input(_invoke(*_base(tiny_llama_dir, tiny_corpus, fresh)), "GB free", "--force")
    assert not fresh.exists()
    assert _invoke(*_base(tiny_llama_dir, tiny_corpus, fresh, "--force")).exit_code == 0
    assert Store.open(fresh).committed_tokens == 256


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, tiny_llama_dir, tiny_corpus):
    out = tmp_path / "sub" / "store"
    result = _invoke(
        *_base(tiny_llama_dir, tiny_corpus, out, "--layers", "0-2", "--sites", "mlp_out", "--dry-run")
    )
    assert result.exit_code == 0, result.output
    assert not out.parent.exists()
    text = " ".join(result.stdout.split())
    assert "8 x 32 tokens = 256 rows" in text and "3 activation arrays" in text and "0-2" in text
    # 256 rows x 64 x 2 bytes x 3 arrays
    assert "0.1 MB" in text


def test_ctrl_c_message_and_exit_code(tmp_path, tiny_llama_dir, tiny_corpus, monkeypatch):
    def interrupted(*args, **kwargs):
        raise HarvestInterrupted(128)

    monkeypatch.setattr(actcache.harvest, "run_harvest", interrupted)
    result = _invoke(*_base(tiny_llama_dir, tiny_corpus, tmp_path / "s"))
    assert result.exit_code == 130
    assert "128 tokens committed" in result.stderr and "rerun the same command to resume" in result.stderr


def test_keep_bits_harvest_equals_the_reencoded_lossless_harvest(tmp_path, tiny_llama_dir, tiny_corpus):
    """`actcache harvest --keep-bits 2` writes the bytes that scripts/reencode_store.py writes from a lossless
    harvest of the same command (the docs/benchmarks.md comparison re-encodes the demo store); resid_pre of layer
    2 is stored once, as resid_post of layer 1, in both."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "reencode_store", Path(__file__).parents[1] / "scripts" / "reencode_store.py"
    )
    reencode_store = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reencode_store)
    base = ["--layers", "1,2", "--sites", "resid_pre,resid_post", "--dtype", "bf16"]
    assert _invoke(*_base(tiny_llama_dir, tiny_corpus, tmp_path / "full", *base)).exit_code == 0
    result = _invoke(*_base(tiny_llama_dir, tiny_corpus, tmp_path / "lossy", *base, "--keep-bits", "2"))
    assert result.exit_code == 0, result.output
    bad = _invoke(*_base(tiny_llama_dir, tiny_corpus, tmp_path / "bad", *base, "--keep-bits", "9"))
    _assert_bad_input(bad, "keep_bits 9 is outside 0..7")
    full, lossy = Store.open(tmp_path / "full"), Store.open(tmp_path / "lossy")
    assert lossy.spec.keep_bits == 2 and lossy.spec.aliases == {"acts/resid_pre/2": "acts/resid_post/1"}
    again = reencode_store.reencode(
        full, str(tmp_path / "again"), [1, 2], ["resid_pre", "resid_post"], 2, False
    )
    keys = ["acts/resid_pre/1", "acts/resid_post/1", "acts/resid_post/2"]
    assert lossy.spec.acts_keys == keys and again.spec.acts_keys == keys
    for key in [*keys, "token_ids", "flags"]:
        for shard in range(4):
            name = Store.shard_key(key, shard)
            assert lossy.io.read(name) == again.io.read(name), name
    assert lossy.rounding == again.rounding
    # Statistics: the harvest's are of the model's values, the re-encoding's of the rounded ones (it has no other).
    for layer, site in [(1, "resid_post"), (2, "resid_post")]:
        a, b = lossy.stats(layer, site), again.stats(layer, site)
        assert a["count"] == b["count"] > 0 and a["mean_sq_norm"] == pytest.approx(
            b["mean_sq_norm"], rel=1e-2
        )
    # The lossy store's rows are the lossless ones rounded: within half a unit of the 3rd significant bit.
    x, y = full.read_acts(1, "resid_post", 0, 256), lossy.read_acts(2, "resid_pre", 0, 256)
    assert np.all(np.abs(y - x) <= np.abs(x) * 2.0**-3) and not np.array_equal(x, y)
