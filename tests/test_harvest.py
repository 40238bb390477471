"""Harvest parity: stored activations equal an independent forward (output_hidden_states + hooks), bit for bit
in the stored dtype; the forward stops after the last requested layer; statistics and per-token arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BOS_ID, N_LAYERS, save_tiny_model, tiny_config

from actcache.codecs import to_stored
from actcache.corpus import FLAG_BOS, FLAG_PAD
from actcache.harvest import HarvestConfig, HarvestInterrupted, plan_harvest, run_harvest
from actcache.models import load_model, resolve_model
from actcache.sites import ARCH_TABLE, find_blocks, site_module
from actcache.store import Store

CONTEXT, BATCH, SHARD = 32, 3, 128  # 4 windows per shard: batches of 3 + 1 windows inside every shard

pytestmark = pytest.mark.usefixtures("one_thread")


def _harvest(tmp_path, corpus, arch="llama", **overrides):
    folder = save_tiny_model(tmp_path / f"model-{arch}", arch)
    options = dict(
        model=str(folder), dataset=str(corpus), context=CONTEXT, batch_size=BATCH, shard_tokens=SHARD,
        device="cpu", dtype="fp32", tokens=600,
    )  # fmt: skip
    plan = plan_harvest(HarvestConfig(**(options | overrides)))
    model = load_model(plan.source, "cpu", torch.float32)
    out = tmp_path / f"store-{arch}"
    result = run_harvest(plan, out, model=model)
    return plan, model, Store.open(out), result


def _reference(model, arch: str, ids_NC: np.ndarray) -> dict[str, torch.Tensor]:
    """Every site of every layer, computed independently: output_hidden_states for the residual stream
    (plus a block hook for the last layer's output, which HF reports after the final norm) and forward hooks
    on the attention/MLP modules; batches of BATCH windows restarting at every shard, like the harvest."""
    blocks = find_blocks(model, ARCH_TABLE[arch])
    per_batch: dict[str, list[torch.Tensor]] = {}
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(blocks):
        for site in ("attn_out", "mlp_out"):
            key = f"acts/{site}/{layer}"

            def hook(module, args, output, key=key):
                captured[key] = (output[0] if isinstance(output, tuple) else output).detach()

            handles.append(site_module(block, ARCH_TABLE[arch], site).register_forward_hook(hook))

    def last_hook(module, args, output):
        captured[f"acts/resid_post/{N_LAYERS - 1}"] = (
            output[0] if isinstance(output, tuple) else output
        ).detach()

    handles.append(blocks[-1].register_forward_hook(last_hook))
    per_shard = SHARD // CONTEXT
    try:
        with torch.inference_mode():
            for s0 in range(0, len(ids_NC), per_shard):
                for b0 in range(s0, min(s0 + per_shard, len(ids_NC)), BATCH):
                    b1 = min(b0 + BATCH, s0 + per_shard, len(ids_NC))
                    ids_BC = torch.from_numpy(ids_NC[b0:b1].astype(np.int64))
                    hidden = model(input_ids=ids_BC, output_hidden_states=True, use_cache=False).hidden_states
                    for layer in range(N_LAYERS):
                        captured[f"acts/resid_pre/{layer}"] = hidden[layer]
                        if layer + 1 < N_LAYERS:
                            captured[f"acts/resid_post/{layer}"] = hidden[layer + 1]
                    for key, x in captured.items():
                        per_batch.setdefault(key, []).append(x.reshape(-1, x.shape[-1]).clone())
    finally:
        for h in handles:
            h.remove()
    return {key: torch.cat(xs) for key, xs in per_batch.items()}


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "gpt_neox", "qwen2", "mistral", "gemma3_text"])
def test_stored_activations_equal_independent_forward(tmp_path, tiny_corpus, arch):
    plan, model, store, result = _harvest(tmp_path, tiny_corpus, arch)
    n = store.committed_tokens
    assert n == plan.spec.tokens_target == 19 * CONTEXT and result.complete
    assert plan.spec.shard_tokens == SHARD and n % SHARD != 0  # a last partial shard is exercised
    ids_NC = store.read("token_ids", 0, n).reshape(-1, CONTEXT)
    expected = _reference(model, arch, ids_NC)
    assert len(expected) == N_LAYERS * 4
    for layer in range(N_LAYERS):
        for site in ("resid_pre", "resid_post", "mlp_out", "attn_out"):
            got = store.read_acts(layer, site, 0, n, dtype="stored")
            want = to_stored(expected[f"acts/{site}/{layer}"], "float32")
            assert got.dtype == np.float32 and got.shape == (n, 64)
            assert np.array_equal(got, want), f"{arch} layer {layer} {site}"
    # resid_post L is the next block's input, exactly: stored once, read under both keys.
    assert store.spec.aliases == {
        f"acts/resid_pre/{i + 1}": f"acts/resid_post/{i}" for i in range(N_LAYERS - 1)
    }
    assert not (store.path / "acts/resid_pre/1").exists() and (store.path / "acts/resid_pre/0").exists()
    for layer in range(N_LAYERS - 1):
        assert np.array_equal(
            store.read_acts(layer, "resid_post", 0, n, dtype="stored"),
            store.read_acts(layer + 1, "resid_pre", 0, n, dtype="stored"),
        )


def test_bf16_and_fp16_are_the_rounded_fp32_values(tmp_path, tiny_corpus):
    _, model, store16, _ = _harvest(tmp_path / "bf", tiny_corpus, "llama", dtype="bf16", layers="1,3")
    _, _, storeh, _ = _harvest(tmp_path / "h", tiny_corpus, "llama", dtype="fp16", layers="1,3")
    n = store16.committed_tokens
    expected = _reference(model, "llama", store16.read("token_ids", 0, n).reshape(-1, CONTEXT))
    assert store16.spec.layers == (1, 3)
    for layer in (1, 3):
        for site in ("resid_pre", "resid_post", "mlp_out", "attn_out"):
            x = expected[f"acts/{site}/{layer}"]
            bits = store16.read_acts(layer, site, 0, n, dtype="stored")
            assert bits.dtype == np.uint16
            assert np.array_equal(bits, x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
            assert np.array_equal(storeh.read_acts(layer, site, 0, n, dtype="stored"), x.half().numpy())


def test_per_token_arrays_and_statistics(tmp_path, tiny_corpus):
    plan, model, store, _ = _harvest(tmp_path, tiny_corpus, "llama", layers="2", sites="mlp_out,resid_post")
    n = store.committed_tokens
    flags = store.read("flags", 0, n).reshape(-1, CONTEXT)
    ids = store.read("token_ids", 0, n).reshape(-1, CONTEXT)
    assert np.array_equal(store.read("positions", 0, n).reshape(-1, CONTEXT)[5], np.arange(CONTEXT))
    assert (ids[:, 0] == BOS_ID).all() and (flags[:, 0] & FLAG_BOS).all()  # every window starts with BOS
    assert (flags[:-1] & FLAG_PAD == 0).all()  # only the last window may hold padding
    assert (store.read("doc_ids", 0, n)[store.read("flags", 0, n) & FLAG_PAD > 0] == -1).all()
    keep = (store.read("flags", 0, n) & (FLAG_BOS | FLAG_PAD)) == 0
    for site in ("mlp_out", "resid_post"):
        x = store.read_acts(2, site, 0, n).astype(np.float64)[keep]
        stats = store.stats(2, site)
        assert stats["count"] == keep.sum() == plan.n_content_tokens > 500
        np.testing.assert_allclose(stats["mean"], x.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats["mean_sq_norm"], (x * x).sum(1).mean(), rtol=1e-6)


class _Counter:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1


def test_forward_stops_after_the_last_requested_layer(tmp_path, tiny_corpus):
    folder = save_tiny_model(tmp_path / "m", "llama")
    model = load_model(resolve_model(str(folder)), "cpu", torch.float32)
    blocks = find_blocks(model, ARCH_TABLE["llama"])
    for sites, ran_l2_mlp in (("resid_post,attn_out", 1), ("resid_pre", 0)):
        counters = {
            "block2": _Counter(blocks[2]),
            "block2_mlp": _Counter(blocks[2].mlp),
            "block3": _Counter(blocks[3]),
            "norm": _Counter(model.model.norm),
            "lm_head": _Counter(model.lm_head),
        }
        cfg = HarvestConfig(
            model=str(folder), dataset=str(tiny_corpus), context=CONTEXT, batch_size=BATCH,
            shard_tokens=SHARD, device="cpu", dtype="fp32", tokens=600, layers="2", sites=sites,
        )  # fmt: skip
        run_harvest(plan_harvest(cfg), tmp_path / sites, model=model)
        n_batches = 4 * 2 + 1  # 19 windows: 4 shards of 4 windows (batches of 3 + 1), one shard of 3
        assert counters["block2"].calls == n_batches
        assert counters["block2_mlp"].calls == ran_l2_mlp * n_batches
        assert counters["block3"].calls == counters["norm"].calls == counters["lm_head"].calls == 0
        for c in counters.values():
            c.handle.remove()


def test_every_table_architecture_builds(tmp_path):
    """The table resolves the blocks and sub-modules of each listed architecture's tiny model."""
    from transformers import AutoModelForCausalLM

    for arch in ("llama", "gemma2", "gemma3_text", "qwen2", "mistral", "gpt2", "gpt_neox"):
        model = AutoModelForCausalLM.from_config(tiny_config(arch))
        blocks = find_blocks(model, ARCH_TABLE[model.config.model_type])
        assert len(blocks) == N_LAYERS
        names = {
            site: type(site_module(blocks[1], ARCH_TABLE[arch], site)).__name__
            for site in ("attn_out", "mlp_out")
        }
        if arch.startswith("gemma"):
            assert names["attn_out"].endswith("RMSNorm") and names["mlp_out"].endswith("RMSNorm")


def test_ctrl_c_commits_complete_shards_and_the_rerun_matches(tmp_path, tiny_corpus):
    """KeyboardInterrupt mid-shard: complete shards are committed, the partial one dropped; the resumed store
    equals an uninterrupted one bit for bit (same batch composition after the resume)."""
    plan, model, reference, _ = _harvest(tmp_path, tiny_corpus, "llama", dtype="bf16", batch_size=2)
    out = tmp_path / "interrupted"

    def interrupt(p):
        if p.tokens_done >= 2 * SHARD + 2 * CONTEXT:  # two shards forwarded and half of the third
            raise KeyboardInterrupt

    with pytest.raises(HarvestInterrupted) as stop:
        run_harvest(plan, out, model=model, progress=interrupt)
    assert stop.value.committed_tokens == Store.open(out).committed_tokens == 2 * SHARD
    result = run_harvest(plan, out, model=model)
    assert result.tokens_start == 2 * SHARD and result.complete
    resumed = Store.open(out)
    n = reference.committed_tokens
    assert resumed.committed_tokens == n
    for key in reference.spec.array_keys:
        assert np.array_equal(resumed.array(key)[:n], reference.array(key)[:n]), key
    for layer, site in reference.keys:
        a, b = resumed.running_stats(layer, site), reference.running_stats(layer, site)
        assert a.count == b.count and a.mean_sq_norm == b.mean_sq_norm and np.array_equal(a.mean, b.mean)


def test_equal_sites_stored_once_and_read_back_as_the_model_produced(tmp_path, tiny_corpus):
    """resid_pre L+1 = resid_post L is one array; both keys, every reader path, verify and info see it."""
    from typer.testing import CliRunner

    from actcache.cli import app
    from actcache.reader import ActivationReader
    from actcache.verify import verify_store

    plan, model, store, _ = _harvest(
        tmp_path, tiny_corpus, "llama", layers="1,2", sites="resid_pre,resid_post"
    )
    assert plan.spec.aliases == {"acts/resid_pre/2": "acts/resid_post/1"}
    assert plan.spec.acts_keys == ["acts/resid_pre/1", "acts/resid_post/1", "acts/resid_post/2"]
    assert sorted(p.name for p in (store.path / "acts/resid_pre").iterdir() if p.is_dir()) == ["1"]
    n = store.committed_tokens
    expected = _reference(model, "llama", store.read("token_ids", 0, n).reshape(-1, CONTEXT))
    for layer, site in [(1, "resid_pre"), (1, "resid_post"), (2, "resid_pre"), (2, "resid_post")]:
        want = expected[f"acts/{site}/{layer}"].numpy()
        assert np.array_equal(store.read_acts(layer, site, 0, n), want), (layer, site)
        assert np.array_equal(np.asarray(store.acts(layer, site)[:n]), want)
        chunks = [
            store.read_chunk(f"acts/{site}/{layer}", c) for c in range(-(-n // store.spec.chunk_tokens))
        ]
        assert np.array_equal(np.concatenate(chunks), want)
    assert store.stats(2, "resid_pre")["count"] == store.stats(1, "resid_post")["count"] > 0
    assert np.array_equal(store.stats(2, "resid_pre")["mean"], store.stats(1, "resid_post")["mean"])
    # The shuffling reader under the alias key yields the same rows as under the stored key.
    a, b = (
        ActivationReader(store, [key], batch_size=64, seed=1, drop_bos=False, dtype=torch.float32)
        for key in [(2, "resid_pre"), (1, "resid_post")]
    )
    got_a, got_b = next(iter(a)), next(iter(b))
    assert torch.equal(got_a.acts[(2, "resid_pre")], got_b.acts[(1, "resid_post")])
    report = verify_store(store.path)
    assert report.ok and report.arrays == 3 + 4
    info = CliRunner().invoke(app, ["info", str(store.path)])
    assert (
        info.exit_code == 0
        and "acts/resid_pre/2 = acts/resid_post/1" in info.output
        and "format 3" in info.output
    )


def test_keep_bits_harvest_rounds_and_records_its_error(tmp_path, tiny_corpus):
    """--keep-bits 2: every stored value is the model's bf16 value rounded to 2 mantissa bits (nearest even);
    the commit record holds the measured error; the reader returns float32."""
    from actcache.lossy import ERROR_ROW_STRIDE, round_mantissa

    plan, model, store, _ = _harvest(tmp_path, tiny_corpus, "llama", layers="2", sites="resid_post", dtype="bf16",
                                     keep_bits=2)  # fmt: skip
    assert store.spec.keep_bits == 2 and store.format_version == 3
    n = store.committed_tokens
    x = _reference(model, "llama", store.read("token_ids", 0, n).reshape(-1, CONTEXT))["acts/resid_post/2"]
    bf16 = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    bits = store.read_acts(2, "resid_post", 0, n, dtype="stored")
    assert np.array_equal(bits, round_mantissa(bf16, "bfloat16", 2))
    assert not np.any(bits & 0x1F)  # the 5 low mantissa bits are zero
    got = store.read_acts(2, "resid_post", 0, n)
    full = (bf16.astype(np.uint32) << 16).view(np.float32)
    assert got.dtype == np.float32
    # Relative error of one value at most 2^-3 (half a unit in the last kept place).
    assert np.all(np.abs(got - full) <= np.abs(full) * 2.0**-3 + 1e-30)
    sq_err, sq, sq_centered = store.rounding["acts/resid_post/2"]
    # Measured where the statistics count (not BOS, not padding), every 8th such row of each shard.
    keep = (store.read("flags", 0, n) & (FLAG_BOS | FLAG_PAD)) == 0
    assert 0 < keep.sum() < n
    rows = np.concatenate(
        [s0 + np.flatnonzero(keep[s0 : s0 + SHARD])[::ERROR_ROW_STRIDE] for s0 in range(0, n, SHARD)]
    )
    err = ((got - full)[rows].astype(np.float64) ** 2).sum()
    assert sq_err == pytest.approx(err, rel=1e-9)
    assert sq == pytest.approx((full[rows].astype(np.float64) ** 2).sum())
    assert 0 < sq_err / sq < 2.0**-6 and sq_centered <= sq
