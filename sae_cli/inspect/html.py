"""The static feature browser: `index.html` (every latent, sortable by any column, searchable by token text, a few
lines of inline JavaScript; `?q=TEXT` opens it searched, `?sort=COLUMN[&desc]` sorted by column COLUMN (0-based)) and `latents/<id>.html` (one page per latent: numbers, histogram, the tokens its
decoder promotes and suppresses, nearest latents, contexts with every token shaded by the latent's activation).
Self-contained: no CDN, no fetch, nothing but the files written here; works from file:// offline."""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

LATENTS_DIR = "latents"

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:72em;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.4em}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
th{cursor:pointer;user-select:none;background:#f6f6f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;margin:2px 0;padding:2px 4px;border-left:3px solid #ddd}
.ctx .v{display:inline-block;min-width:5em;color:#666}
.t{border-radius:2px}.f{outline:1px solid #c60}
.tokens span{display:inline-block;font-family:ui-monospace,monospace;white-space:pre;background:#eef;
margin:1px;padding:0 3px;border-radius:3px}
.muted{color:#777}
"""

INDEX_JS = """
const q=document.getElementById('q'),rows=[...document.querySelectorAll('#t tbody tr')],n=document.getElementById('n');
function filter(){const s=q.value.toLowerCase();let k=0;for(const r of rows){const m=!s||r.dataset.s.includes(s);
r.style.display=m?'':'none';k+=m}n.textContent=k+' of '+rows.length+' latents'}
q.value=new URLSearchParams(location.search).get('q')||'';q.addEventListener('input',filter);filter();
document.querySelectorAll('#t th').forEach((th,i)=>th.addEventListener('click',()=>{
const up=th.dataset.dir!=='asc';th.dataset.dir=up?'asc':'desc';const b=document.querySelector('#t tbody');
const key=r=>{const c=r.children[i];return c.dataset.v!==undefined?parseFloat(c.dataset.v):c.textContent};
rows.sort((a,c)=>{const x=key(a),y=key(c);return (x<y?-1:x>y?1:0)*(up?1:-1)});rows.forEach(r=>b.appendChild(r))}));
const p=new URLSearchParams(location.search),th=document.querySelectorAll('#t th')[p.get('sort')];
if(th){th.click();if(p.has('desc'))th.click()}
"""


def esc(text: str) -> str:
    """Token text for HTML: escaped, a newline shown as ↵ and a tab as →."""
    return html.escape(text.replace("\n", "↵").replace("\t", "→"))


def page(title: str, body: str, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body>{body}{js}</body></html>\n"
    )


def pct(freq: float) -> str:
    return f"{100 * freq:.3g} %" if freq else "0 %"


def context_html(c: dict[str, Any], scale: float) -> str:
    """One context: its activation, then its tokens, each shaded by the latent's activation (relative to
    `scale`, the latent's maximum); the firing token outlined; the exact activation in each token's title."""
    parts = []
    for k, (text, a) in enumerate(c["tokens"]):
        alpha = max(0.0, min(1.0, a / scale)) if scale > 0 else 0.0
        style = f' style="background:rgba(255,140,0,{alpha:.2f})"' if alpha >= 0.01 else ""
        cls = "t f" if k == c["focus"] else "t"
        tip = f' title="{a:.4g}"' if a != 0 else ""  # the exact activation on hover
        parts.append(f'<span class="{cls}"{style}{tip}>{esc(text)}</span>')
    return f'<div class="ctx"><span class="v">{c["value"]:.3g}</span>{"".join(parts)}</div>'


def histogram_svg(hist: list[tuple[float, float, int]], width: int = 480, height: int = 90) -> str:
    """Bars of the latent's activation histogram (log2-spaced bins), its range under the axis."""
    if not hist:
        return '<p class="muted">never fired</p>'
    top = max(c for _, _, c in hist)
    w = width / len(hist)
    bars = "".join(
        f'<rect x="{i * w:.1f}" y="{height - height * c / top:.1f}" width="{max(w - 1, 1):.1f}" '
        f'height="{height * c / top:.1f}" fill="#e08a2c"><title>{lo:.3g}-{hi:.3g}: {c}</title></rect>'
        for i, (lo, hi, c) in enumerate(hist)
    )
    return (
        f'<svg width="{width}" height="{height + 16}" role="img"><g>{bars}</g>'
        f'<text x="0" y="{height + 13}" font-size="11">{hist[0][0]:.3g}</text>'
        f'<text x="{width}" y="{height + 13}" font-size="11" text-anchor="end">{hist[-1][1]:.3g}</text></svg>'
    )


def token_list(items: Iterable[tuple[str, float]]) -> str:
    spans = "".join(f'<span title="{v:+.3g}">{esc(t)}</span>' for t, v in items)
    return f'<div class="tokens">{spans}</div>' if spans else '<p class="muted">no model loaded</p>'


def latent_page(rec: dict[str, Any], d_sae: int, title: str) -> str:
    f = rec["id"]
    nav = " · ".join(
        [*([f'<a href="{f - 1}.html">← {f - 1}</a>'] if f > 0 else []), '<a href="../index.html">index</a>',
         *([f'<a href="{f + 1}.html">{f + 1} →</a>'] if f + 1 < d_sae else [])]
    )  # fmt: skip
    scale = rec["max"]
    body = [
        f"<p>{nav}</p><h1>Latent {f}</h1><p class=muted>{html.escape(title)}</p>",
        f"<p>fires on {rec['count']:,} tokens ({pct(rec['freq'])}); mean activation when firing "
        f"{rec['mean']:.4g}; max {rec['max']:.4g}</p>",
        histogram_svg(rec["hist"]),
        "<h2>Output tokens promoted</h2>" + token_list(rec["promoted"]),
        "<h2>Output tokens suppressed</h2>" + token_list(rec["suppressed"]),
        "<h2>Nearest latents (decoder cosine)</h2><p>"
        + ", ".join(f'<a href="{j}.html">{j}</a> ({c:.2f})' for j, c in rec["neighbours"])
        + "</p>",
        f'<h2>Top contexts</h2><div id="top">{"".join(context_html(c, scale) for c in rec["top"])}</div>',
    ]
    if rec["bands"]:
        body.append("<h2>Contexts from lower quantiles (a uniform sample of its firings)</h2>")
        for b in rec["bands"]:
            body.append(f"<h3>{b['label']}: {b['lo']:.3g}-{b['hi']:.3g}</h3>")
            body += [context_html(c, scale) for c in b["contexts"]]
    return page(f"latent {f}", "".join(body))


def meta_line(meta: dict[str, Any]) -> str:
    """What was inspected and how long the pass took, in one line."""
    parts = [f"{meta['tokens']:,} tokens (BOS and padding excluded)"]
    if "scan_s" in meta:
        parts.append(f"pass {meta['scan_s']:.1f} s ({meta['tokens_per_s']:,.0f} tokens/s)")
        if meta.get("shared_with", 1) > 1:
            parts.append(f"shared by {meta['shared_with']} SAEs")
    parts.append("contexts: " + json.dumps(meta.get("scan", {})))
    return "; ".join(parts)


def index_page(rows: list[dict[str, Any]], title: str, meta: dict[str, Any]) -> str:
    alive = sum(1 for r in rows if r["freq"] > 0)
    lines = []
    for r in rows:
        search = " ".join([*r["fires_on"], *r["promotes"]]).lower()
        lines.append(
            f'<tr data-s="{html.escape(search)}"><td class=n data-v="{r["id"]}">'
            f'<a href="{LATENTS_DIR}/{r["id"]}.html">{r["id"]}</a></td>'
            f'<td class=n data-v="{r["freq"]:.6g}">{pct(r["freq"])}</td>'
            f'<td class=n data-v="{r["mean"]:.6g}">{r["mean"]:.3g}</td>'
            f'<td class=n data-v="{r["max"]:.6g}">{r["max"]:.3g}</td>'
            f'<td class="tokens">{"".join(f"<span>{esc(t)}</span>" for t in r["fires_on"])}</td>'
            f'<td class="tokens">{"".join(f"<span>{esc(t)}</span>" for t in r["promotes"])}</td></tr>'
        )
    body = (
        f"<h1>{html.escape(title)}</h1><p class=muted>{html.escape(meta_line(meta))}</p>"
        f"<p>{len(rows):,} latents, {alive:,} fired on these tokens. Click a column to sort.</p>"
        '<p><input id="q" size="40" placeholder="search token text (fires on / promotes)"> <span id="n"></span></p>'
        '<table id="t"><thead><tr><th>latent</th><th>frequency</th><th>mean act.</th><th>max act.</th>'
        f"<th>fires on (top contexts)</th><th>promotes</th></tr></thead><tbody>{''.join(lines)}</tbody></table>"
    )
    return page(title, body, INDEX_JS)


def write_site(
    out: Path,
    records: Iterable[dict[str, Any]],
    d_sae: int,
    title: str,
    meta: dict[str, Any],
    index_row: Callable[[dict[str, Any]], dict[str, Any]],
) -> Path:
    """Write index.html and one page per latent under `out`; returns the index's path."""
    (out / LATENTS_DIR).mkdir(parents=True, exist_ok=True)
    rows = []
    for rec in records:
        (out / LATENTS_DIR / f"{rec['id']}.html").write_text(latent_page(rec, d_sae, title), encoding="utf-8")
        rows.append(index_row(rec))
    for stale in (out / LATENTS_DIR).glob("*.html"):  # pages of a wider SAE inspected into `out` before
        if not stale.stem.isdigit() or int(stale.stem) >= d_sae:
            stale.unlink()
    (out / "index.html").write_text(index_page(rows, title, meta), encoding="utf-8")
    return out / "index.html"


def write_sweep_index(out: Path, members: list[tuple[str, str]]) -> Path:
    """index.html of a sweep: one link per member site (name, one line about it)."""
    items = "".join(
        f'<li><a href="{html.escape(n)}/index.html">{html.escape(n)}</a> {html.escape(d)}</li>'
        for n, d in members
    )
    (out / "index.html").write_text(
        page("sae inspect: sweep", f"<h1>Sweep members</h1><ul>{items}</ul>"), encoding="utf-8"
    )
    return out / "index.html"
