"""`sae import` / `sae export` (sae_cli/formats): a hand-made Gemma Scope params.npz with hand-computed codes;
sparsify and dictionary_learning files written here from their documented layouts, imported and compared with
those libraries' encode rules (written out in this file); our export -> our import for every variant; an imported
SAE evaluated by `sae eval`; and every bad file a one-line error, exit 2, with nothing written.
The round trips through the real sae-lens / sparsify packages are tests/test_formats_peers.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from actcache.store import make_synthetic_store
from sae_cli.cli import app
from sae_cli.formats.meta import parse_hook_name, tl_hook_name
from sae_cli.formats.saelens import export_saelens, import_saelens
from sae_cli.io import load_sae, save_sae
from sae_cli.registry import get_variant, variant_names
from sae_cli.variants.base import SAEConfig

pytestmark = pytest.mark.usefixtures("one_thread_module")
runner = CliRunner()
D, F, K = 8, 24, 3


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- Gemma Scope: hand-made weights, hand-computed codes -------------------------------------------------------
GS = {
    "W_enc": np.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]], np.float32),  # [d_model 2, d_sae 3]
    "b_enc": np.array([0.0, -0.5, 0.1], np.float32),
    "threshold": np.array([0.5, 0.2, 1.0], np.float32),
    "W_dec": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32),
    "b_dec": np.array([0.1, -0.1], np.float32),
}
# pre = x W_enc + b_enc; f = pre where pre > threshold (strictly), else 0
GS_X = [[1.0, 1.0], [0.4, 2.0], [0.5, 0.0]]
GS_F = [[1.0, 0.5, 1.1], [0.0, 1.5, 0.0], [0.0, 0.0, 1.1]]  # x3: pre_0 = 0.5 is not > 0.5
GS_XHAT = [[2.2, 1.5], [0.1, 1.4], [1.2, 1.0]]  # f W_dec + b_dec


def test_gemmascope_params_npz_encodes_as_hand_computed(tmp_path: Path) -> None:
    np.savez(tmp_path / "params.npz", **GS)
    out = tmp_path / "gs"
    res = invoke(
        "import", tmp_path / "params.npz", out, "--format", "gemmascope", "--layer", 0, "--site", "resid_post"
    )
    assert res.exit_code == 0, res.output
    sae = load_sae(out)
    assert sae.cfg.variant == "jumprelu" and (sae.cfg.d_in, sae.cfg.d_sae) == (2, 3)
    with torch.no_grad():
        f = sae.encode(torch.tensor(GS_X))
        torch.testing.assert_close(f, torch.tensor(GS_F), rtol=0, atol=1e-6)
        torch.testing.assert_close(sae.decode(f), torch.tensor(GS_XHAT), rtol=0, atol=1e-6)
    training = json.loads((out / "cfg.json").read_text())["training"]
    assert (training["layer"], training["site"], training["imported"]["format"]) == (
        0,
        "resid_post",
        "gemmascope",
    )

    # it evaluates against a store of the same width: the store's last 10 % of windows
    store = make_synthetic_store(tmp_path / "store2", tokens=2048, d_model=2, context=64)
    res = invoke("eval", out, "--store", store.path, "--no-model", "--device", "cpu")
    assert res.exit_code == 0, res.output
    ev = json.loads((out / "eval.json").read_text())
    assert ev["eval_range"] == [1792, 2048] and ev["l0"] > 0 and ev["l0_error_pct"] is None
    # and not against one of another width (d_in mismatch), nor a site the store lacks
    wide = make_synthetic_store(tmp_path / "store32", tokens=2048, d_model=32, context=64)
    one_line_error(invoke("eval", out, "--store", wide.path, "--no-model"), "d_in=2", "d_model=32")
    res = invoke("import", tmp_path / "params.npz", tmp_path / "gs-mlp", "--format", "gemmascope", "--layer", 0,
                 "--site", "mlp_out")  # fmt: skip
    one_line_error(invoke("eval", tmp_path / "gs-mlp", "--store", store.path, "--no-model"), "mlp_out")


def test_gemmascope_bad_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    flags = ("--format", "gemmascope", "--layer", 1, "--site", "resid_post")
    np.savez(tmp_path / "a.npz", **{k: v for k, v in GS.items() if k != "threshold"})
    one_line_error(invoke("import", tmp_path / "a.npz", out, *flags), "'threshold'")
    np.savez(tmp_path / "b.npz", **{**GS, "b_dec": np.zeros(3, np.float32)})
    one_line_error(invoke("import", tmp_path / "b.npz", out, *flags), "'b_dec'", "(3,)", "(2,)")
    torch.save({k: torch.from_numpy(v) for k, v in GS.items()}, tmp_path / "c.npz")
    one_line_error(invoke("import", tmp_path / "c.npz", out, *flags), "not an array")
    np.savez(tmp_path / "d.npz", **GS)
    one_line_error(invoke("import", tmp_path / "d.npz", out, "--format", "gemmascope"), "--layer")
    one_line_error(invoke("import", tmp_path / "d.npz", out, "--format", "onnx"), "'onnx'", "gemmascope")
    nothing_written(out)


# ---- sparsify: the documented layout, sparsify's rule --------------------------------------------------------
def sparsify_rule(p: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify SparseCoder: top-k of ReLU(encoder(x - b_dec)); decode sum of top acts * W_dec rows + b_dec."""
    pre = torch.relu((x - p["b_dec"]) @ p["encoder.weight"].T + p["encoder.bias"])
    vals, idx = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter_(1, idx, vals)
    return f, f @ p["W_dec"] + p["b_dec"]


