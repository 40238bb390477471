"""The end-to-end objective (sae_cli/e2e.py, sae_cli/e2e_setup.py): the chunked KL against a direct full-logits
KL, the objective on fakes and on a tiny harvested Llama, one training step (gradients on the SAE, none on the
model), `sae train --objective e2e` through the CLI, and its one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tokenizer, save_tiny_model
from torch import nn
from typer.testing import CliRunner

from actcache.cli import app as actcache_app
from actcache.reader import iter_windows
from actcache.store import FLAG_BOS, FLAG_PAD, Store
from sae_cli.cli import app
from sae_cli.e2e import E2EBatch, E2EObjective, SiteTail, chunked_kl
from sae_cli.objective import ObjectiveContext

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
KEY = (1, "resid_post")
KEY0 = (0, "resid_post")


# ---- fakes -----------------------------------------------------------------------------------------------------
class FakeTail(nn.Module):
    """A tail with one residual MLP block, a final RMS norm, a linear head and Gemma-2's soft-cap."""

    def __init__(self, d: int = 8, vocab: int = 50, softcap: float | None = 5.0, layer: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block, self.norm = nn.Linear(d, d), nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.softcap, self.layer, self.n_layers = softcap, layer, layer + 2
        self.requires_grad_(False)

    def final_hidden(self, resid, keep=()):
        h = resid + torch.tanh(self.block(resid))
        return self.norm(h), {self.layer + 1: h} if self.layer + 1 in keep else {}

    def head(self, h):
        logits = self.lm_head(h)
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def logits(self, resid):
        return self.head(self.final_hidden(resid)[0])

    def head_only(self, resid):
        return self.head(self.norm(resid))


def direct_kl(logits_ref, logits):
    """KL(p_ref || p) summed over the vocabulary, per position, from full logits."""
    logp_ref, logp = F.log_softmax(logits_ref.double(), -1), F.log_softmax(logits.double(), -1)
    return (logp_ref.exp() * (logp_ref - logp)).sum(-1)


def fake_windows(W=3, C=6, d=8, seed=1):
    """A window batch: BOS at position 0 of each window and mid-window in the second, padding at the end of
    the third."""

    class WB:
        pass

    g = torch.Generator().manual_seed(seed)
    wb = WB()
    flags = torch.zeros(W, C, dtype=torch.uint8)
    flags[:, 0] = FLAG_BOS
    flags[1, 3] = FLAG_BOS
    flags[2, -2:] = FLAG_PAD
    wb.flags, wb.token_ids = flags, torch.randint(0, 50, (W, C), generator=g)
    wb.acts = {(0, "resid_post"): 3 * torch.randn(W, C, d, generator=g)}
    wb.index = torch.arange(W * C).view(W, C)
    return wb


# ---- the chunked KL ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_kl_equals_the_full_logits_kl(chunk: int, softcap: float | None) -> None:
    tail = FakeTail(softcap=softcap)
    g = torch.Generator().manual_seed(2)
    h_ref = torch.randn(23, 8, generator=g)
    h = (h_ref + 0.5 * torch.randn(23, 8, generator=g)).requires_grad_(True)
    h2 = h.detach().clone().requires_grad_(True)
    weights = torch.rand(23, generator=g)  # any function of the hidden states upstream of the KL
    got = chunked_kl(h * weights[:, None], h_ref, tail.head, tail.head, chunk) / 23
    want = direct_kl(tail.head(h_ref), tail.head(h2 * weights[:, None])).mean()
    got.backward()
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), abs=1e-6)
    assert torch.allclose(h.grad, h2.grad.float(), atol=1e-6, rtol=0)
    with torch.no_grad():  # no graph: the same value, no gradient computed
        assert float(
            chunked_kl(h * weights[:, None], h_ref, tail.head, tail.head, chunk)
        ) / 23 == pytest.approx(float(want), abs=1e-6)


