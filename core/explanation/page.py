"""`mk explain --html FILE`: one self-contained page (inline CSS and JavaScript, nothing
fetched), one row per text with its words coloured by score, sortable by any column.

The page carries a generator tag: an earlier page of mk explain is replaced, any other
file only with --force. It is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from mk.core.errors import BadInput
from mk.core.explanation.render import segments, top_words
from mk.core.outputs import check_apart

GENERATOR = '<meta name="generator" content="mk explain">'
SUFFIXES = (".html", ".htm")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
.meta{color:#59636e;margin-bottom:12px}.warn{color:#9a6700}
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #d1d9e0;padding:6px 8px;
text-align:left;vertical-align:top}th{background:#f6f8fa;cursor:pointer;user-select:none;white-space:nowrap}
th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.text{max-width:60em}.w{border-radius:3px;padding:0 1px}.wrong{color:#cf222e;font-weight:600}
.legend span{padding:1px 6px;border-radius:3px;margin-right:4px}
.summary{display:flex;flex-wrap:wrap;gap:24px}.summary table{width:auto}
"""

JS = """
function sortBy(table, col, desc){
  var heads = table.tHead.rows[0].cells;
  for (var i = 0; i < heads.length; i++) heads[i].classList.remove("sorted-asc", "sorted-desc");
  heads[col].classList.add(desc ? "sorted-desc" : "sorted-asc");
  var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
  rows.sort(function(a, b){
    var x = a.cells[col].dataset.sort, y = b.cells[col].dataset.sort;
    var nx = parseFloat(x), ny = parseFloat(y);
    var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
    return desc ? -c : c;
  });
  rows.forEach(function(r){ body.appendChild(r); });
}
document.querySelectorAll("table.sortable").forEach(function(table){
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function(th, col){
    th.addEventListener("click", function(){ sortBy(table, col, !th.classList.contains("sorted-desc")); });
  });
});
// page.html#sort=score (descending) or #sort=score-asc: a link to a sorted view
var wanted = /^#sort=([a-z]+)(-asc)?$/.exec(location.hash);
if (wanted) {
  var table = document.getElementById("texts");
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function(th, col){
    if (th.dataset.key === wanted[1]) sortBy(table, col, !wanted[2]);
  });
}
"""


