"""A second corpus for the quality benchmarks, from files every machine has: one JSONL document per file, in a
seeded shuffled order (so a store's held-out windows are not the alphabetically last files).

Default: the Python standard library's own sources (`<stdlib>/*.py`, docstrings and code), a corpus unlike the
embedded Shakespeare; `--recursive` takes the sub-packages too (~50 MB of text on Python 3.11, millions of
tokens, enough for a single-pass store of >= 1M tokens).

    python scripts/make_corpus.py --out stores/pystdlib.jsonl [--recursive] [--seed 0]
    actcache harvest smollm2-135m --layers 15 --sites resid_post --dataset stores/pystdlib.jsonl ...
"""

from __future__ import annotations

import argparse
import json
import random
import sysconfig
from pathlib import Path


def stdlib_files(recursive: bool) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = root.rglob("*.py") if recursive else root.glob("*.py")
    skip = ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__")
    return sorted(p for p in files if not any(part in skip for part in p.relative_to(root).parts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSONL file to write (one {'text': ...} per source file)")
    ap.add_argument("--recursive", action="store_true", help="also the sub-packages (test suites left out)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    files = stdlib_files(args.recursive)
    random.Random(args.seed).shuffle(files)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    chars = 0
    with open(out, "w") as f:
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            chars += len(text)
            f.write(json.dumps({"text": text, "source": path.name}) + "\n")
    print(f"{out}: {len(files)} documents, {chars / 1e6:.1f} M characters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
