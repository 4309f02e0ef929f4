"""Render collected data into one self-contained HTML page (:func:`render`, a pure function of
:class:`~layerlab.report.collect.ReportData`) and write it (:func:`write_report`).

Sections follow the analysis families (criticality, dynamics, invariance, tract, training, then any other): each
has a title in words, an introduction with this run's numbers (:mod:`.text`), interactive views (:mod:`.views`),
the static figures (click to enlarge), the correlation with accuracy (criticality), and per table a summary of the
measures, the sortable and filterable table, derived tables and the provenance of every shard. Then two models
side by side, and the sweeps and failures. plotly.js, CSS and JS are inline: the page needs no network.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import LayerlabError
from ..store import Store, atomic_write_text
from .assets import CSS, JS
from .collect import AnalysisData, ReportData, collect
from .text import family, intro_html, title
from .views import COMPARE_PANELS, View, clean, compare_data, correlation_view, plotly_js, views_for

__all__ = ["render", "table_html", "write_report"]

#: families shown first, in this order; any other follows alphabetically
ORDER = ("criticality", "dynamics", "invariance", "prune", "tract", "training")
#: static figures that an interactive view of the same section replaces (the same plot twice is noise)
REPLACED = {"criticality": {"criticality_vs_accuracy"}}


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _cell(v: Any) -> str:
    import numpy as np

    if isinstance(v, (list, tuple, np.ndarray)) and len(v) > 8:  # per-image values: their count, not 1,000 numbers
        return f'<td class="num" data-v="{len(v)}">[{len(v)} values]</td>'
    if isinstance(v, (list, tuple, dict, np.ndarray)):
        v = json.dumps(v.tolist() if isinstance(v, np.ndarray) else v, default=str)
    elif v is None or pd.isna(v):
        return '<td class="num" data-v=""></td>'
    if isinstance(v, (bool, np.bool_)):
        return f"<td>{bool(v)}</td>"
    if isinstance(v, (int, float, np.integer, np.floating)):
        f = float(v)
        if math.isinf(f):
            return f'<td class="num" data-v="{f!r}">{f}</td>'
        text = f"{int(f)}" if float(f).is_integer() and abs(f) < 1e15 else f"{f:.4g}"
        return f'<td class="num" data-v="{f!r}">{text}</td>'
    s = str(v)
    if len(s) > 160:
        return f'<td class="cfg" title="{_esc(s)}">{_esc(s[:160])}&hellip;</td>'
    return f"<td>{_esc(s)}</td>"


def table_html(df: pd.DataFrame, max_rows: int = 200, cls: str = "sortable") -> str:
    """A sortable HTML table of ``df`` (first ``max_rows`` rows, with a note when cut) with a filter box when it
    has more than a few rows."""
    if df is None or df.empty:
        return '<p class="note">(empty)</p>'
    shown = df.head(max_rows)
    head = "".join(f"<th>{_esc(c)}</th>" for c in shown.columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in shown.itertuples(index=False, name=None))
    note = f'<p class="note">showing the first {max_rows} of {len(df)} rows</p>' if len(df) > max_rows else ""
    box = ('<input class="filter" type="search" placeholder="filter rows (words, e.g. a model or layer)">'
           if cls == "sortable" and len(shown) > 5 else "")
    return (f'<div class="scroll">{box}<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            f"</table></div>{note}")


def _folded(title: str, inner: str, rows: int, open_below: int = 15) -> str:
    opened = " open" if rows <= open_below else ""
    return f"<details{opened}><summary>{_esc(title)}</summary>{inner}</details>"


def _img(data: bytes, mime: str, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:{mime};base64,{base64.b64encode(data).decode()}">'


def _figure_html(path: Path, folder: Path) -> str:
    """A figure, full width when it is wide (multi-panel), enlarged on click by the page's lightbox."""
    mime = "image/png" if path.suffix.lower() == ".png" else "image/svg+xml"
    name = path.relative_to(folder) if path.is_relative_to(folder) else path.name
    data = path.read_bytes()
    size = _png_size(data)
    wide = ' class="wide"' if size and size[0] > 1.6 * size[1] and size[0] > 1100 else ""
    return f"<figure{wide}>{_img(data, mime, str(name))}<figcaption>{_esc(name)}</figcaption></figure>"


