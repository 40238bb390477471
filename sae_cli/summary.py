"""A trained sweep's members evaluated (`sae eval`'s code, the LM passes shared per site) and tabulated:
summary.parquet and summary.md from the member folders. The model is loaded by the caller (sweep.load_lm)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import io
from .sweep_config import read_sweep

LM_GROUP = 16
"""Members whose LM metrics share one pass over the windows (their SAEs are loaded together)."""
SUMMARY_PARQUET = "summary.parquet"
SUMMARY_MD = "summary.md"
# Columns of the summary table, in order (eval.json keys; LM columns only when the model was run).
SUMMARY_COLUMNS = (
    "name", "layer", "site", "variant", "objective", "d_sae", "l0_target", "l0", "l0_error_pct", "l0_doc_min",
    "l0_doc_max", "fvu", "fvu_typical", "mse",
    "dead_pct", "dense_pct", "shrinkage", "delta_lm_loss", "ce_recovered", "kl_clean_spliced", "ce_clean",
    "ce_zero_ablation", "train_tokens", "eval_tokens", "lm_tokens",
)  # fmt: skip
# l0_doc_min / l0_doc_max: the L0 range over the evaluated documents of >= 1,024 tokens (sae_cli/by_document.py).
# fvu_typical: FVU without the massive-norm tokens (BOS-like positions; sae_cli/metrics.py), which can carry most
# of the variance of a handful of tokens.


def shared_lm_metrics(
    folders: list[Path],
    store: Any,
    model: Any,
    *,
    device: str,
    eval_tokens: int = 0,
    lm_tokens: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[Path, dict[str, Any]]:
    """The LM metrics of every folder: the members of one (layer, site) and token range share one pass over the
    windows with the clean and the zero-ablated forward passes (evaluate.lm_metrics: 2 + n passes per window
    batch instead of 3 n), up to LM_GROUP members at a time; each member's numbers equal its own `sae eval`."""
    from .evaluate import lm_metrics, lm_range

    groups: dict[tuple[Any, ...], list[Path]] = {}
    for folder in folders:
        training = io.read_cfg(folder).get("training", {})
        key = (int(training["layer"]), str(training["site"]))
        groups.setdefault((key, lm_range(folder, store, eval_tokens, lm_tokens)), []).append(folder)
    lm: dict[Path, dict[str, Any]] = {}
    for (key, token_range), group in groups.items():
        for i in range(0, len(group), LM_GROUP):
            part = group[i : i + LM_GROUP]
            saes = [io.load_sae(f, device) for f in part]
            outs = lm_metrics([sae.forward for sae in saes], store, key, token_range, device,
                              report=progress, model=model)  # fmt: skip
            lm.update(zip(part, outs, strict=True))
    return lm


def evaluate_saes(
    folders: list[Path],
    store: Any,
    model: Any,
    *,
    device: str,
    with_model: bool,
    eval_tokens: int = 0,
    lm_tokens: int = 0,
    batch_size: int = 4096,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """`sae eval` (sae_cli/evaluate.py) on each SAE folder with `model` (None: no LM metrics); returns the eval
    dicts. progress(stage, done, total): stage 'members' counts folders; the evaluation's own stages pass
    through."""
    from .evaluate import evaluate

    report = progress or (lambda stage, done, total: None)
    lm = {}
    if model is not None:
        lm = shared_lm_metrics(folders, store, model, device=device, eval_tokens=eval_tokens,
                               lm_tokens=lm_tokens, progress=progress)  # fmt: skip
    results = []
    for i, folder in enumerate(folders):
        report("members", i, len(folders))
        results.append(
            evaluate(
                folder,
                store,
                tokens=eval_tokens,
                lm_tokens=lm_tokens,
                with_model=with_model,
                device=device,
                batch_size=batch_size,
                progress=progress,
                model=model,
                lm=lm.get(folder),
            )
        )
    report("members", len(folders), len(folders))
    return results


def summary_rows(out: str | Path) -> list[dict[str, Any]]:
    """One row per member of a finished sweep, from its folders (cfg.json + eval.json); members without an
    eval.json get NaN metrics."""
    out = Path(out)
    meta = read_sweep(out)
    rows = []
    for m in meta["members"]:
        folder = out / m["folder"]
        ev = io.read_json(folder / "eval.json") if (folder / "eval.json").is_file() else {}
        training = io.read_cfg(folder).get("training", {}) if (folder / io.CFG_FILE).is_file() else {}
        row: dict[str, Any] = {
            "name": m["name"],
            "layer": int(m["layer"]),
            "site": m["site"],
            "variant": m["variant"],
            "objective": m.get("objective", "local"),
            "d_sae": int(m["d_sae"]),
            "l0_target": float(m["l0_target"]),
            "train_tokens": int(training.get("tokens", 0)),
            "eval_tokens": int(ev.get("tokens", 0)),
        }
        docs = ev.get("l0_by_document") or {}
        row["l0_doc_min"], row["l0_doc_max"] = (float(docs.get(k, math.nan)) for k in ("min", "max"))
        for col in SUMMARY_COLUMNS:
            if col not in row:
                row[col] = float(ev[col]) if isinstance(ev.get(col), int | float) else math.nan
        rows.append({c: row[c] for c in SUMMARY_COLUMNS})
    return rows


def write_summary(out: str | Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """summary.parquet (every column) and summary.md (a Markdown table); returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    parquet, md = out / SUMMARY_PARQUET, out / SUMMARY_MD
    with io.atomic_path(parquet) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    with io.atomic_path(md) as tmp:
        tmp.write_text(markdown_table(rows))
    return parquet, md


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in SUMMARY_COLUMNS if c != "name" and any(_present(r.get(c)) for r in rows)]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))
