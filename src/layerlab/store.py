"""The results store: one Parquet shard per finished job, written atomically, queryable as one table.

Layout::

    OUT/shards/<analysis>/<key>.parquet     one tidy table per job; key = hash(model spec, analysis, config)
    OUT/jobs/<kind>/<key>.json               a sweep job of an analysis that writes its own shards: finished

A shard appears only complete (temp file in the same folder, fsync, ``os.replace``), so a crash or a kill
never leaves a torn shard, and re-running skips every key whose shard exists (and says so first, in one line:
:func:`resumed`). Two writers of the same key write identical content, and the rename makes one of them win whole.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import LayerlabError

#: where layerlab reports what is neither a result nor a warning (what a re-run skips); the CLI prints its INFO lines
LOG = logging.getLogger("layerlab")


def resumed(done: int, total: int, where: str | Path | None = None, *, unit: str = "jobs",
            state: str = "already done", doing: str = "running") -> str | None:
    """Say once, before the work, what a re-run skips: ``90 of 132 jobs already done (in OUT); running 42``.

    Logged at INFO on the ``layerlab`` logger (:data:`LOG`): the CLI prints it, a Python caller sees it with
    ``logging.basicConfig(level="INFO")``. Returns the line, or None (and logs nothing) when nothing was done before.

    >>> resumed(90, 132, "out")
    '90 of 132 jobs already done (in out); running 42'
    """
    if done <= 0:
        return None
    place = f" (in {where})" if where is not None else ""
    line = f"{done} of {total} {unit} {state}{place}; {doing} {total - done}"
    LOG.info(line)
    return line


def atomic_write(path: Path, write: Callable[[Any], None]) -> Path:
    """Write ``path`` via ``write(fileobj)`` to a temp file beside it, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are ordinary files
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(Path(path), lambda f: f.write(text.encode()))


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


STORE_VERSION = 2  # part of every job key: bumping it retires every shard written before
# 2: random draws from purpose streams (layerlab.seeds); shards drawn with seed + t are never reused


def job_key(model: str, analysis: str, config: dict[str, Any]) -> str:
    """A stable 16-hex key for (model spec, analysis, config, store version): same inputs, same shard."""
    blob = json.dumps(_canonical({"model": model, "analysis": analysis, "config": config, "store": STORE_VERSION}),
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Store:
    """Parquet shards under ``root/shards/<analysis>/``; see the module docstring."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def shard(self, analysis: str, key: str) -> Path:
        return self.root / "shards" / analysis / f"{key}.parquet"

    def has(self, analysis: str, key: str) -> bool:
        return self.shard(analysis, key).exists()

    def write(self, analysis: str, key: str, frame: pd.DataFrame, meta: dict[str, Any] | None = None) -> Path:
        """Persist one job's table atomically, with its config/versions in the Parquet metadata."""
        table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
        info = {"analysis": analysis, "key": key, **(meta or {}), "versions": versions()}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"layerlab": json.dumps(_canonical(info), default=str).encode()})
        return atomic_write(self.shard(analysis, key), lambda f: pq.write_table(table, f))

    def job_marker(self, kind: str, key: str) -> Path:
        return self.root / "jobs" / kind / f"{key}.json"

    def mark_done(self, kind: str, key: str, meta: dict[str, Any] | None = None) -> Path:
        """Record that job ``key`` of ``kind`` finished: its tables are in the shards it wrote itself (an analysis
        writes per-unit shards, the same whether called from the API or a sweep, so rows are never duplicated)."""
        info = {"kind": kind, "key": key, **(meta or {}), "versions": versions()}
        return atomic_write_text(self.job_marker(kind, key), json.dumps(_canonical(info), default=str, indent=1))

    def done(self, kind: str, key: str) -> bool:
        """Whether job ``key`` of ``kind`` finished: its marker, or (a kind storing one shard per job) its shard."""
        return self.job_marker(kind, key).exists() or self.has(kind, key)

    def read_shard(self, analysis: str, key: str) -> pd.DataFrame:
        return pq.read_table(self.shard(analysis, key)).to_pandas()

    def shard_meta(self, path: Path) -> dict[str, Any]:
        raw = (pq.read_schema(path).metadata or {}).get(b"layerlab")
        return json.loads(raw) if raw else {}

    def analyses(self) -> list[str]:
        base = self.root / "shards"
        return sorted(d.name for d in base.iterdir() if d.is_dir() and any(d.glob("*.parquet"))) if base.is_dir() else []

    def paths(self, analysis: str) -> list[Path]:
        return sorted((self.root / "shards" / analysis).glob("*.parquet"))

    def read(self, analysis: str) -> pd.DataFrame:
        """All shards of one analysis as one table (empty frame when there are none)."""
        return read_shards(self.paths(analysis))

    @staticmethod
    def sql_name(analysis: str) -> str:
        """The SQL view name of an analysis in :meth:`query` (dashes become underscores: ``dynamics_cka``)."""
        return analysis.replace("-", "_")

    def derived(self) -> dict[str, Path]:
        """Tables an analysis derived from its shards and wrote beside them (``OUT/<name>.csv``: summaries with
        intervals, differences, settling epochs, critical sets), by SQL view name; a shard table's view wins."""
        own = {self.sql_name(a) for a in self.analyses()}
        found = sorted(self.root.glob("*.csv")) if self.root.is_dir() else []
        return {self.sql_name(p.stem): p for p in found if self.sql_name(p.stem) not in own}

    def query(self, sql: str) -> pd.DataFrame:
        """Run DuckDB SQL where each analysis is a view named after it (dashes become underscores), and each
        derived table (:meth:`derived`) a view named after its file."""
        import duckdb

        views = {a: self.sql_name(a) for a in self.analyses()}
        files = self.derived()
        con = duckdb.connect()
        try:
            for a, view in views.items():
                glob = str(self.root / "shards" / a / "*.parquet").replace("'", "''")
                con.execute(f"CREATE VIEW \"{view}\" AS SELECT * FROM read_parquet('{glob}', union_by_name=true)")
            for view, path in files.items():
                where = str(path).replace("'", "''")
                con.execute(f"CREATE VIEW \"{view}\" AS SELECT * FROM read_csv_auto('{where}')")
            views.update({str(p): v for v, p in files.items()})
            return con.execute(sql).df()
        except duckdb.Error as e:
            raise LayerlabError(
                f"query failed: {' '.join(str(e).split())}; tables here: {', '.join(views.values()) or 'none'}"
            ) from None
        finally:
            con.close()


def read_shards(paths: list[Path]) -> pd.DataFrame:
    """Parquet shards as one table, read as one Arrow dataset (thousands of shards in a second, not one by one);
    shards written before a column existed get it as missing values (their schemas are unified)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    if not paths:
        return pd.DataFrame()
    schema = pa.unify_schemas([pq.read_schema(p) for p in paths], promote_options="permissive")
    return ds.dataset([str(p) for p in paths], schema=schema, format="parquet").to_table().to_pandas()


def versions() -> dict[str, str]:
    """Versions of the packages that shape results, for provenance in shards and reports."""
    import platform

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torchvision", "timm", "layerlab"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # optional
            pass
    return out
