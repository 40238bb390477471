"""Shared fixtures: tiny randomly initialised models (from configs, never downloaded), a tiny offline tokenizer,
and a tiny text corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

VOCAB = 256
D_MODEL = 64
N_LAYERS = 4
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
TINY_ARCHS = ("llama", "gemma2", "gemma3_text", "qwen2", "mistral", "gpt2", "gpt_neox")


def make_tokenizer(adds_bos: bool = False):
    """A word-level fast tokenizer over w0..w251 plus <pad>/<bos>/<eos>/<unk> (ids 0-3), built in code.

    ``adds_bos``: a post-processor puts BOS before every text (the Gemma/Llama-2 convention)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", BOS_ID)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_config(arch: str):
    """A 4-layer, d_model 64, vocab 256 config of one architecture."""
    import transformers as T

    common = dict(
        vocab_size=VOCAB, num_hidden_layers=N_LAYERS, num_attention_heads=4, intermediate_size=128,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, max_position_embeddings=512,
    )  # fmt: skip
    if arch == "llama":
        return T.LlamaConfig(hidden_size=D_MODEL, num_key_value_heads=2, **common)
    if arch == "qwen2":
        return T.Qwen2Config(hidden_size=D_MODEL, num_key_value_heads=2, **common)
    if arch == "mistral":
        return T.MistralConfig(hidden_size=D_MODEL, num_key_value_heads=2, **common)
    if arch == "gemma2":
        return T.Gemma2Config(hidden_size=D_MODEL, num_key_value_heads=2, head_dim=16, **common)
    if arch == "gemma3_text":
        return T.Gemma3TextConfig(hidden_size=D_MODEL, num_key_value_heads=2, head_dim=16, **common)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=D_MODEL, **common)
    if arch == "gpt2":
        return T.GPT2Config(
            n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4, vocab_size=VOCAB, n_positions=512,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        )  # fmt: skip
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0):
    """A randomly initialised tiny causal LM in eval mode (float32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


def save_tiny_model(folder: Path, arch: str = "llama", seed: int = 0, adds_bos: bool = False) -> Path:
    """save_pretrained a tiny model + tokenizer into ``folder`` (loadable as MODEL by the harvest)."""
    tiny_model(arch, seed).save_pretrained(folder)
    make_tokenizer(adds_bos).save_pretrained(folder)
    return folder


def write_corpus(folder: Path, n_docs: int = 6, words_per_doc: int = 150, seed: int = 0) -> Path:
    """``n_docs`` .txt files of random words from the tiny vocabulary."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        n = int(rng.integers(words_per_doc // 2, words_per_doc * 3 // 2))
        text = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))
        (folder / f"doc{d:03d}.txt").write_text(text + "\n")
    return folder


def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Tiny matmuls on one intra-op thread: with several, OpenMP's spinning barriers make them 10-100x slower
    on a loaded 2-core machine."""
    yield from _one_thread()


@pytest.fixture(scope="module")
def one_thread_module():
    """`one_thread` for a whole module (`pytestmark = pytest.mark.usefixtures("one_thread_module")`)."""
    yield from _one_thread()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama + tokenizer saved with save_pretrained (for CLI and subprocess tests)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A folder of six .txt documents of random tiny-vocabulary words (~900 tokens)."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))
