"""``classify --report FILE.html``: one self-contained page to look over a classified batch.

Offline by construction: no script, style or font is fetched from anywhere. The page holds
its style and a little vanilla JavaScript inline, the histograms as inline SVG drawn here,
and each image's thumbnail as a data URI (a JPEG of the 64 px image the model classified,
about 1.5 kB); heatmaps made by ``--heatmaps`` are linked by their path relative to the
page, so the page and the heatmap folder move together. Rows go into the page as one JSON
block that the script renders into the grid, sorted and filtered in the browser; the cards
are rendered 240 at a time as the reader scrolls, so that a page of 5,216 images builds
no more cards than one of 240 before it is usable (measured: 11 MB, usable after about half
a second in headless Chromium; docs/visual.md).

Every text from the inputs (file names) reaches the page only as JSON data and is put into
the document with ``textContent``, never parsed as HTML.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from threengan_cli.core import fileio
from threengan_cli.infer.output import text

_BINS = 20
_THUMB_QUALITY = 85


def thumbnail(image_u8: np.ndarray) -> str:
    """A data URI of the image as the model saw it (a small grayscale JPEG)."""
    buffer = io.BytesIO()
    Image.fromarray(image_u8, "L").save(buffer, format="JPEG", quality=_THUMB_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class ReportPage:
    """Collects rows as they stream past (:meth:`add`), then writes the page (:meth:`write`)
    whole or not at all. ``info`` is what the page says of the run: model, thresholds."""

    def __init__(self, path: Path | str, classes: list[str], info: dict[str, Any]):
        self.path, self.classes, self.info = Path(path), list(classes), info
        self.cards: list[dict[str, Any]] = []
        self.errors: list[tuple[str, str]] = []

    def add(self, row, image_u8: np.ndarray | None, heatmap: Path | None = None) -> None:
        if not row.ok:
            self.errors.append((text(row.path), text(row.error)))
            return
        link = None
        if heatmap is not None:
            where = os.path.relpath(os.path.abspath(heatmap), os.path.abspath(self.path.parent))
            link = urllib.parse.quote(Path(where).as_posix())
        self.cards.append(
            {
                "path": text(row.path),
                "label": row.label,
                "p": [row.probabilities[c] for c in self.classes],
                "score": row.ood_score,
                "ood": bool(row.ood),
                "thumb": thumbnail(image_u8) if image_u8 is not None else None,
                "heatmap": link,
            }
        )

    def write(self) -> None:
        fileio.write_text(self.path, self.html())

    # ------------------------------------------------------------------------------ page
    def html(self) -> str:
        counts = {c: sum(card["label"] == c for card in self.cards) for c in self.classes}
        flagged = sum(card["ood"] for card in self.cards)
        positive = self.classes[-1]
        probs = [card["p"][-1] for card in self.cards]
        scores = [card["score"] for card in self.cards if card["score"] is not None]
        tiles = "".join(
            f'<div class="tile"><b>{html.escape(c)}</b><span>{n}</span></div>'
            for c, n in counts.items()
        )
        tiles += f'<div class="tile"><b>flagged ood</b><span id="n-ood">{flagged}</span></div>'
        if self.errors:
            tiles += f'<div class="tile"><b>errors</b><span>{len(self.errors)}</span></div>'
        threshold = self.info.get("threshold")
        ood_threshold = self.info.get("ood_threshold")
        charts = _histogram(probs, 0.0, 1.0, f"p_{positive}", threshold)
        if scores:
            top = max(float(np.quantile(scores, 0.99)), (ood_threshold or 0) * 1.5, 1e-6)
            charts += _histogram(scores, 0.0, top, "ood_score", ood_threshold)
        data = json.dumps(
            {"classes": self.classes, "cards": self.cards, "errors": self.errors[:1000]},
            separators=(",", ":"),
        )
        # "<" as a JSON escape: no "</script>" or "<!--" in a file name can end the block
        data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        options = "".join(f"<option>{html.escape(c)}</option>" for c in self.classes)
        about = " · ".join(f"{html.escape(k)} {html.escape(str(v))}" for k, v in self.info.items())
        return _PAGE.format(
            title=f"threengan classify: {len(self.cards) + len(self.errors)} images",
            about=about,
            tiles=tiles,
            charts=charts,
            options=options,
            positive=html.escape(positive),
            data=data,
            style=_STYLE,
            script=_SCRIPT,
        )


def _histogram(values: list[float], low: float, high: float, name: str, mark) -> str:
    """An inline SVG bar chart of ``values`` in :data:`_BINS` bins over [low, high] (values
    above ``high`` counted in the last bin), with a line at ``mark`` where given."""
    width, height, pad = 320, 120, 18
    counts = np.histogram(np.clip(values, low, high), bins=_BINS, range=(low, high))[0]
    tallest = max(int(counts.max()) if len(values) else 0, 1)
    step = width / _BINS
    bars = "".join(
        f'<rect x="{i * step:.1f}" y="{height - pad - (height - 2 * pad) * n / tallest:.1f}" '
        f'width="{step - 1:.1f}" height="{(height - 2 * pad) * n / tallest:.1f}">'
        f"<title>{low + i * (high - low) / _BINS:.3g}-{low + (i + 1) * (high - low) / _BINS:.3g}"
        f": {n}</title></rect>"
        for i, n in enumerate(counts.tolist())
    )
    above = sum(v > high for v in values)
    over = f"; the last bar holds the {above} above {high:.3g}" if above else ""
    line = ""
    if mark is not None and low <= mark <= high:
        x = (mark - low) / (high - low) * width
        line = (
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{pad - 6}" y2="{height - pad}" class="mark"/>'
            f'<text x="{x + 3:.1f}" y="{pad}">threshold {mark:.3g}</text>'
        )
    return (
        f'<figure><svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="histogram of {html.escape(name)}">{bars}{line}'
        f'<text x="0" y="{height - 3}">{low:.3g}</text>'
        f'<text x="{width}" y="{height - 3}" text-anchor="end">{high:.3g}</text></svg>'
        f"<figcaption>{html.escape(name)} ({len(values)} images; tallest bar {tallest}"
        f"{over})</figcaption></figure>"
    )


_STYLE = """
body{font:14px system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:18px;margin:0 0 4px}
.about{color:#666;font-size:12px;margin-bottom:10px}
.tiles{display:flex;gap:10px;flex-wrap:wrap}
.tile{border:1px solid #ccc;border-radius:6px;padding:6px 12px;min-width:90px}
.tile b{display:block;font-size:12px;color:#555}.tile span{font-size:22px}
.charts{display:flex;gap:24px;flex-wrap:wrap;margin:10px 0}
figure{margin:0}figcaption{font-size:12px;color:#555}
svg rect{fill:#4a78b5}svg text{font-size:10px;fill:#333}svg .mark{stroke:#c22;stroke-width:2}
.controls{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #ddd;
display:flex;gap:14px;flex-wrap:wrap;align-items:center;z-index:1}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:8px;
margin-top:8px}
.card{border:1px solid #ccc;border-radius:6px;padding:4px;font-size:12px;overflow:hidden}
.card.ood{border:2px solid #d08000;background:#fff7e6}
.card img{width:100%;aspect-ratio:1;display:block;background:#000}
.card img.heatmap{object-fit:cover;object-position:100% 0}
.card .name{white-space:nowrap;overflow:hidden;text-overflow:ellipsis;color:#555}
.card .flag{color:#b06000;font-weight:bold}
#more{margin:12px 0;color:#666}
"""

# Cards are made from the JSON block a page at a time: all 5,216 at once would decode as
# many images before the first paint.
_SCRIPT = """
const data = JSON.parse(document.getElementById('rows').textContent);
const grid = document.getElementById('grid'), shown = document.getElementById('shown');
const PAGE = 240;
let view = [], drawn = 0;
function value(id) { return document.getElementById(id).value; }
function card(c) {
  const div = document.createElement('div');
  div.className = 'card' + (c.ood ? ' ood' : '');
  div.dataset.label = c.label; div.dataset.p = c.p[c.p.length - 1];
  const img = document.createElement('img');
  img.alt = c.path; img.loading = 'lazy';
  if (c.heatmap) {  // its right half: the evidence over the image; a click opens the whole
    const a = document.createElement('a'); a.href = c.heatmap; a.title = 'open the heatmap';
    img.src = c.heatmap; img.className = 'heatmap'; a.appendChild(img); div.appendChild(a);
  } else { img.src = c.thumb || ''; div.appendChild(img); }
  const line = document.createElement('div');
  const k = data.classes.indexOf(c.label);
  line.textContent = c.label + ' ' + c.p[k].toFixed(3);
  if (c.ood) { const f = document.createElement('span'); f.className = 'flag';
    f.textContent = ' ood ' + c.score.toFixed(2); line.appendChild(f); }
  else if (c.score !== null) { line.appendChild(document.createTextNode(
    ' · ' + c.score.toFixed(2))); }
  const name = document.createElement('div'); name.className = 'name';
  name.textContent = c.path.split('/').pop(); name.title = c.path;
  div.appendChild(line); div.appendChild(name);
  return div;
}
function draw() {
  const end = Math.min(view.length, drawn + PAGE), part = document.createDocumentFragment();
  for (; drawn < end; drawn++) part.appendChild(card(view[drawn]));
  grid.appendChild(part);
  document.getElementById('more').textContent =
    drawn < view.length ? (view.length - drawn) + ' more below' : '';
}
function update() {
  const label = value('label'), flag = value('flag');
  const low = parseFloat(value('pmin')) || 0, high = parseFloat(value('pmax'));
  const top = isNaN(high) ? 1 : high, last = data.classes.length - 1;
  view = data.cards.filter(c => (label === '' || c.label === label)
    && (flag === '' || (flag === 'ood') === c.ood)
    && c.p[last] >= low && c.p[last] <= top);
  const key = value('sort'), sign = key.startsWith('-') ? -1 : 1, field = key.replace('-', '');
  const get = field === 'p' ? (c => c.p[last]) : field === 'score' ? (c => c.score ?? -1)
    : null;
  if (get) view.sort((a, b) => sign * (get(a) - get(b)));
  else view.sort((a, b) => sign * (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
  grid.textContent = ''; drawn = 0; draw();
  shown.textContent = view.length + ' of ' + data.cards.length + ' shown';
}
// The controls' state lives in the address too (report.html#label=PNEUMONIA&sort=-p), so
// a view can be bookmarked or sent; the page reads it when it opens.
const CONTROLS = ['label', 'flag', 'pmin', 'pmax', 'sort'];
for (const [id, v] of new URLSearchParams(location.hash.slice(1)))
  if (CONTROLS.includes(id)) document.getElementById(id).value = v;
for (const id of CONTROLS) document.getElementById(id).addEventListener('input', () => {
  update();
  history.replaceState(null, '', '#' + new URLSearchParams(
    CONTROLS.map(c => [c, value(c)])).toString());
});
new IntersectionObserver(e => { if (e[0].isIntersecting && drawn < view.length) draw(); })
  .observe(document.getElementById('more'));
update();
// When the page became usable and when it finished loading, in ms from the navigation's
// start: benchmarks/bench_report.py reads them.
document.body.dataset.ready = String(Math.round(performance.now()));
addEventListener('load', () => {
  document.body.dataset.loaded = String(Math.round(performance.now()));
});
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src data: file: 'self';
 style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title><style>{style}</style></head>
<body>
<h1>{title}</h1>
<div class="about">{about}</div>
<div class="tiles">{tiles}</div>
<div class="charts">{charts}</div>
<div class="controls">
<label>label <select id="label"><option value="">all</option>{options}</select></label>
<label>flag <select id="flag"><option value="">all</option>
<option value="ood">flagged ood</option>
<option value="ok">not flagged</option></select></label>
<label>p_{positive} from <input id="pmin" type="number" min="0" max="1" step="0.05" value="0"
 style="width:5em"> to <input id="pmax" type="number" min="0" max="1" step="0.05" value="1"
 style="width:5em"></label>
<label>sort <select id="sort"><option value="path">name</option>
<option value="-p">p_{positive}, high first</option>
<option value="p">p_{positive}, low first</option>
<option value="-score">ood score, high first</option>
<option value="score">ood score, low first</option>
</select></label>
<span id="shown"></span>
</div>
<div id="grid"></div>
<div id="more"></div>
<script type="application/json" id="rows">{data}</script>
<script>{script}</script>
</body></html>
"""
