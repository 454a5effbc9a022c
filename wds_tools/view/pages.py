"""HTML pages of the viewer. Every string that comes from the data (text, keys, metadata, URLs,
names) goes through :func:`e` (``html.escape``); the pages hold no script at all, and the server
forbids scripts by its Content-Security-Policy as a second line of defence.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import urlencode

import numpy as np

from .. import io as wio
from . import charts
from .data import SEARCH_FIELDS, MixReport, SearchResult, Source, grid_label, iter_tokens

__all__ = [
    "CSS",
    "e",
    "layout",
    "error_page",
    "overview_page",
    "samples_page",
    "sample_page",
    "mix_page",
    "search_page",
    "search_form",
    "placeholder_svg",
    "TokenText",
]


def e(x: Any) -> str:
    """HTML-escape anything (quotes included: safe in attributes too)."""
    return escape(str(x), quote=True)


CSS = """
:root { --fg:#1d2330; --muted:#667085; --line:#e3e6ec; --bg:#f6f7f9; --card:#fff;
        --accent:#3b6fd8; --train:#d9f2e1; --train-line:#2e9e5b; --ctx:#eef0f4; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
       color:var(--fg); background:var(--bg); }
header { background:#1d2330; color:#fff; padding:10px 24px; display:flex; gap:20px;
         align-items:baseline; flex-wrap:wrap; }