def test_the_objective_on_a_fake_tail_is_the_kl_of_the_spliced_windows() -> None:
    """Reconstruction into the trained positions, BOS and padding keep their cached activation, KL over the
    predictions of trained tokens; gradients equal the direct computation's."""
    tail, wb = FakeTail(), fake_windows()
    key = (0, "resid_post")
    batch = E2EBatch.of(wb, [key])
    assert batch.acts[key].shape == (3 * 6 - 4 - 2, 8)  # 4 BOS, 2 padding
    assert torch.equal(batch.index, wb.index[batch.train_WC])
    scale = 0.5
    x = batch.acts[key] * scale
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    objective = E2EObjective({KEY0: SiteTail(tail, KEY0)})
    recon = objective(x, x_hat, ObjectiveContext(key, scale, batch, 0))
    recon.loss.backward()

    x_hat2 = x_hat.detach().clone().requires_grad_(True)
    resid = wb.acts[key].clone()
    resid[batch.train_WC] = x_hat2 / scale
    target = batch.train_WC[:, 1:]
    kl = direct_kl(tail.logits(wb.acts[key])[:, :-1], tail.logits(resid)[:, :-1])[target].mean()
    kl.backward()
    assert float(recon.parts["kl"]) == pytest.approx(float(kl.detach()), abs=1e-6)
    assert float(recon.loss.detach()) == pytest.approx(float(kl.detach()), abs=1e-6)
    assert torch.allclose(x_hat.grad, x_hat2.grad.float(), atol=1e-6, rtol=0)
    mse = float((x_hat - x).detach().pow(2).sum(-1).mean())
    assert float(recon.parts["mse"]) == pytest.approx(mse, rel=1e-6)
    # no step (the controller's initial coefficient): the local MSE under the same part
    local = objective(x, x_hat, None)
    assert set(local.parts) == {"kl"} and float(local.loss.detach()) == pytest.approx(
        float(recon.parts["mse"])
    )


def test_downstream_terms_and_the_clean_side_from_the_store() -> None:
    """e2e+ds adds ds_coef / len(layers) x MSE at each downstream layer; where the store holds the last layer's
    resid_post the clean distribution comes from it (head_only, no block), and the targets from the store."""
    tail, wb = FakeTail(), fake_windows()
    key = (0, "resid_post")
    batch = E2EBatch.of(wb, [key])
    x = batch.acts[key]
    x_hat = x + 0.2
    ctx = ObjectiveContext(key, 1.0, batch, 0)
    ds = E2EObjective({KEY0: SiteTail(tail, KEY0)}, ds_layers=(1,), ds_coef=2.5, kl_coef=0.5)
    recon = ds(x, x_hat, ctx)
    assert ds.name == "e2e+ds" and set(recon.parts) == {"kl", "mse", "ds_mse"}
    assert float(recon.loss) == pytest.approx(
        float(0.5 * recon.parts["kl"] + 2.5 * recon.parts["ds_mse"]), rel=1e-6
    )
    # the same clean side from the store: the last layer's (here: layer 1) resid_post and the ds target
    clean_h, kept = tail.final_hidden(wb.acts[key], keep=(1,))
    wb.acts[(1, "resid_post")] = kept[1]
    from_store = E2EObjective({KEY0: SiteTail(tail, KEY0)}, ds_layers=(1,), ds_coef=2.5, kl_coef=0.5)
    stored = from_store(x, x_hat, ObjectiveContext(key, 1.0, E2EBatch.of(wb, [key]), 0))
    for part in ("kl", "ds_mse"):
        assert float(stored.parts[part]) == pytest.approx(float(recon.parts[part]), abs=1e-6)


def test_the_clean_side_is_computed_once_per_batch() -> None:
    calls = []

    class Counting(FakeTail):
        def final_hidden(self, resid, keep=()):
            calls.append(torch.is_grad_enabled())
            return super().final_hidden(resid, keep)

    tail, key = Counting(), (0, "resid_post")
    batch = E2EBatch.of(fake_windows(), [key])
    objective = E2EObjective({KEY0: SiteTail(tail, KEY0)})
    x = batch.acts[key]
    for _ in range(3):  # three members of a sweep on the same batch
        objective(x, x + 0.1, ObjectiveContext(key, 1.0, batch, 0))
    assert calls == [False, True, True, True]  # one no-grad clean pass, one spliced pass per member


