"""`sae eval`: every metric of a trained SAE on held-out tokens, printed as a table (sae_cli/evaluate.py computes
them). Registered into sae_cli/cli.py's `app` by `register(app)`; parses, prints and calls the library."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from .cli_common import cli_errors, console, eval_progress, other_store_option, out_console
from .config import ConfigError


def register(app: typer.Typer) -> None:
    """Add the `eval` command to the `sae` app."""
    app.command("eval")(eval_cmd)


def eval_cmd(
    run: Path = typer.Argument(
        ..., help="Run folder written by `sae train` (or any SAE folder with cfg.json)."
    ),
    store: str = typer.Option(
        None, help="The store the SAE was trained on (default: the one the run recorded)."
    ),
    tokens: int = typer.Option(0, help="Evaluate on at most this many held-out tokens (0: all of them)."),
    lm_tokens: int = typer.Option(
        0, help="LM metrics (3 model passes per window) on at most this many of them (0: as --tokens)."
    ),
    no_model: bool = typer.Option(
        False, "--no-model", help="Skip the LM metrics (no model load, no splicing)."
    ),
    device: str = typer.Option("auto", help="Torch device for the SAE and the model."),
    batch_size: int = typer.Option(4096, help="Tokens per SAE batch."),
    no_passthrough: bool = typer.Option(
        False,
        "--no-passthrough",
        help="Send every token through the SAE, also those its out-of-range rule passes through (cfg.json "
        "passthrough_norm).",
    ),
    other_store: bool = other_store_option("evaluate on all its tokens (or --tokens of them)."),
    by_doc: bool = typer.Option(
        False, "--by-doc", help="Also print L0 and FVU per document of the store (always in eval.json)."
    ),
) -> None:
    """Evaluate an SAE on its store's held-out tokens (and, with the model, splice it into the LM)."""
    from .evaluate import DENSITY_PNG, EVAL_FILE, check_eval_options, evaluate
    from .registry import get_variant
    from .run import resolve_device

    with cli_errors():
        check_eval_options(tokens, lm_tokens, batch_size)
        if other_store and not store:
            raise ConfigError("--other-store evaluates on another store: name it with --store")
        dev = resolve_device(device)
        progress, report = eval_progress()
        with progress:
            result = evaluate(
                run,
                store,
                tokens=tokens,
                lm_tokens=lm_tokens,
                with_model=not no_model,
                device=dev,
                batch_size=batch_size,
                progress=report,
                passthrough=not no_passthrough,
                other_store=other_store,
            )
    out_console.print(_eval_table(result))
    if by_doc:
        out_console.print(document_table(result))
    console.print(f"wrote {run / EVAL_FILE} and {run / DENSITY_PNG}")
    if other_store and get_variant(result["variant"]).calibrates and abs(result["l0_error_pct"]) > 5:
        console.print(
            f"the L0 is {result['l0_error_pct']:+.1f} % off its target on this text (a threshold's L0 follows the "
            f"text): `sae calibrate {run} --store {store} --other-store --out NEW` sets it on this text's first "
            "tokens"
        )


def _worst(r: dict[str, Any]) -> str:
    worst = r.get("worst_tokens") or []
    if not worst:
        return "-"
    return f"{worst[0]['fvu']:.3f} (norm {worst[0]['norm_over_median']:.1f}x median)"


def _passed(r: dict[str, Any]) -> str:
    if r.get("passthrough_norm") is None:
        return "no rule"
    return f"{r['passed_through']:,} (cut-off {r['passthrough_norm']:.4g})"


DEAD_SAMPLE_TOKENS = 100_000
"""Below this many held-out tokens `sae eval` flags its dead share as a small-sample count: a latent that fires
once in 10,000 tokens is missed with probability exp(-n / 10,000) (docs/benchmarks.md: 10 % "dead" on 6,630
pystdlib tokens, 0-2 % on the whole store)."""


def _dead(r: dict[str, Any]) -> str:
    text = f"{r['dead_pct']:.2f}"
    if r["tokens"] < DEAD_SAMPLE_TOKENS:
        text += f" (only {r['tokens']:,} tokens: rare latents count as dead)"
    return text


def _eval_table(r: dict[str, Any]) -> Table:
    from .by_document import describe

    table = Table(
        title=f"sae eval: {r['variant']} L{r['layer']} {r['site']} d_sae {r['d_sae']}", show_header=False
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("held-out tokens", f"{r['tokens']:,}"),
        ("L0 (target)", f"{r['l0']:.2f} ({r['l0_target']:g}, {r['l0_error_pct']:+.1f} %)"),
        ("FVU", f"{r['fvu']:.4f}"),
        ("FVU without massive tokens", f"{r['fvu_typical']:.4f} ({r['massive_tokens']} massive)"),
        ("MSE", f"{r['mse']:.4g}"),
        ("worst token FVU (vs. the mean)", _worst(r)),
        ("tokens worse than the mean", f"{r['tokens_fvu_over_1']:,}"),
        ("passed through (norm > cut-off)", _passed(r)),
        ("L0 by document (min / median / max)", describe(r["l0_by_document"], r["l0_target"])),
        ("dead % (no firing on these tokens)", _dead(r)),
        ("dense % (> 10 % of tokens)", f"{r['dense_pct']:.2f}"),
        ("shrinkage (rel. reconstruction bias)", f"{r['shrinkage']:.4f}"),
    ]
    if "ce_clean" in r:
        rows += [
            ("LM tokens", f"{r['lm_tokens']:,}"),
            (
                "CE clean / spliced / zero-abl.",
                f"{r['ce_clean']:.4f} / {r['ce_spliced']:.4f} / {r['ce_zero_ablation']:.4f}",
            ),
            ("delta LM loss", f"{r['delta_lm_loss']:.4f}"),
            ("CE recovered", f"{r['ce_recovered']:.4f}"),
            ("KL(clean || spliced)", f"{r['kl_clean_spliced']:.4f}"),
            ("live vs stored activations (rel. err)", f"{r['site_match_rel_err']:.4f}"),
        ]
    for name, value in rows:
        table.add_row(name, value)
    return table


DOC_ROWS = 40
"""`sae eval --by-doc` prints at most this many documents (the largest); eval.json holds them all."""


def document_table(r: dict[str, Any]) -> Table:
    """`sae eval --by-doc`: L0 and FVU per document of the evaluated tokens, the DOC_ROWS largest in store order."""
    docs = r["by_document"]
    shown = sorted(sorted(docs, key=lambda d: -d["tokens"])[:DOC_ROWS], key=lambda d: d["doc"])
    more = (
        f"; the {len(docs) - len(shown)} smallest of {len(docs)} in eval.json"
        if len(shown) < len(docs)
        else ""
    )
    table = Table(title=f"by document (store doc_ids{more})")
    for name in ("document", "tokens", "L0", "L0 vs target", "FVU"):
        table.add_column(name, justify="right")
    target = r["l0_target"]
    for row in shown:
        error = f"{100.0 * (row['l0'] - target) / target:+.1f} %" if target > 0 else "-"
        table.add_row(str(row["doc"]), f"{row['tokens']:,}", f"{row['l0']:.2f}", error, f"{row['fvu']:.4f}")
    return table