def _anchor(name: str) -> str:
    return "a-" + "".join(ch if ch.isalnum() else "-" for ch in name)




def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        return None
    return struct.unpack(">II", data[16:24])


def _derived(out: Path, analysis: str) -> dict[str, Path]:
    """The tables derived from an analysis' shards beside them (``OUT/<analysis>_*.csv``: summaries with
    intervals, differences, settling, critical sets), by name."""
    prefix = Store.sql_name(analysis) + "_"
    return {v: p for v, p in Store(out).derived().items() if v.startswith(prefix) and not v.endswith("_images")}


def _json_script(element_id: str, data: Any) -> str:
    """``data`` as an inline JSON script the page's JS parses (NaN -> null; ``</`` escaped so it cannot end the tag)."""
    payload = json.dumps(clean(data), separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{payload}</script>'


def _view_html(v: View) -> str:
    sid = f"spec-{v.key}"
    wide = " wide" if v.wide else ""
    return (f'<div class="view{wide}" data-view="{_esc(v.key)}"><div class="plot" data-spec="{sid}" role="img" '
            f'aria-label="{_esc(v.title)}"></div><p>{_esc(v.note)}</p>{_json_script(sid, v.spec)}</div>')


def _table_html(a: AnalysisData, out: Path, max_rows: int, main: bool) -> str:
    if not (len(a.table) or len(a.shards)):
        return ""
    parts = [f'<div class="table-block" id="t-{_anchor(a.name)[2:]}"><h3>{_esc(title(a.name, table=main))}</h3>']
    if len(a.table):
        parts.append(f'<p class="note">{_n(len(a.table), "row")} from {_n(len(a.shards), "shard")} in '
                     f"<code>{_esc(Path('shards') / a.name)}</code>; query: <code>layerlab results {_esc(out)} -a "
                     f"{_esc(a.name)}</code></p>")
        parts.append(table_html(a.summary, max_rows))
        parts.append(_folded(f"All rows ({_n(len(a.table), 'row')})", table_html(a.table, max_rows), len(a.table), 0))
    for name, path in _derived(out, a.name).items():
        frame = pd.read_csv(path)
        parts.append(_folded(f"{name} ({_n(len(frame), 'row')}; {path.name})", table_html(frame, max_rows), len(frame), 0))
    if len(a.shards):
        parts.append(_folded(f"Configs ({_n(len(a.shards), 'shard')})", table_html(a.shards, max_rows), len(a.shards), 0))
        parts.append(_folded("Versions", table_html(a.versions, max_rows), 1, 0))
    return "".join(parts) + "</div>"


def _correlation_html(d: ReportData, colors: dict[str, str], max_rows: int) -> str:
    parts = ['<h3 id="correlation">Criticality and accuracy</h3>']
    if d.correlations is None:
        parts.append('<p class="note">Not available here (no zoo table with accuracies). It needs '
                     "<code>zoo/zoo.csv</code> (written by <code>layerlab zoo train</code>, <code>sweep</code>, "
                     "<code>demo</code>).</p>")
        return "".join(parts)
    rho = d.correlations["rho"].iloc[0]
    parts.append(f'<p>Spearman rho between each model&#39;s mean layer criticality (randomize mode, mean over layers '
                 f"of the trial mean) and its test accuracy from {_esc(d.zoo_source)}: <b>{_num(rho)}</b> over "
                 f"{int(d.correlations['n'].iloc[0])} models. Gavrikov et al. 2024 report rho = -0.46 over 50 ImageNet "
                 "ResNet-50s, -0.17 without the adversarially trained ones.</p>")
    parts.append(table_html(d.correlations, max_rows))
    if len(d.per_model) >= 2:
        parts.append('<div class="views">' + _view_html(correlation_view(d.per_model, colors, rho)) + "</div>")
    parts.append(_folded(f"Per model ({len(d.per_model)})", table_html(d.per_model, max_rows), len(d.per_model), 0))
    return "".join(parts)


def _num(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):+.2f}"