def test_sparsify_folder_imports_equal(tmp_path: Path) -> None:
    p = {"encoder.weight": rand(F, D, seed=1), "encoder.bias": rand(F, seed=2) * 0.3,
         "W_dec": rand(F, D, seed=3), "b_dec": rand(D, seed=4)}  # fmt: skip
    src = tmp_path / "sparsify" / "layers.3.mlp"
    src.mkdir(parents=True)
    save_file(p, str(src / "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": 3, "normalize_decoder": True, "num_latents": F, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}  # fmt: skip
    (src / "cfg.json").write_text(json.dumps(cfg))
    assert invoke("import", src, tmp_path / "ours", "--format", "sparsify").exit_code == 0
    sae = load_sae(tmp_path / "ours")
    training = json.loads((tmp_path / "ours" / "cfg.json").read_text())["training"]
    assert (sae.cfg.variant, sae.cfg.l0_target, training["layer"], training["site"]) == (
        "topk",
        K,
        3,
        "mlp_out",
    )
    x = rand(64, D, seed=5)
    f_ref, x_ref = sparsify_rule(p, x, K)
    with torch.no_grad():
        assert rel(f_ref, sae.encode(x)) <= 1e-6 and rel(x_ref, sae.forward(x)) <= 1e-6

    out = tmp_path / "bad"
    (src / "cfg.json").write_text(json.dumps({**cfg, "activation": "groupmax"}))
    one_line_error(invoke("import", src, out, "--format", "sparsify"), "'groupmax'")
    (src / "cfg.json").write_text(json.dumps(cfg))
    torch.save(p, src / "sae.safetensors")  # a pickle where safetensors is expected
    one_line_error(invoke("import", src, out, "--format", "sparsify"), "pickle", "not unpickled")
    save_file({k: v for k, v in p.items() if k != "W_dec"}, str(src / "sae.safetensors"))
    one_line_error(invoke("import", src, out, "--format", "sparsify"), "'W_dec'")
    nothing_written(out)


# ---- dictionary_learning: the documented key sets, their encode rules ----------------------------------------
def dl_state(cls: str) -> dict[str, torch.Tensor]:
    W, Wd, b, bd = rand(F, D, seed=11), rand(D, F, seed=12), rand(F, seed=13) * 0.3, rand(D, seed=14)
    if cls == "AutoEncoder":
        return {"bias": bd, "encoder.weight": W, "encoder.bias": b, "decoder.weight": Wd}
    if cls == "GatedAutoEncoder":
        return {"decoder_bias": bd, "encoder.weight": W, "r_mag": rand(F, seed=15) * 0.3, "gate_bias": b,
                "mag_bias": rand(F, seed=16) * 0.3, "decoder.weight": Wd}  # fmt: skip
    if cls == "JumpReluAutoEncoder":
        return {"W_enc": W.T.contiguous(), "b_enc": b, "W_dec": Wd.T.contiguous(), "b_dec": bd,
                "threshold": rand(F, seed=17).abs() * 0.5}  # fmt: skip
    k, threshold = torch.tensor(K, dtype=torch.int32), torch.tensor(0.8)
    return {
        "k": k,
        "threshold": threshold,
        "decoder.weight": Wd,
        "encoder.weight": W,
        "encoder.bias": b,
        "b_dec": bd,
    }


def dl_rule(cls: str, p: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dictionary_learning's encode (inference defaults) and decode of each class."""
    if cls == "JumpReluAutoEncoder":
        pre = x @ p["W_enc"] + p["b_enc"]
        f = torch.relu(pre * (pre > p["threshold"]))
        return f, f @ p["W_dec"] + p["b_dec"]
    if cls == "GatedAutoEncoder":
        x_enc = (x - p["decoder_bias"]) @ p["encoder.weight"].T
        f = (x_enc + p["gate_bias"] > 0) * torch.relu(p["r_mag"].exp() * x_enc + p["mag_bias"])
        return f, f @ p["decoder.weight"].T + p["decoder_bias"]
    bias = p["bias"] if cls == "AutoEncoder" else p["b_dec"]
    post = torch.relu((x - bias) @ p["encoder.weight"].T + p["encoder.bias"])
    if cls == "AutoEncoderTopK":
        vals, idx = post.topk(K, dim=-1)
        post = torch.zeros_like(post).scatter_(1, idx, vals)
    elif cls == "BatchTopKSAE":
        post = post * (post > p["threshold"])
    return post, post @ p["decoder.weight"].T + bias


DL = {"AutoEncoder": "relu", "GatedAutoEncoder": "gated", "JumpReluAutoEncoder": "jumprelu",
      "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk"}  # fmt: skip


@pytest.mark.parametrize("cls", list(DL))
def test_dictionary_learning_imports_equal(tmp_path: Path, cls: str) -> None:
    p = dl_state(cls)
    torch.save(p, tmp_path / "ae.pt")
    trainer = {"dict_class": cls, "activation_dim": D, "dict_size": F, "layer": 2, "lm_name": "tiny/lm"}
    (tmp_path / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 64}}))
    res = invoke(
        "import", tmp_path, tmp_path / "ours", "--format", "dictionary_learning", "--site", "resid_post"
    )
    assert res.exit_code == 0, res.output
    sae = load_sae(tmp_path / "ours")
    training = json.loads((tmp_path / "ours" / "cfg.json").read_text())["training"]
    assert (sae.cfg.variant, training["layer"], training["source_model"]) == (DL[cls], 2, "tiny/lm")
    x = rand(64, D, seed=20)
    f_ref, x_ref = dl_rule(cls, p, x)
    with torch.no_grad():
        f = sae.encode(x)
        assert rel(f_ref, f) <= 1e-6 and rel(x_ref, sae.decode(f)) <= 1e-6
        assert float((f != 0).sum(-1).float().mean()) > 0.5


