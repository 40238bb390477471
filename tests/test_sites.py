"""The sites table and the parsing of --layers, --sites and --module-paths."""

from __future__ import annotations

import pytest

from actcache.sites import (
    ARCH_TABLE,
    SITES,
    SiteError,
    arch_sites,
    parse_layers,
    parse_module_paths,
    parse_sites,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("all", (0, 1, 2, 3, 4, 5)),
        ("5", (5,)),
        ("0-2", (0, 1, 2)),
        ("3,1", (1, 3)),
        ("0-1,4,1", (0, 1, 4)),
        ("-1", (5,)),
    ],
)
def test_parse_layers(text, expected):
    assert parse_layers(text, 6) == expected


@pytest.mark.parametrize(
    ("text", "match"), [("6", "layer 6 is outside.*0-5"), ("2-7", "outside"), ("x", "bad --layers")]
)
def test_parse_layers_errors(text, match):
    with pytest.raises(SiteError, match=match):
        parse_layers(text, 6)


def test_parse_sites_keeps_canonical_order_and_rejects_unknown_names():
    assert parse_sites("attn_out,resid_pre") == ("resid_pre", "attn_out")
    assert parse_sites("all") == SITES
    with pytest.raises(SiteError, match="unknown site resid_mid"):
        parse_sites("resid_pre,resid_mid")


def test_table_covers_the_promised_architectures():
    for model_type in ("llama", "gemma2", "gemma3", "gemma3_text", "qwen2", "mistral", "gpt2", "gpt_neox"):
        assert model_type in ARCH_TABLE
    assert ARCH_TABLE["gemma2"].attn_out == "post_attention_layernorm"
    assert ARCH_TABLE["gemma3_text"].mlp_out == "post_feedforward_layernorm"


def test_unknown_architecture_names_the_flag_and_module_paths_win():
    with pytest.raises(SiteError, match=r"unknown architecture 'opt'.*--module-paths layers="):
        arch_sites("opt")
    sites = arch_sites("llama", "layers=model.decoder.layers,attn_out=self_attn,mlp_out=fc2")
    assert (sites.layers, sites.attn_out, sites.mlp_out) == (("model.decoder.layers",), "self_attn", "fc2")
    assert parse_module_paths("layers=h").mlp_out == ""
    with pytest.raises(SiteError, match="needs layers="):
        parse_module_paths("attn_out=attn")
