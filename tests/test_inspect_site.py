"""`sae inspect` end to end on a store harvested from a tiny random Llama: the HTML site rendered in a real
headless browser (Debian's chromium; skipped where none is installed), the terminal view of one latent, a sweep's
members sharing one pass, the logit lens and decoder neighbours against brute force, and bad input."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import write_corpus
from synthetic import make_sae
from typer.testing import CliRunner

from actcache.harvest import HarvestConfig, plan_harvest, run_harvest
from actcache.models import load_model, load_tokenizer, resolve_model
from actcache.store import FLAG_BOS, Store
from sae_cli import io
from sae_cli.cli import app
from sae_cli.io import read_tensors

pytestmark = pytest.mark.usefixtures("one_thread")
CTX, TOKENS, D_SAE = 32, 1024, 32
HELD = (TOKENS - 8 * CTX, TOKENS)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_llama_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("inspect-store")
    corpus = write_corpus(root / "corpus", n_docs=8, words_per_doc=150)
    plan = plan_harvest(
        HarvestConfig(
            model=str(tiny_llama_dir), dataset=str(corpus), layers="1", sites="resid_post", context=CTX,
            dtype="fp32", device="cpu", batch_size=8, tokens=TOKENS,
        )
    )  # fmt: skip
    run_harvest(plan, root / "store", model=load_model(plan.source, "cpu", torch.float32))
    return root / "store"


def save_random_sae(folder: Path, store: Path, seed: int = 0, variant: str = "topk") -> Path:
    sae = make_sae(variant, 64, D_SAE, 4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    training = {
        "store": str(store),
        "layer": 1,
        "site": "resid_post",
        "eval_range": list(HELD),
        "drop_bos": True,
    }
    return io.save_sae(folder, sae, training)


def brute(run: Path, store: Path, lo: int, hi: int):
    """Every held-out token's latents (BOS zeroed) and the store's token ids."""
    st = Store.open(store)
    with torch.no_grad():
        acts = io.load_sae(run).encode(torch.from_numpy(st.read_acts(1, "resid_post", lo, hi)))
    acts[torch.from_numpy(st.read("flags", lo, hi).astype("int64") & FLAG_BOS) != 0] = 0
    return acts, st.read("token_ids", lo, hi).astype("int64")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    pytest.skip("no headless browser installed (apt-get install chromium)")


def dump_dom(path: Path, query: str = "") -> str:
    res = subprocess.run(
        [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", path.as_uri() + query],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.fixture(scope="module")
def site(store: Path, tiny_llama_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("inspect-site")
    run = save_random_sae(root / "run", store)
    res = invoke("inspect", run, "--store", store, "--out", root / "site", "--device", "cpu", "--top", 5)
    assert res.exit_code == 0, res.output
    return run, root / "site"


def test_site_in_a_headless_browser(site, store: Path, tiny_llama_dir: Path) -> None:
    run, out = site
    acts, ids = brute(run, store, *HELD)
    meta = json.loads((out / "inspect.json").read_text())
    assert meta["token_range"] == list(HELD) and meta["tokens"] == (HELD[1] - HELD[0]) * (CTX - 1) // CTX
    saved = read_tensors(out / "inspect.safetensors")
    assert torch.equal(saved["count_F"], (acts != 0).sum(0))
    for f in range(D_SAE):  # the top-5 contexts of every latent, as brute force ranks them
        col = acts[:, f]
        order = sorted(torch.nonzero(col).flatten().tolist(), key=lambda t: (-float(col[t]), t))[:5]
        assert saved["top.token_FN"][f, : len(order)].tolist() == [HELD[0] + t for t in order]
        assert saved["top.ids_FNS"][f, : len(order), 12].tolist() == [int(ids[t]) for t in order]

    dom = dump_dom(out / "index.html")
    links = set(re.findall(r'href="latents/(\d+)\.html"', dom))
    assert links == {str(i) for i in range(D_SAE)}
    assert f"{D_SAE} of {D_SAE} latents" in dom  # the inline script ran (the search's counter)

    f = int((acts != 0).sum(0).argmax())  # the most frequent latent: its top context
    t = int(acts[:, f].argmax())
    tok = load_tokenizer(resolve_model(str(tiny_llama_dir)))
    w0 = t - t % CTX
    window = [tok.decode([i]) for i in ids[max(w0, t - 12) : min(w0 + CTX, t + 5)]]
    page = dump_dom(out / "latents" / f"{f}.html")
    top = page[page.index('id="top"') :]
    first = top[: top.index("</div>", top.index('class="ctx"'))]
    shown = [html.unescape(t) for t in re.findall(r'<span class="t[^"]*"[^>]*>([^<]*)</span>', first)]
    assert shown == window and 'class="t f"' in first and f"Latent {f}" in page
    assert re.search(r'class="t f"[^>]*title="([^"]+)"', first).group(1) == f"{float(acts[t, f]):.4g}"

    # Search from the URL: only the latents whose tokens contain the text stay visible.
    word = html.unescape(re.search(r'class="t f"[^>]*>([^<]*)<', first).group(1)).lower()  # the firing token
    filtered = dump_dom(out / "index.html", f"?q={word}")
    n = int(re.search(r"(\d+) of \d+ latents", filtered).group(1))
    rows = re.findall(r'<tr data-s="([^"]*)"( style="display: none;")?', filtered)
    assert 0 < n == sum(1 for s, hidden in rows if not hidden) and all(
        (word in s) != bool(h) for s, h in rows
    )

    # Sorted by frequency (column 1) from the URL, descending: the rows come in the order of the counts.
    by_freq = dump_dom(out / "index.html", "?sort=1&desc")
    order = [int(i) for i in re.findall(r'<tr data-s="[^"]*"[^>]*><td class="n" data-v="(\d+)"', by_freq)]
    counts = (acts != 0).sum(0)
    assert sorted(order) == list(range(D_SAE)) and order != list(range(D_SAE))
    assert all(counts[a] >= counts[b] for a, b in zip(order, order[1:], strict=False))


def test_latent_in_the_terminal_reuses_the_pass(site, store: Path) -> None:
    run, out = site
    acts, _ = brute(run, store, *HELD)
    f = int((acts != 0).sum(0).argmax())
    before = (out / "inspect.safetensors").stat().st_mtime_ns
    res = invoke("inspect", run, "--store", store, "--out", out, "--latent", f, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert (out / "inspect.safetensors").stat().st_mtime_ns == before  # no second pass
    assert f"latent {f}" in res.output and "top contexts" in res.output
    assert f"{int((acts[:, f] != 0).sum()):,} tokens" in res.output
    res = invoke("inspect", run, "--store", store, "--latent", f, "--device", "cpu", "--no-model")
    assert res.exit_code == 0 and "#" in res.output, res.output  # token ids without the tokenizer


def test_sweep_members_share_one_pass(store: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    (sweep / "members").mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}")
    for i, name in enumerate(["a", "b"]):
        save_random_sae(sweep / "members" / name, store, seed=i, variant=["topk", "relu"][i])
    res = invoke(
        "inspect", sweep, "--store", store, "--out", tmp_path / "site", "--no-model", "--device", "cpu"
    )
    assert res.exit_code == 0, res.output
    assert "a/index.html" in (tmp_path / "site" / "index.html").read_text()
    (tmp_path / "solo" / "latents").mkdir(parents=True)
    (tmp_path / "solo" / "latents" / f"{D_SAE}.html").write_text(
        "a page of a wider SAE inspected here before"
    )
    solo = invoke(
        "inspect", sweep / "members" / "b", "--store", store, "--out", tmp_path / "solo", "--no-model"
    )
    assert solo.exit_code == 0, solo.output
    assert not (tmp_path / "solo" / "latents" / f"{D_SAE}.html").exists()
    assert json.loads((tmp_path / "site" / "b" / "inspect.json").read_text())["shared_with"] == 2
    shared, alone = (
        read_tensors(p / "inspect.safetensors") for p in (tmp_path / "site" / "b", tmp_path / "solo")
    )
    assert shared.keys() == alone.keys() and all(torch.equal(shared[k], alone[k]) for k in shared)


def test_logit_lens_and_neighbours_equal_brute_force(tiny_llama_dir: Path) -> None:
    from sae_cli.inspect.lens import decoder_neighbours, logit_lens

    model = load_model(resolve_model(str(tiny_llama_dir)), "cpu", torch.float32)
    W = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    lens = logit_lens(W, model.model.norm, model.lm_head.weight, k=3, chunk=4)
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(W))  # RMSNorm(0) = 0: the lens is the head on the norm
    assert torch.equal(lens.promoted_ids_FK, logits.topk(3).indices)
    assert torch.equal(lens.suppressed_ids_FK, (-logits).topk(3).indices)
    ids, cos = decoder_neighbours(W, k=2, chunk=3)
    sim = torch.nn.functional.cosine_similarity(W[:, None], W[None], dim=-1).fill_diagonal_(-2)
    assert torch.equal(ids, sim.topk(2).indices)
    torch.testing.assert_close(cos, sim.topk(2).values)


def test_other_store_reads_all_of_it(site, store: Path) -> None:
    """`--other-store`: every token of the store (here the same harvest, taken as another text: the random SAE
    records no store identity), as `sae eval --other-store`."""
    run, _ = site
    acts, _ = brute(run, store, 0, TOKENS)
    f = int((acts != 0).sum(0).argmax())
    res = invoke(
        "inspect", run, "--store", store, "--other-store", "--latent", f, "--device", "cpu", "--no-model"
    )
    assert res.exit_code == 0, res.output
    assert f"{int((acts[:, f] != 0).sum()):,} tokens" in res.output
    res = invoke("inspect", run, "--other-store", "--latent", f, "--no-model")
    assert res.exit_code == 2 and "name it with --store" in res.output, res.output


def test_bad_inputs_are_one_line_errors(site, store: Path, tmp_path: Path) -> None:
    run, out = site
    for args, needle in (
        ((run, "--store", store), "nothing to do"),
        ((run, "--store", store, "--latent", 999, "--out", out, "--no-model"), "--latent 999 is outside"),
        ((run, "--store", store, "--latent", -1, "--no-model"), "--latent -1 is outside"),  # before any pass
        ((run, "--store", store, "--out", tmp_path / "x", "--top", 0), "--top must be"),
        ((tmp_path, "--store", store, "--out", tmp_path / "y"), "not a trained SAE"),
    ):
        res = invoke("inspect", *args)
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