def _families(d: ReportData) -> list[tuple[str, list[AnalysisData]]]:
    groups: dict[str, list[AnalysisData]] = {}
    for a in d.analyses:
        groups.setdefault(family(a.name) if a.name != "other figures" else a.name, []).append(a)
    order = [f for f in ORDER if f in groups] + sorted(f for f in groups if f not in ORDER and f != "other figures")
    order += ["other figures"] if "other figures" in groups else []
    return [(f, sorted(groups[f], key=lambda a: (a.name != f, a.name))) for f in order]


def _family_html(name: str, members: list[AnalysisData], d: ReportData, colors: dict[str, str], max_rows: int) -> str:
    tables = {a.name: a.table for a in members if len(a.table)}
    parts = [f'<section id="{_anchor(name)}" data-analysis="{_esc(name)}"><h2>{_esc(title(name))}</h2>']
    text = intro_html(name, tables)
    if text:
        parts.append(f'<div class="intro">{text}</div>')
    views = views_for(name, tables, colors)
    if views:
        parts.append('<div class="views">' + "".join(_view_html(v) for v in views) + "</div>")
    figures = [p for a in members for p in a.figures if p.stem not in REPLACED.get(name, set())]
    if figures:
        folder = d.out / "figures" / name if name != "other figures" else d.out / "figures"
        parts.append(f'<h3>Figures</h3><p class="note">{_n(len(figures), "figure")} from <code>{_esc(folder)}</code>; '
                     "click one to see it at full size.</p>")
        parts.append('<div class="figs">' + "".join(_figure_html(p, folder) for p in figures) + "</div>")
    if name == "criticality":
        parts.append(_correlation_html(d, colors, max_rows))
    parts.extend(_table_html(a, d.out, max_rows, main=a.name == name) for a in members)
    parts.append("</section>")
    return "".join(parts)


def _entities(d: ReportData) -> list[str]:
    """Every model, run and compared model named in the tables (the colour keys and the comparison's choices)."""
    names: set[str] = set()
    for a in d.analyses:
        for col in ("model", "run", "criterion", "method"):
            if col in a.table.columns:
                names.update(str(v) for v in a.table[col].dropna().unique())
    return sorted(names)


def _compare_html(d: ReportData, colors: dict[str, str]) -> str:
    values = compare_data({a.name: a.table for a in d.analyses if len(a.table)})
    models = sorted({m for panel in values.values() for m in panel})
    if len(models) < 2:  # nothing to compare (e.g. a folder of one analysis that has no per-layer values)
        return ""
    parts = ['<section id="compare"><h2>Two models side by side</h2>']
    first, second = _default_pair(models, values)
    options = lambda chosen: "".join(f'<option{" selected" if m == chosen else ""}>{_esc(m)}</option>' for m in models)  # noqa: E731
    parts.append('<p class="intro">Choose two models: each panel draws their per-layer values from one analysis '
                 "(solid: the first, dashed: the second). A model appears in the analyses that hold it: zoo models in "
                 "criticality, training runs also in dynamics, the pretrained/finetuned/scratch models in invariance.</p>")
    parts.append(f'<div class="pick"><label>first<select id="compare-a">{options(first)}</select></label>'
                 f'<label>second<select id="compare-b">{options(second)}</select></label></div>')
    panels = [{"key": k, "title": t, "unit": u} for k, (t, u) in COMPARE_PANELS.items() if k in values]
    parts.append('<div class="views">' + "".join(f'<div class="view"><div class="plot" id="compare-{p["key"]}"></div></div>'
                                                 for p in panels) + "</div>")
    parts.append(_json_script("compare-data", {"panels": panels, "values": values,
                                               "colors": {m: colors.get(m) for m in models}}))
    parts.append('</section>')
    return "".join(parts)


def _default_pair(models: list[str], values: dict[str, dict]) -> tuple[str, str]:
    """Two models that share the most panels (the baseline preferred among equals)."""
    panels = {m: {k for k, v in values.items() if m in v} for m in models}
    rank = lambda m: (len(panels[m]), m == "baseline")  # noqa: E731
    first = max(models, key=rank)
    rest = [m for m in models if m != first]
    return first, max(rest, key=lambda m: (len(panels[m] & panels[first]), m == "baseline", -rest.index(m)))


