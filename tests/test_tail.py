"""actcache.tail: the forward of the blocks after layer L from a cached residual equals the full model's."""

from __future__ import annotations

import pytest
import torch
from conftest import N_LAYERS, VOCAB, tiny_config

from actcache.sites import ARCH_TABLE, find_blocks, hook_site, parse_module_paths
from actcache.tail import Tail, TailError

pytestmark = pytest.mark.usefixtures("one_thread_module")

ARCHS = ("llama", "mistral", "qwen2", "gemma2", "gemma3_text", "gpt2", "gpt_neox")
CONTEXT = 12
WINDOW = 4  # sliding window, shorter than CONTEXT so that sliding layers see a different mask


def make_model(arch: str, seed: int = 0):
    """A tiny fp32 model whose sliding layers (Gemma-2/3, Mistral, Qwen2) have a window shorter than the
    context and whose Gemma-2 soft-capping bites."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch)
    if arch in ("gemma2", "gemma3_text", "mistral"):
        cfg.sliding_window = WINDOW
    if arch == "qwen2":
        cfg.use_sliding_window, cfg.sliding_window = True, WINDOW
        cfg.layer_types = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    if arch == "gemma2":
        cfg.final_logit_softcapping = 0.05
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with (
        torch.no_grad()
    ):  # larger weights than the init's 0.02 std: logits and attention differences that show
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(5.0)
    return model


def full_forward(model, arch, ids):
    """(logits, {l: resid_post l}, resid_pre 0) of the whole model."""
    blocks = find_blocks(model, arch)
    post: dict[int, torch.Tensor] = {}
    pre: dict[int, torch.Tensor] = {}
    handles = [
        hook_site(
            b, arch, "resid_post", lambda x, i=i: post.__setitem__(i, x.detach().clone()), replace=False
        )
        for i, b in enumerate(blocks)
    ]
    handles.append(
        hook_site(
            blocks[0], arch, "resid_pre", lambda x: pre.__setitem__(0, x.detach().clone()), replace=False
        )
    )
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, post, pre[0]


def count_block_calls(model, arch) -> tuple[list[int], list]:
    calls = [0] * N_LAYERS
    handles = []
    for i, b in enumerate(find_blocks(model, arch)):

        def pre(module, args, i=i):
            calls[i] += 1

        handles.append(b.register_forward_pre_hook(pre))
    return calls, handles


@pytest.fixture(scope="module", params=ARCHS)
def case(request):
    arch_name = request.param
    model = make_model(arch_name)
    arch = ARCH_TABLE[arch_name]
    ids = torch.randint(4, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(1))
    logits, post, pre0 = full_forward(model, arch, ids)
    return arch_name, model, arch, ids, logits, post, pre0


@pytest.mark.parametrize("layer", [0, 1, N_LAYERS - 2])
def test_tail_logits_equal_full_model_and_skip_early_blocks(case, layer):
    arch_name, model, arch, _ids, full, post, _ = case
    tail = Tail(model, arch, layer)
    calls, handles = count_block_calls(model, arch)
    try:
        with torch.no_grad():
            h, kept = tail.final_hidden(post[layer], keep=range(layer + 1, N_LAYERS))
            logits = tail.head(h)
    finally:
        for hd in handles:
            hd.remove()
    assert (logits - full).abs().max().item() <= 1e-4, arch_name
    assert calls[: layer + 1] == [0] * (layer + 1)
    assert calls[layer + 1 :] == [1] * (N_LAYERS - layer - 1)
    assert tail.blocks_run == N_LAYERS - layer - 1
    assert sorted(kept) == list(range(layer + 1, N_LAYERS))
    for lay, r in kept.items():
        assert (r - post[lay]).abs().max().item() <= 1e-4, (arch_name, lay)
    # logits() is head(final_hidden()); head on a chunk of positions gives those positions' logits
    with torch.no_grad():
        assert torch.equal(tail.logits(post[layer]), logits)
        assert torch.equal(tail.head(h[:, 3:7].reshape(-1, h.shape[-1])), logits[:, 3:7].reshape(-1, VOCAB))


def test_head_only_and_last_layer(case):
    arch_name, model, arch, _ids, full, post, _ = case
    last = Tail(model, arch, N_LAYERS - 1)
    calls, handles = count_block_calls(model, arch)
    try:
        with torch.no_grad():
            a, b = last.head_only(post[N_LAYERS - 1]), last.logits(post[N_LAYERS - 1])
            c = Tail(model, arch, 0).head_only(
                post[N_LAYERS - 1]
            )  # any tail's head_only takes the last layer
    finally:
        for hd in handles:
            hd.remove()
    assert calls == [0] * N_LAYERS and last.blocks_run == 0
    for got in (a, b, c):
        assert (got - full).abs().max().item() <= 1e-4, arch_name


def test_tail_from_the_embedding_output(case):
    """layer -1: the input is resid_pre 0 (Gemma: already scaled; GPT-2: position embeddings already added)."""
    arch_name, model, arch, _ids, full, _post, pre0 = case
    tail = Tail(model, arch, -1)
    with torch.no_grad():
        assert (tail.logits(pre0) - full).abs().max().item() <= 1e-4, arch_name
    assert tail.blocks_run == N_LAYERS


def test_gradients_reach_the_residual_and_never_the_model(case):
    _arch_name, model, arch, _ids, _full, post, _ = case
    for p in model.parameters():
        p.requires_grad_(True)  # a caller that forgot to freeze: the tail freezes anyway
    tail = Tail(model, arch, 1)
    assert not any(p.requires_grad for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(True)  # thawed again after construction: every call freezes
    resid = post[1].clone().requires_grad_()
    h, kept = tail.final_hidden(resid, keep=[N_LAYERS - 1])
    loss = torch.log_softmax(tail.head(h), -1)[..., 5].mean() + kept[N_LAYERS - 1].square().mean()
    loss.backward()
    assert resid.grad is not None and resid.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_sliding_window_and_softcap_are_exercised():
    """The configs of `make_model` make the sliding mask and the soft-capping matter (else the equality tests
    would not test them)."""
    ids = torch.randint(4, VOCAB, (1, CONTEXT), generator=torch.Generator().manual_seed(2))
    for name in ("gemma2", "mistral", "qwen2"):
        model = make_model(name)
        with torch.no_grad():
            windowed = model(input_ids=ids).logits
            model.config.sliding_window = 4096
            for layer in find_blocks(model, ARCH_TABLE[name]):
                attn = getattr(layer, "self_attn", None)
                if getattr(attn, "sliding_window", None):
                    attn.sliding_window = 4096
            wide = model(input_ids=ids).logits
        assert (windowed - wide).abs().max().item() > 1e-3, name
    gemma2 = make_model("gemma2")
    with torch.no_grad():
        assert gemma2(input_ids=ids).logits.abs().max().item() <= 0.05 + 1e-6
        uncapped = gemma2.lm_head(gemma2.model(input_ids=ids).last_hidden_state)
        assert uncapped.abs().max().item() > 1.0


def test_unsupported_architecture_and_bad_layers():
    import transformers as T

    cfg = T.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
        word_embed_proj_dim=32, max_position_embeddings=64,
    )  # fmt: skip
    opt = T.OPTForCausalLM(cfg).eval()
    paths = parse_module_paths("layers=model.decoder.layers,attn_out=self_attn,mlp_out=fc2")
    with pytest.raises(TailError, match="'opt'") as err:
        Tail(opt, paths, 0)
    assert "\n" not in str(err.value)
    model = make_model("llama")
    arch = ARCH_TABLE["llama"]
    with pytest.raises(TailError, match="outside the model"):
        Tail(model, arch, N_LAYERS)
    with pytest.raises(TailError, match="outside the model"):
        Tail(model, arch, -2)
    with pytest.raises(TailError, match="keep layer 1"):
        Tail(model, arch, 1).final_hidden(torch.zeros(1, 3, 64), keep=[1])
    with pytest.raises(TailError, match="block list"):
        Tail(model, parse_module_paths("layers=model.blocks"), 0)


@pytest.mark.parametrize("arch_name", ["gemma2", "gpt2"])
def test_tail_from_a_harvested_store(tmp_path, tiny_corpus, arch_name):
    """The chain the e2e objective runs: harvest -> WindowReader -> Tail gives the model's own logits on the
    stored token ids (the harvest runs without an attention mask, as the tail does)."""
    from conftest import save_tiny_model

    from actcache.harvest import HarvestConfig, plan_harvest, run_harvest
    from actcache.models import load_model
    from actcache.reader import WindowReader
    from actcache.store import Store

    folder = save_tiny_model(tmp_path / "model", arch_name)
    plan = plan_harvest(
        HarvestConfig(
            model=str(folder), dataset=str(tiny_corpus), layers="1,3", sites="resid_post", context=16,
            batch_size=4, device="cpu", dtype="fp32", tokens=256,
        )
    )  # fmt: skip
    model = load_model(plan.source, "cpu", torch.float32)
    run_harvest(plan, tmp_path / "store", model=model)
    store = Store.open(tmp_path / "store")
    arch = ARCH_TABLE[arch_name]
    keys = [(1, "resid_post"), (N_LAYERS - 1, "resid_post")]
    batch = next(iter(WindowReader(store, keys, 3, seed=0)))
    tail = Tail(model, arch, 1)
    with torch.no_grad():
        full = model(input_ids=batch.token_ids).logits
        assert (tail.logits(batch.acts[keys[0]]) - full).abs().max().item() <= 1e-4
        assert (tail.head_only(batch.acts[keys[1]]) - full).abs().max().item() <= 1e-4