header .brand { font-weight:700; letter-spacing:.02em; }
header a { color:#c9d6ff; text-decoration:none; } header a:hover { text-decoration:underline; }
header .src { color:#9aa4b8; font-family:ui-monospace,monospace; font-size:12px; }
main { padding:18px 24px 40px; max-width:1180px; }
h1 { font-size:20px; margin:4px 0 12px; } h2 { font-size:16px; margin:22px 0 8px; }
a { color:var(--accent); }
.cards { display:flex; flex-wrap:wrap; gap:10px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:10px 14px;
        min-width:130px; }
.card .v { font-size:20px; font-weight:650; } .card .k { color:var(--muted); font-size:12px; }
.note { color:var(--muted); font-size:12.5px; margin:6px 0; }
.warn { color:#9a3412; background:#fff4e5; border:1px solid #fed7aa; padding:6px 10px;
        border-radius:6px; }
.charts { display:flex; flex-wrap:wrap; gap:12px; }
.chart { background:var(--card); border:1px solid var(--line); border-radius:8px; }
.chart .ct { font-weight:600; font-size:13px; fill:var(--fg); }
.chart .cl { font-size:11px; fill:var(--muted); } .chart .tk { font-size:10px; fill:var(--muted); }
.chart .grid { stroke:#eef0f4; } .chart .axis { stroke:#98a2b3; }
table { border-collapse:collapse; background:var(--card); border:1px solid var(--line); }
th, td { padding:5px 10px; border-bottom:1px solid var(--line); text-align:left;
         vertical-align:top; }
th { background:#f0f2f6; font-weight:600; font-size:12.5px; }
td.n, th.n { text-align:right; font-variant-numeric:tabular-nums; }
td.mono, .mono { font-family:ui-monospace,SFMono-Regular,Menlo,monospace; font-size:12.5px; }
table.rows td { white-space:nowrap; }
.scroll { overflow-x:auto; max-width:100%; }
form.search { display:flex; gap:6px; margin:10px 0; }
form.search input[type=text] { width:320px; padding:5px 8px; border:1px solid #c5cad3;
                               border-radius:6px; }
form.search select, form.search button { padding:5px 8px; border-radius:6px;
                                         border:1px solid #c5cad3; background:#fff; }
.pager { margin:10px 0; display:flex; gap:12px; align-items:center; }
.conv { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:14px;
        white-space:pre-wrap; word-break:break-word; font-size:14px; line-height:1.7; }
.t { border-radius:3px; padding:1px 0; }
.t.train { background:var(--train); box-shadow:inset 0 -2px 0 var(--train-line); }
.t.ctx { color:#4b5565; background:var(--ctx); }
.sp { display:inline-block; font-family:ui-monospace,monospace; font-size:11.5px;
      border:1px solid #b7c3e0; background:#eaf0ff; color:#2848a0; border-radius:4px;
      padding:0 4px; margin:0 1px; line-height:1.5; white-space:nowrap; }
.t.train .sp { border-color:var(--train-line); }
.sp.oov { border-color:#f5a25d; background:#fff1e6; color:#9a3412; }
.ids { font-family:ui-monospace,monospace; font-size:12px; color:#475467; }
figure.img { display:block; margin:10px 0; padding:10px; background:#fff;
             border:1px solid var(--line); border-radius:8px; width:fit-content; max-width:100%;
             white-space:normal; line-height:1.45; }
figure.img.train { border-color:var(--train-line); box-shadow:0 0 0 2px var(--train); }
figure.img img { display:block; max-width:min(100%, 512px); height:auto;
                 border-radius:4px; }
figure.img img.px { image-rendering:pixelated; }
figure.img figcaption { color:var(--muted); font-size:12px; margin-top:6px; }
.legend span { margin-right:14px; }
.navrow { display:flex; gap:14px; flex-wrap:wrap; align-items:center; margin:8px 0 14px; }
details { margin:10px 0; } summary { cursor:pointer; color:var(--accent); }
pre { white-space:pre-wrap; word-break:break-all; background:#fff; border:1px solid var(--line);
      border-radius:8px; padding:10px; max-height:420px; overflow:auto; }
"""


def layout(title: str, body: str, source: Source, ds: Optional[int] = None) -> str:
    """A whole page: header with the source and links to each dataset, then ``body``."""
    nav = []
    if source.config is not None:
        nav.append('<a href="/">mixture</a>')
    for k, d in enumerate(source.datasets):
        cur = ' aria-current="page"' if k == ds else ""
        nav.append(f'<a href="/d/{k}/"{cur}>{e(d.name)}</a>')
    if ds is not None:
        nav.append(f'<a href="/d/{ds}/samples">samples</a>')
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)} - wds-tools view</title>"
        '<link rel="stylesheet" href="/style.css"></head><body>'
        f'<header><span class="brand">wds-tools view</span>{" ".join(nav)}'
        f'<span class="src">{e(wio.redact(source.path))}</span></header>'
        f"<main>{body}</main></body></html>"
    )


def error_page(status: int, message: str, source: Optional[Source]) -> str:
    body = f'<h1>{status}</h1><p class="warn">{e(message)}</p><p><a href="/">home</a></p>'
    if source is None:
        return f"<!doctype html><title>{status}</title>{body}"
    return layout(str(status), body, source)


def _card(label: str, value: str) -> str:
    return f'<div class="card"><div class="v">{value}</div><div class="k">{e(label)}</div></div>'


def _n(x: int) -> str:
    return f"{x:,}"


def _tokenizer_name(doc: Dict[str, Any]) -> str:
    t = doc.get("tokenizer")
    if isinstance(t, dict):
        return str(t.get("name") or t.get("sha256", "")[:12] or "-")
    return str(t) if t else "-"


def search_form(k: int, query: str = "", field: str = "key") -> str:
    opts = "".join(
        f'<option value="{f}"{" selected" if f == field else ""}>{f}</option>' for f in SEARCH_FIELDS
    )
    return (
        f'<form class="search" method="get" action="/d/{k}/samples">'
        f'<input type="text" name="q" value="{e(query)}" placeholder="key, item id, source '
        f'file or any metadata text" aria-label="search">'
        f'<select name="field" aria-label="field">{opts}</select>'
        '<button type="submit">search</button></form>'
    )


def overview_page(source: Source, k: int) -> str:
    d = source.datasets[k]
    ov = d.overview()
    n_shards = len(d.entries)
    sup = d.num_supervised / d.num_tokens if d.num_tokens else 0.0
    cards = [
        _card("shards", _n(n_shards)),
        _card("samples", _n(d.num_samples)),
        _card("tokens", _n(d.num_tokens)),
        _card("supervised tokens", f"{sup:.1%}"),
        _card("bytes", _n(d.bytes)),
        _card("bytes / token", f"{d.bytes / d.num_tokens:.2f}" if d.num_tokens else "-"),
        _card("tokenizer", e(_tokenizer_name(d.doc))),
    ]
    if d.doc.get("num_failed"):
        cards.append(_card("failed items (pre-tokenize)", _n(int(d.doc["num_failed"]))))
    n_len = int(ov.lengths.size)
    partial = ov.read_shards < n_shards
    scope = (
        f"from {ov.read_shards} of {n_shards} shards ({_n(n_len)} samples, every sample of those shards)"
        if partial
        else f"from all {n_shards} shards ({_n(n_len)} samples)"
    )
    meta_scope = (
        f"from the metadata of {_n(ov.meta_samples)} samples (the first samples of "
        f"each of those {ov.read_shards} shards)"
    )
    parts = [
        f"<h1>{e(d.name)}</h1>",
        f'<p class="note mono">{e(wio.redact(d.source))}</p>',
        f'<div class="cards">{"".join(cards)}</div>',
        '<p class="note">Shards, samples, tokens and supervised share are exact (from the manifest).</p>',
    ]
    if n_len:
        lens = ov.lengths
        parts.append(
            f'<p class="note">Sample length {scope}: mean {lens.mean():,.0f}, median '
            f"{int(np.median(lens)):,}, min {int(lens.min()):,}, max {int(lens.max()):,} "
            "tokens.</p>"
        )
    ims = sum(c * n for n, c in ov.images_per_sample.items())
    parts.append(
        f'<p class="note">Images {meta_scope}: {_n(ims)} images in {_n(ov.meta_samples)} samples.</p>'
    )
    for err in ov.errors:
        parts.append(f'<p class="warn">{e(err)}</p>')
    per = ov.images_per_sample
    parts.append(
        '<div class="charts">'
        + charts.histogram(ov.lengths, "Sample length", "tokens per sample")
        + charts.histogram(
            ov.supervised_frac,
            "Supervised share per sample",
            "supervised tokens / tokens",
            color=charts.PALETTE[2],
        )
        + charts.bars([str(n) for n in per], list(per.values()), "Images per sample", "images", "samples")
        + charts.bars(
            list(ov.grids),
            list(ov.grids.values()),
            "Images by grid size",
            "grid (rows x columns of tokens)",
            "images",
            color=charts.PALETTE[4],
        )
        + "</div>"
    )
    if ov.grids:
        rows = "".join(
            f'<tr><td class="mono">{e(g)}</td><td class="n">{_n(c)}</td></tr>' for g, c in ov.grids.items()
        )
        parts.append(
            f'<h2>Images by grid size</h2><table><tr><th>grid</th><th class="n">'
            f"images</th></tr>{rows}</table>"
        )
    parts.append(
        f'<h2>Samples</h2><p><a href="/d/{k}/samples">browse all {_n(d.num_samples)} '
        f"samples</a></p>{search_form(k)}"
    )
    return layout(d.name, "".join(parts), source, k)


def _rows_table(k: int, rows: List[Dict[str, Any]]) -> str:
    head = (
        '<tr><th class="n">#</th><th>key</th><th class="n">tokens</th>'
        '<th class="n">supervised</th><th>images</th><th>id</th><th>source</th>'
        "<th>shard</th></tr>"
    )
    out = []
    for r in rows:
        if "error" in r:
            out.append(
                f'<tr><td class="n">{r["g"]}</td><td colspan="7" class="warn">{e(r["error"])}</td></tr>'
            )
            continue
        ims = r.get("images")
        out.append(
            f'<tr><td class="n">{_n(r["g"])}</td>'
            f'<td class="mono"><a href="/d/{k}/s/{r["g"]}">{e(r["key"])}</a></td>'
            f'<td class="n">{_n(r["tokens"])}</td><td class="n">{_n(r["supervised"])}</td>'
            f'<td class="mono">{e(", ".join(ims)) if ims else ("-" if ims is not None else "")}'
            f'</td><td class="mono">{e(_short(r.get("id"), 32))}</td>'
            f'<td class="mono">{e(_short(r.get("source"), 32))}</td>'
            f'<td class="mono">{e(r["shard"])}</td></tr>'
        )
    return f'<div class="scroll"><table class="rows">{head}{"".join(out)}</table></div>'


def _short(v: Any, n: int = 48) -> str:
    if v is None:
        return ""
    s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return s if len(s) <= n else s[: n - 1] + "\u2026"


def samples_page(source: Source, k: int, start: int, page_size: int, rows: List[Dict[str, Any]]) -> str:
    d = source.datasets[k]
    n = d.num_samples
    last = max(0, (n - 1) // page_size * page_size)

    def link(s: int, label: str) -> str:
        return f'<a href="/d/{k}/samples?start={s}">{label}</a>'

    pager = [
        '<div class="pager">',
        link(0, "&laquo; first") if start > 0 else "<span>&laquo; first</span>",
        link(max(0, start - page_size), "&lsaquo; previous")
        if start > 0
        else "<span>&lsaquo; previous</span>",
        f"<span>samples {_n(min(start + 1, n))}&ndash;{_n(min(start + page_size, n))} of {_n(n)}</span>",
        link(start + page_size, "next &rsaquo;") if start + page_size < n else "<span>next &rsaquo;</span>",
        link(last, "last &raquo;") if start < last else "<span>last &raquo;</span>",
        "</div>",
    ]
    body = (
        f"<h1>{e(d.name)}: samples</h1>{search_form(k)}{''.join(pager)}{_rows_table(k, rows)}{''.join(pager)}"
    )
    return layout(f"{d.name} samples", body, source, k)


def search_page(source: Source, k: int, query: str, field: str, res: SearchResult) -> str:
    d = source.datasets[k]
    scope = (
        f"Searched samples {_n(res.start)}&ndash;{_n(max(res.start, res.stop - 1))} of {_n(d.num_samples)}"
    )
    if field != "key":
        scope += " (metadata search reads the samples' bytes, within a time and byte budget)"
    more = ""
    if not res.complete:
        qs = urlencode({"q": query, "field": field, "from": res.stop})
        more = f' <a href="/d/{k}/samples?{e(qs)}">search further from sample {_n(res.stop)} &rsaquo;</a>'
    found = sum(1 for r in res.rows if "error" not in r)
    body = (
        f"<h1>{e(d.name)}: search</h1>{search_form(k, query, field)}"
        f'<p class="note">{scope}: {found} match{"es" if found != 1 else ""} for '
        f'{e(field)} containing <span class="mono">{e(query)}</span>'
        f"{'' if not res.complete else ' (whole dataset searched)'}.{more}</p>"
        f"{_rows_table(k, res.rows)}"
    )
    return layout(f"{d.name} search", body, source, k)


# --- sample page ------------------------------------------------------------------------------


class TokenText:
    """Decodes runs of ids to text with a ``tokenizers.Tokenizer``; special (added) tokens come
    out as their names so they can be drawn apart."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        try:
            added = tokenizer.get_added_tokens_decoder()
            self.special = {int(i) for i, t in added.items() if getattr(t, "special", True)}
        except AttributeError:  # older tokenizers
            self.special = set()

    def html(self, ids: Sequence[int]) -> str:
        out: List[str] = []
        run: List[int] = []

        def flush() -> None:
            if run:
                out.append(e(self.tok.decode(run, skip_special_tokens=False)))
                run.clear()

        for t in ids:
            if t >= self.vocab_size:  # the wrong tokenizer, or a corrupt id: make it visible
                flush()
                out.append(
                    f'<span class="sp oov" title="id {t} is outside the tokenizer '
                    f'({self.vocab_size} tokens)">#{t}</span>'
                )
            elif t in self.special:
                flush()
                name = self.tok.id_to_token(t)
                out.append(f'<span class="sp" title="id {t}">{e(name)}</span>')
            else:
                run.append(t)
        flush()
        return "".join(out)


def _ids_html(ids: Sequence[int]) -> str:
    return f'<span class="ids">{" ".join(str(x) for x in ids)}</span> '


def sample_page(
    source: Source, k: int, s: Dict[str, Any], text: Optional[TokenText], has_renderer: bool
) -> str:
    d = source.datasets[k]
    g, key, meta = s["__g__"], s["__key__"], s["meta"]
    ids = np.asarray(s["input_ids"])
    labels = np.asarray(s["labels"])
    n = int(ids.size)
    n_sup = int(np.count_nonzero(labels[:n] != -100))
    # meta["images"] as stored: j is an entry's position there (the image route's number too)
    images = meta["images"] if isinstance(meta, dict) and isinstance(meta.get("images"), list) else []
    blocks = sorted(
        (
            (int(im["offset"]), int(im["offset"]) + int(im["num_tokens"]), j, im)
            for j, im in enumerate(images)
            if isinstance(im, dict)
            and isinstance(im.get("offset"), int)
            and isinstance(im.get("num_tokens"), int)
            and 0 <= im["offset"] < im["offset"] + im["num_tokens"] <= n
        ),
        key=lambda b: b[0],
    )
    conv, pos = [], 0
    ids_list = ids.tolist()
    for a, b, j, im in blocks + [(n, n, -1, None)]:
        if a < pos:  # overlapping blocks: show the ids plainly
            continue
        for x, y, trained in iter_tokens(ids[pos:a], labels[pos:a]):
            piece = ids_list[pos + x : pos + y]
            inner = text.html(piece) if text is not None else _ids_html(piece)
            cls = "train" if trained else "ctx"
            conv.append(
                f'<span class="t {cls}" title="positions {pos + x}-{pos + y - 1}'
                f'{" (trained)" if trained else ""}">{inner}</span>'
            )
        if im is not None:
            conv.append(_image_figure(k, g, j, im, a, b, bool(labels[a] != -100), has_renderer))
        pos = max(pos, b)
    sh_url = wio.redact(d.entries[s["__shard_no__"]].url)
    off, ln = s["__offset__"], s["__length__"]
    nav = [
        '<div class="navrow">',
        f'<a href="/d/{k}/s/{g - 1}">&lsaquo; previous</a>' if g > 0 else "<span>&lsaquo; previous</span>",
        f"<span>sample {_n(g)} of {_n(d.num_samples)}</span>",
        f'<a href="/d/{k}/s/{g + 1}">next &rsaquo;</a>'
        if g + 1 < d.num_samples
        else "<span>next &rsaquo;</span>",
        f'<a href="/d/{k}/samples?start={g // 50 * 50}">back to the list</a>',
        f'<a href="/d/{k}/raw/{g}" download="{e(key)}.tar">raw bytes ({_n(ln)} B)</a>',
        "</div>",
    ]
    cards = [
        _card("tokens", _n(n)),
        _card("supervised", f"{_n(n_sup)} ({n_sup / max(n, 1):.0%})"),
        _card("images", _n(sum(1 for im in images if isinstance(im, dict)))),
    ]
    legend = (
        '<p class="legend note"><span class="t train">&nbsp;trained&nbsp;</span>'
        '<span class="t ctx">&nbsp;masked (context)&nbsp;</span>'
        '<span class="sp">special</span>'
        + ("" if text is not None else " no --tokenizer: token ids shown")
        + "</p>"
    )
    meta_rows = "".join(
        f'<tr><th class="mono">{e(mk)}</th><td class="mono">{e(_short(mv, 400))}</td></tr>'
        for mk, mv in (meta.items() if isinstance(meta, dict) else [])
        if mk != "images"
    )
    img_rows = "".join(
        f'<tr><th class="mono">images[{j}]</th><td class="mono">'
        f"{e(json.dumps(im, ensure_ascii=False))}</td></tr>"
        for j, im in enumerate(images)
    )
    labels_list = labels[:n].tolist()
    raw = (
        "<details><summary>raw ids and labels</summary>"
        f'<pre class="mono">input_ids ({n}):\n{e(" ".join(map(str, ids_list)))}\n\n'
        f"labels (-100 = masked):\n{e(' '.join(map(str, labels_list)))}</pre></details>"
    )
    body = (
        f'<h1>sample <span class="mono">{e(key)}</span></h1>{"".join(nav)}'
        f'<div class="cards">{"".join(cards)}</div>'
        f'<p class="note mono">{e(sh_url)} bytes {_n(off)}&ndash;{_n(off + ln - 1)} '
        f"(offset {off}, length {ln}; shard {s['__shard_no__']}, sample "
        f"{s['__index__']} of that shard)</p>"
        f'<h2>Conversation</h2>{legend}<div class="conv">{"".join(conv)}</div>'
        f"<h2>Metadata</h2>"
        + (f"<table>{meta_rows}{img_rows}</table>" if meta_rows or img_rows else '<p class="note">none</p>')
        + raw
    )
    return layout(f"{key} - {d.name}", body, source, k)


def _image_figure(
    k: int, g: int, j: int, im: Dict[str, Any], a: int, b: int, trained: bool, has_renderer: bool
) -> str:
    grid = grid_label(im)
    w, h = im.get("w"), im.get("h")
    px = f"{w}x{h} px" if isinstance(w, int) and isinstance(h, int) else "size unknown"
    crop = im.get("crop")
    orig = im.get("orig_size")
    cap = [f"<b>image {j}</b>: grid {e(grid)} tokens, {e(px)}", f"tokens {a}&ndash;{b - 1} ({b - a:,})"]
    if crop is not None:
        cap.append(
            f"crop box {e(json.dumps(crop))}"
            + (
                f" of the {e('x'.join(map(str, orig)) if isinstance(orig, list) else orig)} original"
                if orig is not None
                else ""
            )
        )
    cap.append("trained" if trained else "masked (context)")
    if has_renderer:
        dims, cls = "", ""
        if isinstance(w, int) and isinstance(h, int) and 0 < w <= 8192 and 0 < h <= 8192:
            scale = max(1, 256 // max(w, h))  # small pictures are shown enlarged, pixelated
            dims = f' width="{w * scale}" height="{h * scale}"'
            cls = ' class="px"' if scale > 1 else ""
        pic = f'<img src="/d/{k}/img/{g}/{j}.png" alt="image {j} ({e(grid)})"{dims}{cls} loading="lazy">'
    else:
        pic = placeholder_svg(im)
    return (
        f'<figure class="img{" train" if trained else ""}">{pic}'
        f"<figcaption>{cap[0]}<br>{'; '.join(cap[1:])}</figcaption></figure>"
    )


def placeholder_svg(im: Dict[str, Any]) -> str:
    """A box with the block's aspect ratio standing in for a picture (no renderer given)."""
    g = im.get("grid")
    rows, cols = (
        g if isinstance(g, list) and len(g) == 2 and all(isinstance(x, int) and x > 0 for x in g) else (1, 1)
    )
    scale = 256 / max(rows, cols)
    w, h = max(24, int(cols * scale)), max(24, int(rows * scale))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" role="img" aria-label="image placeholder">'
        f'<rect x="1" y="1" width="{w - 2}" height="{h - 2}" fill="#f0f2f6" stroke="#98a2b3" '
        'stroke-dasharray="6,4"/>'
        f'<text x="{w / 2}" y="{h / 2 - 4}" text-anchor="middle" font-size="13" '
        f'fill="#475467">{e(grid_label(im))} grid</text>'
        f'<text x="{w / 2}" y="{h / 2 + 14}" text-anchor="middle" font-size="11" '
        'fill="#667085">no --renderer</text></svg>'
    )


# --- mixture ----------------------------------------------------------------------------------


def mix_page(source: Source, rep: Optional[MixReport], error: Optional[str] = None, command: str = "") -> str:
    cfg = source.config
    by = cfg.weight_by
    parts = [
        f"<h1>Mixture: {e(source.path.rsplit('/', 1)[-1])}</h1>",
        f'<p class="note">seed {cfg.seed}, weights by {e(by)}, on_error {e(cfg.on_error)}, '
        f"shuffle shards={cfg.shuffle.shards} samples={cfg.shuffle.samples} "
        f"(block {cfg.shuffle.block_size} x {cfg.shuffle.window_blocks})</p>",
    ]
    final = {r["name"]: r for r in rep.final["datasets"]} if rep is not None else {}
    head = (
        '<tr><th>dataset</th><th>manifest</th><th class="n">weight</th><th>group</th>'
        '<th class="n">max epochs</th><th class="n">samples</th><th class="n">tokens</th>'
        '<th class="n">target</th><th class="n">realized samples</th>'
        '<th class="n">realized tokens</th><th class="n">max dev</th>'
        '<th class="n">epochs</th><th class="n">steps/epoch</th></tr>'
    )
    rows = []
    for k, (dc, d) in enumerate(zip(cfg.datasets, source.datasets)):
        r = final.get(dc.name, {})
        weight = f"ratio {dc.ratio:g}" if dc.ratio is not None else f"{dc.weight:g}"

        def f(key: str, fmt: str, r: Dict[str, Any] = r) -> str:
            v = r.get(key)
            return "-" if v is None else format(v, fmt)

        rows.append(
            f'<tr><td><a href="/d/{k}/">{e(dc.name)}</a></td>'
            f'<td class="mono">{e(wio.redact(dc.manifest))}</td><td class="n">{e(weight)}</td>'
            f'<td>{e(dc.group)}</td><td class="n">{dc.max_epochs or "-"}</td>'
            f'<td class="n">{_n(d.num_samples)}</td><td class="n">{_n(d.num_tokens)}</td>'
            f'<td class="n">{f("target_share", ".2%")}</td>'
            f'<td class="n">{f("sample_share", ".2%")}</td>'
            f'<td class="n">{f("token_share", ".2%")}</td>'
            f'<td class="n">{f("max_deviation", ".1f")}</td>'
            f'<td class="n">{f("epochs_consumed", ".3f")}</td>'
            f'<td class="n">{f("steps_per_epoch", ",.0f")}</td></tr>'
        )
    parts.append(f"<table>{head}{''.join(rows)}</table>")
    if error:
        parts.append(f'<p class="warn">mixture dry run failed: {e(error)}</p>')
    if rep is not None:
        share_key = "sample_share" if by == "samples" else "token_share"
        steps = [n / rep.batch_size for n in rep.samples]
        series = []
        for dc in cfg.datasets:
            ys = [next(x[share_key] for x in r["datasets"] if x["name"] == dc.name) for r in rep.reports]
            series.append((dc.name, ys, final[dc.name]["target_share"]))
        fin = rep.final
        parts.append(
            "<h2>Target vs realized shares over steps</h2>"
            f'<p class="note">The whole run ({fin["partitions"]} partitions), micro-batches of '
            f"{rep.batch_size}; "
            f"solid: realized {'sample' if by == 'samples' else 'token'} share of everything "
            "read up to that step; dashed: target. Each point is what "
            f'<span class="mono">{e(command)} --samples N</span> prints for that prefix '
            f"(table: N = {_n(fin['simulated_samples'])}"
            f"{'; the stream ended' if fin['ended'] else ''}).</p>"
            + charts.lines(
                steps, series, "Realized vs target share", "step (rank micro-batches)", f"share of {by}"
            )
        )
    parts.append(
        "<h2>Datasets</h2><ul>"
        + "".join(
            f'<li><a href="/d/{k}/">{e(d.name)}</a>: {_n(len(d.entries))} shards, '
            f"{_n(d.num_samples)} samples, {_n(d.num_tokens)} tokens</li>"
            for k, d in enumerate(source.datasets)
        )
        + "</ul>"
    )
    return layout("mixture", "".join(parts), source)