def _runs_html(d: ReportData, max_rows: int) -> str:
    parts = ['<section id="runs"><h2>Sweeps and failures</h2>']
    if d.failures.empty:
        parts.append('<p class="ok">No failed jobs.</p>')
    else:
        parts.append(f'<p class="bad">{len(d.failures)} failed job(s); details (traceback) in '
                     "<code>failed/&lt;key&gt;.json</code>. Fix the cause and re-run the sweep: only these run again.</p>")
        parts.append(table_html(d.failures, max_rows))
    for s in d.sweeps:
        jobs = pd.DataFrame(s.get("jobs", []))
        counts = jobs["status"].value_counts().to_dict() if "status" in jobs else {}
        parts.append(f"<h3>Sweep {_esc(s.get('name'))}</h3><p class=\"note\">{_esc(s.get('source', ''))}, last run "
                     f"{_esc(s.get('time', ''))}: " + ", ".join(f"{n} {_esc(k)}" for k, n in counts.items()) + "</p>")
        cfg = pd.DataFrame([{"field": k, "value": json.dumps(s.get(k), default=str)}
                            for k in ("zoo", "data", "device", "resources", "analyses") if s.get(k) is not None])
        parts.append(table_html(cfg, max_rows, cls="plain"))
        if len(jobs):
            cols = [c for c in ("kind", "model", "key", "status", "attempts", "seconds", "host", "error") if c in jobs]
            parts.append(_folded(f"Jobs ({len(jobs)})", table_html(jobs[cols], max_rows), len(jobs), 0))
    if d.zoo is not None:
        parts.append(_folded(f"Zoo table ({d.zoo_source}, {len(d.zoo)} models)", table_html(d.zoo, max_rows), len(d.zoo)))
    parts.append("</section>")
    return "".join(parts)


def render(d: ReportData, max_rows: int = 200) -> str:
    """The report page for collected data: a pure function (same data, same page)."""
    from ..plots.colors import colors_for

    colors = colors_for(_entities(d))
    families = _families(d)
    body = "".join(_family_html(f, members, d, colors, max_rows) for f, members in families)
    body = body or '<section id="empty"><h2>No results</h2><p>This folder has no shards or figures yet.</p></section>'
    if not families:
        body += ('<section id="correlation"><h2>Criticality and accuracy</h2><p class="note">Not available here (no '
                 "criticality table).</p></section>")
    compare = _compare_html(d, colors) if families else ""
    nav = [(_anchor(f), title(f)) for f, _ in families] + ([("compare", "Two models side by side")] if compare else [])
    nav.append(("runs", "Sweeps and failures"))
    vers = ", ".join(f"{k} {v}" for k, v in d.versions.items())
    needs_plotly = 'class="plot"' in body or compare
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>layerlab report: {_esc(d.out.name)}</title><link rel=\"icon\" href=\"data:,\">"
        f"<style>{CSS}</style>" + (f"<script>{plotly_js()}</script>" if needs_plotly else "") + "</head><body>"
        f"<header><h1>layerlab report</h1><p><code style=\"background:none;color:#fff\">{_esc(d.out.resolve())}</code></p>"
        f"<p>generated {_esc(d.generated)} with {_esc(vers)}</p></header>"
        "<nav>" + "".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in nav) + "</nav><main>"
        + body + compare + _runs_html(d, max_rows)
        + '</main><div id="lightbox"><p></p><img alt=""></div>'
        + f"<script>{JS}</script></body></html>"
    )


def write_report(out: str | Path, path: str | Path | None = None, *, max_rows: int = 200) -> Path:
    """Collect ``out`` and write its report (default ``OUT/report.html``) atomically; returns the path."""
    if max_rows < 1:
        raise LayerlabError(f"max_rows must be >= 1, got {max_rows}")
    out = Path(out)
    page = render(collect(out), max_rows)
    target = atomic_write_text(Path(path) if path else out / "report.html", page)
    umask = os.umask(0)
    os.umask(umask)
    target.chmod(0o666 & ~umask)  # readable like any file the user writes (the temp file was private)
    return target