# ---- a tiny harvested Llama -------------------------------------------------------------------------------------
def harvest(model: Path, corpus: Path, out: Path, layers: str, tokens: int = 2048) -> Path:
    res = CliRunner().invoke(actcache_app, ["harvest", *map(str, [
        model, "--dataset", corpus, "--layers", layers, "--sites", "resid_post,mlp_out", "--context", 32,
        "--tokens", tokens, "--dtype", "fp32", "--device", "cpu", "--out", out,
    ])])  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_llama_dir: Path, tiny_corpus: Path) -> Path:
    """resid_post (and mlp_out) of layer 1 of the 4-layer tiny Llama, fp32, context 32."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return harvest(tiny_llama_dir, tiny_corpus, tmp_path_factory.mktemp("e2e") / "store", "1")
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def test_the_identity_sae_has_zero_e2e_loss(store: Path, tiny_llama) -> None:
    from actcache.models import store_arch
    from actcache.tail import Tail

    s = Store.open(store)
    tail = Tail(tiny_llama, store_arch(s.spec), 1)
    objective = E2EObjective({KEY: SiteTail(tail, KEY)}, vocab=256)
    wb = next(iter(iter_windows(s, [KEY], (0, s.committed_tokens), windows=4)))
    batch = E2EBatch.of(wb, [KEY])
    scale = 0.37
    x = batch.acts[KEY] * scale
    x_hat = x.clone().requires_grad_(True)
    recon = objective(x, x_hat, ObjectiveContext(KEY, scale, batch, 0))
    assert abs(float(recon.loss.detach())) <= 1e-6 and float(recon.parts["mse"]) == 0.0
    # and the KL is what the whole model gives with the reconstruction spliced in at layer 1
    recon.loss.backward()
    assert x_hat.grad is not None and all(p.grad is None for p in tiny_llama.parameters())
    noisy = x + 0.05 * torch.randn_like(x)
    kl = float(objective(x, noisy, ObjectiveContext(KEY, scale, batch, 1)).parts["kl"])
    assert kl > 1e-4
    from sae_cli.splice import Window, splice_metrics

    stored = wb.acts[KEY].reshape(-1, wb.acts[KEY].shape[-1])
    recon_rows = stored.clone()
    recon_rows[batch.train_WC.reshape(-1)] = noisy / scale
    win = Window(wb.token_ids, ~batch.train_WC, batch.valid_WC)
    (out,) = splice_metrics(tiny_llama, store_arch(s.spec), 1, "resid_post", [lambda r: recon_rows], [win])
    assert out["kl_clean_spliced"] == pytest.approx(kl, rel=1e-4, abs=1e-6)


def train_args(store: Path, out: Path, *extra) -> list[str]:
    return ["train", "topk", "--store", store, "--layer", 1, "--site", "resid_post", "--width", "4x",
            "--l0-target", 8, "--batch-size", 64, "--out", out, "--device", "cpu", "--objective", "e2e",
            "--log-every", 1, *extra]  # fmt: skip


def test_one_step_gives_gradients_to_the_sae_and_none_to_the_model(store: Path, tmp_path: Path) -> None:
    from sae_cli.config import TrainConfig
    from sae_cli.run import SoloRun, prepare_run, run_training

    cfg = TrainConfig.from_flat({
        "store": str(store), "variant": "topk", "layer": 1, "site": "resid_post", "width": "4x", "l0_target": 8,
        "batch_size": 64, "tokens": 60, "device": "cpu", "objective": "e2e",
    })  # fmt: skip
    prep = prepare_run(SoloRun(cfg, tmp_path / "run"), device="cpu")
    assert prep.loop.batch_size == 64 and prep.trainer.extra_summary["windows_per_batch"] == 2
    run_training(prep)
    assert prep.trainer.step == 1
    (member,) = prep.trainer.members
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in member.sae.parameters())
    tail = prep.trainer.stepper.objectives["e2e"].tails[(1, "resid_post")].tail
    assert all(p.grad is None and not p.requires_grad for p in tail.model.parameters())
    assert tail.blocks_run == 2 * 2  # blocks 2 and 3, for the clean pass and the spliced one


def test_sae_train_objective_e2e_through_the_cli(store: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    run = tmp_path / "run"
    res = runner.invoke(app, list(map(str, train_args(store, run, "--tokens", 640))))
    assert res.exit_code == 0, res.output
    assert "objective e2e" in res.output
    for name in ("cfg.json", "sae.safetensors", "train_config.json", "metrics.parquet"):
        assert (run / name).is_file(), name
    config = json.loads((run / "train_config.json").read_text())["config"]
    assert config["objective"] == "e2e"
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert rows and all("part_kl" in r and "part_mse" in r for r in rows)
    assert all(r["l0"] == pytest.approx(8.0) for r in rows)  # TopK: the rule holds L0 at k
    assert all(r["part_kl"] >= 0 for r in rows)


def test_e2e_plus_downstream_through_the_cli(store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    ds = ("--objective", "e2e+ds", "--ds-layers", "2,3", "--tokens", 192)
    res = runner.invoke(app, list(map(str, train_args(store, run, *ds))))
    assert res.exit_code == 0, res.output
    assert "objective e2e+ds" in res.output and "MSE at layers [2, 3]" in res.output
    assert all("part_ds_mse" in r and r["part_ds_mse"] >= 0 for r in pq_rows(run))


def test_an_interrupted_e2e_run_resumes_exactly(store: Path, tmp_path: Path) -> None:
    """The window reader's position is in the checkpoint: stopped after 3 steps and resumed, the run ends with
    the weights of the run straight through."""
    from safetensors.torch import load_file

    from sae_cli.config import TrainConfig
    from sae_cli.run import SoloRun, prepare_run, run_training

    cfg = TrainConfig.from_flat({
        "store": str(store), "variant": "topk", "layer": 1, "site": "resid_post", "width": "4x", "l0_target": 8,
        "batch_size": 64, "tokens": 400, "device": "cpu", "objective": "e2e", "log_every": 1,
    })  # fmt: skip
    run_training(prepare_run(SoloRun(cfg, tmp_path / "full"), device="cpu"))
    prep = prepare_run(SoloRun(cfg, tmp_path / "part"), device="cpu")
    prep.trainer.should_stop = lambda: prep.trainer.step >= 3
    assert run_training(prep).status == "interrupted"
    run_training(prepare_run(SoloRun(cfg, tmp_path / "part"), device="cpu", resume=True))
    a, b = load_file(tmp_path / "full" / "sae.safetensors"), load_file(tmp_path / "part" / "sae.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r["loss"] for r in pq_rows(tmp_path / "full")] == [r["loss"] for r in pq_rows(tmp_path / "part")]


def pq_rows(run: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(run / "metrics.parquet").to_pylist()


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_inputs_are_one_line_errors(store: Path, tmp_path: Path, tiny_corpus: Path) -> None:
    run = tmp_path / "run"

    def train(*args):
        return runner.invoke(app, list(map(str, args)))

    base = train_args(store, run)
    one_line_error(
        train(*base, "--site", "mlp_out"),
        "needs acts/resid_pre/1 or acts/resid_post/0",
        "--sites resid_pre,mlp_out",
    )
    one_line_error(train(*base, "--layer", 2), "no activations for layer 2")
    one_line_error(train(*base, "--objective", "e3e"), "--objective must be one of")
    one_line_error(train(*base, "--objective", "e2e+ds"), "needs --ds-layers")
    one_line_error(train(*base, "--objective", "e2e+ds", "--ds-layers", "1"), "after the SAE's layer 1")
    one_line_error(train(*base, "--objective", "e2e+ds", "--ds-layers", "9"), "outside the model")
    assert not run.exists()
    # an architecture the tail does not support (harvested through --module-paths)
    import transformers as T

    folder = tmp_path / "opt"
    config = T.OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                         word_embed_proj_dim=64, max_position_embeddings=512)  # fmt: skip
    T.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    res = CliRunner().invoke(actcache_app, ["harvest", *map(str, [
        folder, "--dataset", tiny_corpus, "--context", 32, "--tokens", 256, "--layers", "0", "--sites",
        "resid_post", "--dtype", "fp32", "--device", "cpu", "--out", tmp_path / "opt-store",
        "--module-paths", "layers=model.decoder.layers,attn_out=self_attn,mlp_out=fc2",
    ])])  # fmt: skip
    assert res.exit_code == 0, res.output
    one_line_error(
        train(*train_args(tmp_path / "opt-store", run), "--layer", 0),
        "'opt' is not supported",
        "--objective local",
    )
    assert not run.exists()


def test_a_model_that_did_not_write_the_store_is_refused(tmp_path: Path, tiny_corpus: Path) -> None:
    """The live-vs-stored check: the store's model folder now holds other weights -> one line, exit 2."""
    from conftest import tiny_model

    folder = save_tiny_model(tmp_path / "model", "llama")
    s = harvest(folder, tiny_corpus, tmp_path / "store", "1", tokens=256)
    tiny_model("llama", seed=1).save_pretrained(folder)
    run = tmp_path / "run"
    res = runner.invoke(app, list(map(str, train_args(s, run))))
    one_line_error(res, "does not reproduce", "acts/resid_post/1")
    assert not run.exists()