def check_page(path: Path, force: bool, inputs=()) -> Path:
    """Refuse, before any work, a page that cannot or must not be written (one inside
    an input artifact too: it would add a file its manifest does not list)."""
    path = Path(path)
    check_apart(path, inputs, "--html")
    if path.suffix.lower() not in SUFFIXES:
        raise BadInput(f"--html {path}: give a file name ending in .html")
    if path.is_dir():
        raise BadInput(f"--html {path}: is a folder; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise BadInput(f"--html {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"--html {path}: the folder {parent} is not writable")
    if path.exists() and not force and not _is_our_page(path):
        raise BadInput(f"--html {path}: exists and is not a page mk explain wrote",
                       hint="pass --force to overwrite it, or choose another file")
    return path


def _is_our_page(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return GENERATOR.encode() in f.read(4096)
    except OSError:
        return False


def colour(weight: float) -> str:
    """Green towards the explained class, red against it; opacity by strength."""
    rgb = "26,127,55" if weight >= 0 else "207,34,46"
    return f"rgba({rgb},{min(abs(weight), 1.0) * 0.75:.3f})"


def _words_html(rec: dict) -> str:
    parts = []
    for text, weight, score in segments(rec):
        if weight is None:
            parts.append(html.escape(text))
        else:
            parts.append(f'<span class="w" style="background:{colour(weight)}" title="{score:+.4f}">'
                         f"{html.escape(text)}</span>")
    return "".join(parts)


def _cell(value, sort=None, cls: str = "") -> str:
    sort = value if sort is None else sort
    klass = f' class="{cls}"' if cls else ""
    return f'<td{klass} data-sort="{html.escape(str(sort), quote=True)}">{value}</td>'


def _row(rec: dict, with_labels: bool, with_faith: bool) -> str:
    cells = [_cell(rec["index"] + 1, cls="num"), _cell(_words_html(rec), sort=rec["text"], cls="text"),
             _cell(html.escape(rec["prediction"]), sort=rec["prediction"]),
             _cell(f"{rec['score']:.3f}", sort=rec["score"], cls="num"),
             _cell(html.escape(rec["target"]), sort=rec["target"])]
    if with_labels:
        label = html.escape(rec.get("label", ""))
        cells.append(_cell(label if rec.get("correct") else f'<span class="wrong">{label}</span>', sort=label))
    top = ", ".join(html.escape(w["word"]) for w in top_words(rec))
    cells.append(_cell(top))
    if with_faith:
        f = rec["faithfulness"]
        cells.append(_cell(f"{f['drop_top']:+.3f} / {f['drop_random']:+.3f}", sort=f["drop_top"], cls="num"))
    return "<tr>" + "".join(cells) + "</tr>"


def _summary_html(summary: dict) -> str:
    tables = []
    for label, rows in summary.items():
        body = "".join(f"<tr><td>{html.escape(r['word'])}</td><td class=num>{r['mean_score']:+.4f}</td>"
                       f"<td class=num>{r['count']}</td></tr>" for r in rows)
        tables.append(f'<div><h3>{html.escape(label)}</h3><table class="sortable"><thead><tr><th>word</th>'
                      f"<th>mean score</th><th>count</th></tr></thead><tbody>{body}</tbody></table></div>")
    return '<div class="summary">' + "".join(tables) + "</div>"


def render_page(result: dict) -> str:
    records = result["records"]
    with_labels = any("label" in r for r in records)
    with_faith = any("faithfulness" in r for r in records)
    heads = [("index", "#"), ("text", "text"), ("prediction", "prediction"), ("score", "score"),
             ("target", "explained class")] + ([("label", "true label")] if with_labels else []) \
        + [("top", "top words")] + ([("deletion", "deletion: top / random")] if with_faith else [])
    s = result["settings"]
    detail = {"ig": f"{s['steps']} steps", "shap": f"{s['samples']} samples", "lime": f"{s['samples']} samples"}
    meta = (f"model <b>{html.escape(result['model'])}</b> ({html.escape(result['format'])}) · method "
            f"<b>{result['method']}</b> {detail.get(result['method'], '')} · {len(records)} texts · "
            f"{result['seconds']:.1f} s")
    faith = result.get("faithfulness")
    if faith:
        meta += (f"<br>deletion check (top {s['top_k']} words vs {s['top_k']} random): the explained class's "
                 f"probability drops by {faith['mean_drop_top']:.3f} vs {faith['mean_drop_random']:.3f} on average; "
                 f"top words hurt more in {faith['share_top_above_random']:.0%} of texts")
    warnings = "".join(f'<div class="warn">warning: {html.escape(w)}</div>' for w in result["warnings"])
    legend = (f'<div class="legend">words: <span style="background:{colour(1)}">for the explained class</span>'
              f'<span style="background:{colour(-1)}">against it</span> (hover for the score)</div>')
    head = "".join(f'<th data-key="{k}">{h}</th>' for k, h in heads)
    rows = "".join(_row(r, with_labels, with_faith) for r in records)
    summary = ""
    if len(records) > 1 and any(result["summary"].values()):
        summary = ("<h2>Words with the largest mean score, per explained class</h2>"
                   f"{_summary_html(result['summary'])}")
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>" + GENERATOR +
            f"<title>mk explain: {html.escape(Path(result['model']).name)}</title><style>{CSS}</style></head>"
            f"<body><h1>Which words made the model decide</h1><div class=meta>{meta}</div>{warnings}{legend}"
            f'<table class="sortable" id="texts"><thead><tr>{head}</tr></thead>'
            f"<tbody>{rows}</tbody></table>{summary}"
            f"<script>{JS}</script></body></html>\n")


def write_page(result: dict, path: Path, force: bool = False) -> Path:
    """Write the page atomically: a temporary sibling renamed over `path`."""
    path = check_page(path, force)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(render_page(result), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
