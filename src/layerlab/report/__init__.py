"""`layerlab report DIR`: one self-contained HTML page of everything in an output folder.

Per analysis (every ``OUT/shards/<analysis>/`` and every ``OUT/figures/<analysis>/``): the figures (PNG embedded
as base64, an SVG without a PNG twin embedded as a data URI), a per-model summary and the tidy table (click a
header to sort; long tables are cut and folded), and the provenance of every shard (job key, model, config,
package versions; :meth:`layerlab.store.Store.shard_meta`). Then the criticality/accuracy correlation (Spearman
rho between each model's mean criticality and its test accuracy, from ``OUT/zoo/zoo.csv`` or, without it, the last
epoch of the ``training`` table), failed sweep jobs (``OUT/failed/``) and the sweeps that ran (``OUT/sweeps/``).

The page needs no network and no external file: CSS and the few lines of sorting JavaScript are inline.
Collecting (:func:`collect`) and rendering (:func:`render`) are separate: the first reads the folder into plain
frames, the second is a pure function of them.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyarrow.parquet as pq

from .errors import LayerlabError
from .registry import Registry
from .store import Store, atomic_write_text, read_shards, versions

__all__ = ["SUMMARIES", "ReportData", "collect", "criticality_accuracy", "render", "summary", "write_report"]

from .criticality.tables import criticality_accuracy  # noqa: E402  (re-exported: the report's correlation)

FIGURE_SUFFIXES = (".png", ".svg")

# ======================================================================================= per-analysis summaries

SUMMARIES: Registry[Callable[[pd.DataFrame], pd.DataFrame]] = Registry("report summary")


def summary(name: str):
    """Register ``fn(table) -> DataFrame``, the short table the report shows above analysis ``name``'s full one."""
    return SUMMARIES.register(name)


def _summary_of(table: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The summary shown above ``table``: registered here, else declared by the analysis whose main table it is
    (:mod:`layerlab.analysis`), else :func:`generic_summary`."""
    if table in SUMMARIES:
        return SUMMARIES.get(table)
    from .analysis import analyses, resolve

    declared = {a.tables[0]: a.summary for a in analyses() if a.summary is not None}
    return resolve(declared[table]) if table in declared else generic_summary


def generic_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per model: the row count and the mean of every numeric column (the whole table when it has no models)."""
    numeric = [c for c in table.columns
               if pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])]
    if "model" not in table.columns:
        return table[numeric].mean().to_frame("mean").T if numeric else pd.DataFrame()
    g = table.groupby("model", sort=False)
    out = g.size().rename("rows").to_frame()
    if numeric:
        out = out.join(g[numeric].mean().add_prefix("mean "))
    return out.reset_index()


@summary("criticality")
def _criticality_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per model (and mode, analysed epoch, shift): mean layer criticality over layers, its range, and trials per
    layer."""
    rows = table
    keys = ["model"] + [c for c in ("mode", "epoch", "shift") if c in table.columns]
    per_layer = (rows.groupby(keys + ["layer"], sort=False, dropna=False)["criticality"]
                 .agg(["mean", "count"]).reset_index())
    g = per_layer.groupby(keys, sort=False, dropna=False)
    out = g["mean"].agg(criticality="mean", min="min", max="max").join(g["layer"].nunique().rename("layers"))
    out = out.join(g["count"].max().rename("trials"))
    if "base_accuracy" in table.columns:
        out = out.join(table.groupby(keys, sort=False, dropna=False)["base_accuracy"].mean())
    return out.reset_index()


@summary("training")
def _training_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per model: the last epoch's train and test accuracy, and the training time."""
    if "epoch" not in table.columns or "model" not in table.columns:
        return generic_summary(table)
    last = table.sort_values("epoch").groupby("model", sort=False).tail(1)
    cols = [c for c in ("model", "recipe", "category", "epoch", "train_acc", "test_acc") if c in last.columns]
    out = last[cols].copy()
    if "seconds" in table.columns:
        out = out.merge(table.groupby("model")["seconds"].sum().reset_index(), on="model")
    return out.sort_values("model").reset_index(drop=True)


# ========================================================================================= the correlation


# ================================================================================================ collecting


@dataclass
class AnalysisData:
    name: str
    table: pd.DataFrame
    summary: pd.DataFrame
    shards: pd.DataFrame  # one row per shard: key, model, rows, written, config
    versions: pd.DataFrame  # package x version, with the number of shards made with it
    figures: list[Path]


@dataclass
class ReportData:
    out: Path
    analyses: list[AnalysisData]
    zoo: pd.DataFrame | None
    zoo_source: str
    per_model: pd.DataFrame | None
    correlations: pd.DataFrame | None
    correlation_figure: bytes | None
    failures: pd.DataFrame
    sweeps: list[dict[str, Any]]
    generated: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))
    versions: dict[str, str] = field(default_factory=dict)