def test_dictionary_learning_bad_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    flags = ("--format", "dictionary_learning", "--layer", 0, "--site", "resid_post")
    torch.save(dl_state("BatchTopKSAE"), tmp_path / "ae.pt")  # no config.json: two classes fit these keys
    one_line_error(invoke("import", tmp_path / "ae.pt", out, *flags), "AutoEncoderTopK and BatchTopKSAE")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "CrossCoder"}}))
    one_line_error(invoke("import", tmp_path, out, *flags), "'CrossCoder'")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    one_line_error(invoke("import", tmp_path, out, *flags), "'bias'", "AutoEncoder")
    # an object in the checkpoint: never unpickled
    torch.save({**dl_state("AutoEncoder"), "probe": Probe()}, tmp_path / "ae.pt")
    one_line_error(invoke("import", tmp_path, out, *flags), "weights_only")
    assert not Probe.built
    torch.save({**dl_state("AutoEncoder"), "bias": torch.zeros(D + 1)}, tmp_path / "ae.pt")
    one_line_error(invoke("import", tmp_path, out, *flags), "'bias'", f"({D + 1},)")
    nothing_written(out)


class Probe:
    """An object in a checkpoint: unpickling it would run __setstate__."""

    built = False

    def __setstate__(self, state: dict) -> None:
        Probe.built = True


# ---- SAELens without the library: ours -> export -> import -> ours -------------------------------------------
def our_sae(name: str, seed: int):
    torch.manual_seed(seed)
    sae = get_variant(name)(SAEConfig(variant=name, d_in=D, d_sae=F, l0_target=K))
    x = rand(256, D, seed=seed)
    sae.init_from_data(x)
    with torch.no_grad():
        for prm in sae.parameters():
            prm.add_(rand(*prm.shape, seed=seed + 1) * 0.1)
    sae.calibrate(x, 64)
    return sae.eval()


