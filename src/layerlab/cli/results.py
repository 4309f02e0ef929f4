"""`layerlab results DIR`: print or query the tidy tables of an output folder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import check_out, print_frame


def register(app: typer.Typer) -> None:
    @app.command("results")
    def results_cmd(
        out: Path = typer.Argument(..., help="An output folder written by layerlab (holds shards/)."),
        analysis: Optional[str] = typer.Option(None, "--analysis", "-a", help="Show this analysis' table (default: list them)."),
        sql: Optional[str] = typer.Option(None, "--sql", help="DuckDB SQL; each analysis is a view, e.g. \"SELECT * FROM criticality\"."),
        csv: Optional[Path] = typer.Option(None, "--csv", help="Also write the shown table to this CSV file."),
    ) -> None:
        """Print the results table of an output folder, or query it with DuckDB SQL.

        Example: layerlab results demo-out --sql "SELECT model, avg(criticality) c FROM criticality GROUP BY model ORDER BY c"
        """
        from ..errors import LayerlabError
        from ..store import Store

        if not out.is_dir():
            raise LayerlabError(f"output folder {str(out)!r} does not exist; pass the --out of an earlier run")
        if csv is not None:
            check_out(csv, kind="file", option="--csv")
        store = Store(out)
        names = store.analyses()
        if sql:
            df = store.query(sql)
        elif analysis:
            if analysis not in names:
                raise LayerlabError(f"no {analysis!r} results in {out}; found: {', '.join(names) or 'none'}")
            df = store.read(analysis)
        else:
            import pandas as pd

            df = pd.DataFrame([{"analysis": a, "sql_view": store.sql_name(a), "shards": len(store.paths(a)),
                                "rows": len(store.read(a))} for a in names])
            if df.empty:
                raise LayerlabError(f"{out} holds no result shards yet (looked in {out / 'shards'})")
        print_frame(df, str(out))
        if csv:
            df.to_csv(csv, index=False)