def _shard_rows(store: Store, paths: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, version_sets = [], {}
    for p in paths:
        try:
            meta = store.shard_meta(p)
            n = pq.read_metadata(p).num_rows
        except Exception as e:  # a foreign file in the folder: show it, do not fail the page
            rows.append({"key": p.stem, "model": "", "rows": 0, "written": "", "config": f"unreadable: {e}"})
            continue
        config = meta.get("config", {})
        rows.append({"key": meta.get("key", p.stem), "model": meta.get("model", ""), "rows": n,
                     "written": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.stat().st_mtime)),
                     "config": json.dumps(config, sort_keys=True, default=str)})
        v = json.dumps(meta.get("versions", {}), sort_keys=True)
        version_sets[v] = version_sets.get(v, 0) + 1
    vrows = [{**json.loads(v), "shards": n} for v, n in version_sets.items()]
    return pd.DataFrame(rows, columns=["key", "model", "rows", "written", "config"]), pd.DataFrame(vrows)


def _read_table(paths: list[Path]) -> pd.DataFrame:
    try:
        return read_shards(paths)
    except Exception:  # an unreadable file among them (listed among the shards): read the others one by one
        pass
    frames = []
    for p in paths:
        try:
            frames.append(pq.read_table(p).to_pandas())
        except Exception:  # listed among the shards as unreadable
            continue
    frames = [f for f in frames if len(f.columns)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _figures(folder: Path, recursive: bool = True) -> list[Path]:
    """The figures under a folder (and its subfolders), one per name: the PNG when there is one, else the SVG."""
    if not folder.is_dir():
        return []
    by_stem: dict[Path, Path] = {}
    for p in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if p.suffix.lower() in FIGURE_SUFFIXES and p.is_file() and not p.name.startswith("."):
            stem = p.relative_to(folder).with_suffix("")
            if stem not in by_stem or p.suffix.lower() == ".png":
                by_stem[stem] = p
    return list(by_stem.values())


def _zoo_table(out: Path, store: Store) -> tuple[pd.DataFrame | None, str]:
    for p in (out / "zoo" / "zoo.csv", *sorted(out.glob("*/zoo.csv"))):
        if p.is_file():
            try:
                z = pd.read_csv(p)
            except (pd.errors.EmptyDataError, pd.errors.ParserError):
                continue
            if {"model", "accuracy"} <= set(z.columns):
                return z, str(p.relative_to(out))
    if "training" in store.analyses():
        t = store.read("training")
        if {"model", "epoch", "test_acc"} <= set(t.columns):
            last = t.sort_values("epoch").groupby("model").tail(1)
            cols = [c for c in ("model", "recipe", "category", "test_acc") if c in last.columns]
            return last[cols].rename(columns={"test_acc": "accuracy"}), "the training table (last epoch)"
    return None, ""


def _correlation_figure(per_model: pd.DataFrame, corr: pd.DataFrame) -> bytes | None:
    """The criticality/accuracy scatter (:func:`layerlab.plots.criticality.accuracy_scatter`) as PNG bytes."""
    if len(per_model) < 2:
        return None
    from .plots.criticality import accuracy_scatter

    buf = io.BytesIO()
    accuracy_scatter(per_model, corr.iloc[0], size=(5.0, 3.6)).savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def collect(out: str | Path) -> ReportData:
    """Read an output folder into the frames the page shows (nothing is computed but summaries and rho)."""
    out = Path(out)
    if not out.is_dir():
        raise LayerlabError(f"output folder {str(out)!r} does not exist; pass the --out of `layerlab demo` or `sweep`")
    store = Store(out)
    fig_root = out / "figures"
    figure_dirs = {d.name for d in fig_root.iterdir() if d.is_dir()} if fig_root.is_dir() else set()
    names = sorted(set(store.analyses()) | figure_dirs)
    analyses = []
    for name in names:
        paths = store.paths(name)
        table = _read_table(paths)
        shards, vers = _shard_rows(store, paths)
        summ = pd.DataFrame()
        if len(table):
            try:
                summ = _summary_of(name)(table)
            except Exception as e:  # a summary must never cost the page
                summ = pd.DataFrame([{"summary failed": f"{type(e).__name__}: {e}"}])
        analyses.append(AnalysisData(name, table, summ, shards, vers, _figures(fig_root / name)))
    loose = _figures(fig_root, recursive=False)
    if loose:
        empty = pd.DataFrame()
        analyses.append(AnalysisData("other figures", empty, empty, empty, empty, loose))
    zoo, zoo_source = _zoo_table(out, store)
    per_model = corr = fig = None
    crit = next((a.table for a in analyses if a.name == "criticality"), None)
    if zoo is not None and crit is not None and len(crit) and {"model", "layer", "criticality"} <= set(crit.columns):
        per_model, corr = criticality_accuracy(crit, zoo)
        fig = _correlation_figure(per_model, corr)
    from .sweep import failures

    sweeps = []
    for p in sorted((out / "sweeps").glob("*.json")):
        try:
            sweeps.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return ReportData(out, analyses, zoo, zoo_source, per_model, corr, fig, failures(out), sweeps, versions=versions())


# ================================================================================================= rendering

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1f3a5f;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:2px 0;opacity:.85}nav{padding:8px 28px;background:#e8edf3;position:sticky;top:0;z-index:2}
nav a{margin-right:14px;color:#1f3a5f;text-decoration:none;font-weight:600}nav a:hover{text-decoration:underline}
main{padding:8px 28px 40px}section{background:#fff;border:1px solid #dde3ea;border-radius:8px;margin:18px 0;
padding:14px 20px}h2{margin:4px 0 10px;font-size:19px;color:#1f3a5f}h3{font-size:15px;margin:16px 0 6px}
.figs{display:flex;flex-wrap:wrap;gap:14px}figure{margin:0;border:1px solid #e3e7ec;border-radius:6px;padding:6px;
background:#fff}figure img{max-width:520px;width:100%;height:auto;display:block}figcaption{font-size:12px;color:#556}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0}th,td{border:1px solid #dfe4ea;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f0f3f7;cursor:pointer;user-select:none;white-space:nowrap}
th[data-order=asc]::after{content:" \\25B2"}th[data-order=desc]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}tbody tr:nth-child(even){background:#fafbfc}
details{margin:6px 0}summary{cursor:pointer;color:#1f3a5f;font-weight:600}.note{color:#667;font-size:12px}
.scroll{overflow-x:auto;max-width:100%}code{background:#eef1f5;padding:1px 4px;border-radius:3px}
.bad{color:#a11}.ok{color:#176d2c}td.cfg{font-family:ui-monospace,monospace;font-size:11px;max-width:60em;
word-break:break-all}
"""

_JS = """
document.querySelectorAll('table.sortable th').forEach(function (th) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0], col = th.cellIndex;
    var asc = th.dataset.order !== 'asc';
    table.querySelectorAll('th').forEach(function (h) { delete h.dataset.order; });
    th.dataset.order = asc ? 'asc' : 'desc';
    var value = function (row) { var c = row.cells[col]; return c ? (c.dataset.v !== undefined ? c.dataset.v : c.textContent) : ''; };
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = value(a), y = value(b), nx = Number(x), ny = Number(y);
      var cmp = (x !== '' && y !== '' && !isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? cmp : -cmp;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


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
    """A sortable HTML table of ``df`` (first ``max_rows`` rows, with a note when cut)."""
    if df is None or df.empty:
        return '<p class="note">(empty)</p>'
    shown = df.head(max_rows)
    head = "".join(f"<th>{_esc(c)}</th>" for c in shown.columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in shown.itertuples(index=False, name=None))
    note = f'<p class="note">showing the first {max_rows} of {len(df)} rows</p>' if len(df) > max_rows else ""
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{note}'


def _folded(title: str, inner: str, rows: int, open_below: int = 15) -> str:
    opened = " open" if rows <= open_below else ""
    return f"<details{opened}><summary>{_esc(title)}</summary>{inner}</details>"


def _img(data: bytes, mime: str, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:{mime};base64,{base64.b64encode(data).decode()}">'


def _figure_html(path: Path, folder: Path) -> str:
    mime = "image/png" if path.suffix.lower() == ".png" else "image/svg+xml"
    name = path.relative_to(folder) if path.is_relative_to(folder) else path.name
    return f"<figure>{_img(path.read_bytes(), mime, path.stem)}<figcaption>{_esc(name)}</figcaption></figure>"


def _anchor(name: str) -> str:
    return "a-" + "".join(ch if ch.isalnum() else "-" for ch in name)


def _analysis_html(a: AnalysisData, out: Path, max_rows: int) -> str:
    parts = [f'<section id="{_anchor(a.name)}" data-analysis="{_esc(a.name)}"><h2>{_esc(a.name)}</h2>']
    if a.figures:
        folder = out / "figures" / a.name if a.name != "other figures" else out / "figures"
        parts.append('<div class="figs">' + "".join(_figure_html(p, folder) for p in a.figures) + "</div>")
    if len(a.table):
        parts.append(f'<p class="note">{_n(len(a.table), "row")} from {_n(len(a.shards), "shard")} in '
                     f"<code>{_esc(Path('shards') / a.name)}</code>; query: <code>layerlab results {_esc(out)} -a "
                     f"{_esc(a.name)}</code></p>")
        parts.append("<h3>Summary</h3>" + table_html(a.summary, max_rows))
        parts.append(_folded(f"Table ({_n(len(a.table), 'row')})", table_html(a.table, max_rows), len(a.table)))
    for name, path in _derived(out, a.name).items():
        frame = pd.read_csv(path)
        parts.append(_folded(f"{name} ({_n(len(frame), 'row')}; {path.name})", table_html(frame, max_rows), len(frame), 0))
    if len(a.shards):
        parts.append(_folded(f"Configs ({_n(len(a.shards), 'shard')})", table_html(a.shards, max_rows), len(a.shards), 5))
        parts.append(_folded("Versions", table_html(a.versions, max_rows), 1, 5))
    parts.append("</section>")
    return "".join(parts)


def _derived(out: Path, analysis: str) -> dict[str, Path]:
    """The tables derived from an analysis' shards beside them (``OUT/<analysis>_*.csv``: summaries with
    intervals, differences, settling, critical sets), by name."""
    prefix = Store.sql_name(analysis) + "_"
    return {v: p for v, p in Store(out).derived().items() if v.startswith(prefix) and not v.endswith("_images")}


def _correlation_html(d: ReportData, max_rows: int) -> str:
    parts = ['<section id="correlation"><h2>Criticality and accuracy</h2>']
    if d.correlations is None:
        has_crit = any(a.name == "criticality" for a in d.analyses)
        why = "no zoo table with accuracies" if has_crit else "no criticality table"
        parts.append(f'<p class="note">Not available here ({why}). It needs criticality results and '
                     "<code>zoo/zoo.csv</code> (written by <code>layerlab zoo train</code>, <code>sweep</code>, <code>demo</code>).</p>")
    else:
        parts.append(f'<p class="note">Spearman rho between each model&#39;s mean layer criticality (randomize mode, '
                     f"mean over layers of the trial mean) and its test accuracy from {_esc(d.zoo_source)}. "
                     "Gavrikov et al. 2024 report rho = -0.46 over 50 ImageNet ResNet-50s, -0.17 without the "
                     "adversarially trained ones.</p>")
        parts.append(table_html(d.correlations, max_rows))
        if d.correlation_figure:
            parts.append(f'<div class="figs"><figure>{_img(d.correlation_figure, "image/png", "criticality vs accuracy")}'
                         "<figcaption>mean criticality vs test accuracy</figcaption></figure></div>")
        parts.append(_folded(f"Per model ({len(d.per_model)})", table_html(d.per_model, max_rows), len(d.per_model)))
    parts.append("</section>")
    return "".join(parts)


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
        parts.append(f"<h3>sweep {_esc(s.get('name'))}</h3><p class=\"note\">{_esc(s.get('source', ''))}, last run "
                     f"{_esc(s.get('time', ''))}: " + ", ".join(f"{n} {_esc(k)}" for k, n in counts.items()) + "</p>")
        cfg = pd.DataFrame([{"field": k, "value": json.dumps(s.get(k), default=str)}
                            for k in ("zoo", "data", "device", "resources", "analyses") if s.get(k) is not None])
        parts.append(table_html(cfg, max_rows, cls="plain"))
        if len(jobs):
            cols = [c for c in ("kind", "model", "key", "status", "attempts", "seconds", "host", "error") if c in jobs]
            parts.append(_folded(f"Jobs ({len(jobs)})", table_html(jobs[cols], max_rows), len(jobs), 0))
    if d.zoo is not None:
        parts.append(_folded(f"Zoo table ({_esc(d.zoo_source)}, {len(d.zoo)} models)", table_html(d.zoo, max_rows), len(d.zoo)))
    parts.append("</section>")
    return "".join(parts)


def render(d: ReportData, max_rows: int = 200) -> str:
    """The report page for collected data: a pure function (same data, same page)."""
    nav = [(_anchor(a.name), a.name) for a in d.analyses]
    nav += [("correlation", "criticality vs accuracy"), ("runs", "sweeps & failures")]
    body = "".join(_analysis_html(a, d.out, max_rows) for a in d.analyses)
    body = body or '<section id="empty"><h2>No results</h2><p>This folder has no shards or figures yet.</p></section>'
    vers = ", ".join(f"{k} {v}" for k, v in d.versions.items())
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>layerlab report: {_esc(d.out.name)}</title><link rel=\"icon\" href=\"data:,\">"
        f"<style>{_CSS}</style></head><body>"
        f"<header><h1>layerlab report</h1><p><code style=\"background:none;color:#fff\">{_esc(d.out.resolve())}</code></p>"
        f"<p>generated {_esc(d.generated)} with {_esc(vers)}</p></header>"
        "<nav>" + "".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in nav) + "</nav><main>"
        + body + _correlation_html(d, max_rows) + _runs_html(d, max_rows)
        + f"</main><script>{_JS}</script></body></html>"
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


# ==================================================================================================== demo