@pytest.mark.parametrize("name", variant_names())
def test_saelens_export_then_import_is_the_same_sae(tmp_path: Path, name: str) -> None:
    run = save_sae(tmp_path / "run", our_sae(name, 3), {"layer": 5, "site": "attn_out", "store": "/nowhere"})
    out = export_saelens(run, tmp_path / "sl")
    cfg = json.loads((out / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert cfg["normalize_activations"] == "none" and meta["hook_name"] == "model.layers.5.self_attn"
    assert (meta["hook_name_transformer_lens"], meta["layer"], meta["site"]) == (
        "blocks.5.hook_attn_out",
        5,
        "attn_out",
    )
    back = load_sae(import_saelens(out, tmp_path / "back"))
    ours = load_sae(run)
    x = rand(128, D, seed=9)
    with torch.no_grad():
        a, b = ours.encode(x), back.encode(x)
        assert (a != 0).any() and rel(a, b) <= 1e-5 and rel(ours.decode(a), back.decode(a)) <= 1e-5


def test_saelens_bad_files_and_refusals(tmp_path: Path) -> None:
    run = save_sae(tmp_path / "run", our_sae("jumprelu", 4), {"layer": 1, "site": "resid_post"})
    src = export_saelens(run, tmp_path / "sl")
    one_line_error(invoke("export", run, src, "--format", "saelens"), "already exists", "--overwrite")
    assert invoke("export", run, src, "--format", "saelens", "--overwrite").exit_code == 0
    out = tmp_path / "out"
    cfg = json.loads((src / "cfg.json").read_text())
    (src / "cfg.json").write_text(json.dumps({**cfg, "architecture": "transcoder"}))
    one_line_error(invoke("import", src, out, "--format", "saelens"), "'transcoder'")
    (src / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    one_line_error(invoke("import", src, out, "--format", "saelens"), "'layer_norm'")
    (src / "cfg.json").write_text(json.dumps({**cfg, "d_sae": F + 1}))
    one_line_error(
        invoke("import", src, out, "--format", "saelens"), "'W_enc'", f"({D}, {F})", f"({D}, {F + 1})"
    )
    (src / "cfg.json").write_text(json.dumps(cfg))
    (src / "sae_weights.safetensors").write_bytes(b"\x80\x04garbage")
    one_line_error(invoke("import", src, out, "--format", "saelens"), "pickle")
    one_line_error(invoke("export", tmp_path / "nope", tmp_path / "x", "--format", "saelens"), "no cfg.json")
    one_line_error(invoke("export", run, tmp_path / "x", "--format", "gemmascope"), "'gemmascope'", "saelens")
    nothing_written(out)


def test_hook_names() -> None:
    assert parse_hook_name(tl_hook_name(7, "mlp_out")) == (7, "mlp_out")
    assert parse_hook_name("model.layers.12") == (12, "resid_post")
    assert parse_hook_name("model.layers.3.post_feedforward_layernorm") == (3, "mlp_out")
    assert parse_hook_name("transformer.h.2.attn") == (2, "attn_out")
    assert parse_hook_name("layers.4") == (4, "resid_post") and parse_hook_name("lm_head") is None


def test_saelens_pre6_topk_config(tmp_path: Path) -> None:
    """Before SAELens 6 a top-k SAE was architecture "standard" with activation_fn "topk"; importing it as a ReLU
    SAE would be silently wrong."""
    p = {"W_enc": rand(D, F, seed=30), "b_enc": rand(F, seed=31) * 0.3, "W_dec": rand(F, D, seed=32),
         "b_dec": rand(D, seed=33)}  # fmt: skip
    save_file(p, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"d_in": D, "d_sae": F, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
           "hook_point": "blocks.1.hook_resid_pre", "apply_b_dec_to_input": True}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(import_saelens(tmp_path, tmp_path / "ours"))
    training = json.loads((tmp_path / "ours" / "cfg.json").read_text())["training"]
    assert (sae.cfg.variant, sae.cfg.l0_target, training["layer"], training["site"]) == (
        "topk",
        K,
        1,
        "resid_pre",
    )
    x = rand(64, D, seed=34)
    pre = torch.relu((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
    vals, idx = pre.topk(K, dim=-1)
    with torch.no_grad():
        assert rel(torch.zeros_like(pre).scatter_(1, idx, vals), sae.encode(x)) <= 1e-6
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "activation_fn_str": "tanh-sq"}))
    out = tmp_path / "bad"
    one_line_error(invoke("import", tmp_path, out, "--format", "saelens"), "'tanh-sq'")
    nothing_written(out)
