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

        Lists the analyses' tables (their shards) and the tables derived from them beside (OUT/*.csv: summaries
        with 95% intervals, differences to a baseline, settling epochs, critical sets under shift); each is a
        DuckDB view of that name.

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
            import pandas as pd

            derived = store.derived()
            if analysis in names:
                df = store.read(analysis)
            elif store.sql_name(analysis) in derived:
                df = pd.read_csv(derived[store.sql_name(analysis)])
            else:
                found = names + list(derived)
                raise LayerlabError(f"no {analysis!r} results in {out}; found: {', '.join(found) or 'none'}")
        else:
            import pandas as pd

            df = pd.DataFrame([{"analysis": a, "sql_view": store.sql_name(a), "source": f"shards/{a} "
                                f"({len(store.paths(a))} shards)", "rows": len(store.read(a))} for a in names]
                              + [{"analysis": p.stem, "sql_view": v, "source": p.name, "rows": len(pd.read_csv(p))}
                                 for v, p in store.derived().items()])
            if df.empty:
                raise LayerlabError(f"{out} holds no result shards yet (looked in {out / 'shards'})")
        print_frame(df, str(out))
        if csv:
            df.to_csv(csv, index=False)
