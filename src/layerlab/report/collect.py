"""Read an output folder into the plain frames the report shows (:func:`collect`); nothing is computed here but
the summaries and the criticality/accuracy correlation.

Every ``OUT/shards/<analysis>/`` becomes an :class:`AnalysisData` (its table, summary, shards and versions) and
every ``OUT/figures/<family>/`` adds its figures to the family's section; the zoo table (``OUT/zoo/zoo.csv`` or the
training table's last epoch) gives the accuracies for the correlation.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from ..criticality.tables import criticality_accuracy
from ..errors import LayerlabError
from ..store import Store, read_shards, versions
from .summaries import summary_of

__all__ = ["AnalysisData", "ReportData", "collect"]

FIGURE_SUFFIXES = (".png", ".svg")


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
                summ = summary_of(name)(table)
            except Exception as e:  # a summary must never cost the page
                summ = pd.DataFrame([{"summary failed": f"{type(e).__name__}: {e}"}])
        analyses.append(AnalysisData(name, table, summ, shards, vers, _figures(fig_root / name)))
    loose = _figures(fig_root, recursive=False)
    if loose:
        empty = pd.DataFrame()
        analyses.append(AnalysisData("other figures", empty, empty, empty, empty, loose))
    zoo, zoo_source = _zoo_table(out, store)
    per_model = corr = None
    crit = next((a.table for a in analyses if a.name == "criticality"), None)
    if zoo is not None and crit is not None and len(crit) and {"model", "layer", "criticality"} <= set(crit.columns):
        per_model, corr = criticality_accuracy(crit, zoo)
    from ..sweep import failures

    sweeps = []
    for p in sorted((out / "sweeps").glob("*.json")):
        try:
            sweeps.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return ReportData(out, analyses, zoo, zoo_source, per_model, corr, failures(out), sweeps, versions=versions())


