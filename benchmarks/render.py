"""Render the measured blocks of benchmarks/RESULTS.md from the JSON records in benchmarks/records/.

Every block between ``<!-- record: NAME -->`` and ``<!-- /record -->`` is replaced by a table rendered from
``records/NAME.json`` (benchmarks/record.py): where and when it was measured, each side's median time and range
over interleaved rounds, each paired ratio with its 95 % interval and whether its target is met (only when the
interval clears it), and the benchmark's other measures. Text outside the blocks is prose. A block whose record is
missing says so instead of keeping old numbers.

    python benchmarks/render.py            # rewrite RESULTS.md in place
    python benchmarks/render.py --check    # exit 1 when RESULTS.md differs from what the records render
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BLOCK = re.compile(r"(<!-- record: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /record -->)", re.S)


def _num(v: object) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def render_record(rec: dict) -> str:
    """One record as Markdown: provenance line, times, ratios, measures."""
    lines = [f"*Measured {rec.get('started', '?')} on {rec['device']}, commit `{rec['commit']}`"
             f"{' (+ uncommitted changes)' if rec.get('dirty') else ''}, torch {rec['torch']}"
             f"{', CUDA ' + rec['cuda'] if rec.get('cuda') else ''}, {rec['threads']} thread(s), load average "
             f"{rec['load_before']:.2f} before / {rec['load_after']:.2f} after, {rec['rounds']} interleaved round(s).*", ""]
    if rec.get("packages"):
        lines += ["Packages: " + ", ".join(f"{k} {v}" for k, v in rec["packages"].items()) + ".", ""]
    cond = rec.get("conditions", {})
    if cond:
        lines += ["Conditions: " + "; ".join(f"{k}: {_num(v)}" for k, v in cond.items()) + ".", ""]
    if rec.get("summary"):
        lines += ["| side | median | min | max | rounds (s) |", "|---|---|---|---|---|"]
        for side, s in rec["summary"].items():
            rounds = ", ".join(f"{t:.2f}" for t in rec["times"][side])
            lines.append(f"| {side} | {s['median']:.2f} s | {s['min']:.2f} s | {s['max']:.2f} s | {rounds} |")
        lines.append("")
    if rec.get("ratios"):
        lines += ["| ratio | median | 95 % interval | target | met |", "|---|---|---|---|---|"]
        for r in rec["ratios"]:
            target = "" if r.get("target") is None else f">= {r['target']:g}"
            met = "" if r.get("met") is None else ("**met**" if r["met"] else "not met")
            lines.append(f"| {r['label']} | {r['median']:.2f}x | [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | {target} | {met} |")
        lines.append("")
    if rec.get("measures"):
        lines += ["| measure | value |", "|---|---|"]
        lines += [f"| {k} | {_num(v)} |" for k, v in rec["measures"].items()]
        lines.append("")
    if rec.get("notes"):
        lines += [f"Note: {rec['notes']}.", ""]
    return "\n".join(lines)


#: ``<!-- records-table: PREFIX -->``: one row per record whose name starts with PREFIX (a comparison across records)
TABLE = re.compile(r"(<!-- records-table: (?P<prefix>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /records-table -->)", re.S)


def arch_table(records: list[dict]) -> str:
    """The per-architecture criticality records side by side: speed-up with its interval against the ceiling."""
    lines = ["| architecture | params | layers | stages | naive | fast | speed-up (median [95 % interval]) | ceiling "
             "| max abs diff | mean criticality | load before / after | measured |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        c, m, ratio = r["conditions"], r["measures"], r["ratios"][0]
        lines.append(
            f"| {r['benchmark'].removeprefix('criticality_arch_')}: {c['model']} | {c['parameters_M']:.2f} M | {c['layers']} "
            f"| {c['stages']} | {r['summary']['naive']['median']:.2f} s | {r['summary']['fast']['median']:.2f} s "
            f"| **{ratio['median']:.2f}x** [{ratio['ci'][0]:.2f}, {ratio['ci'][1]:.2f}] "
            f"| {m['ceiling speed-up (stage-cost model)']:.2f}x | {m['max_abs_difference_points']:g} "
            f"| {m['mean_criticality']:.1f} % | {r['load_before']:.2f} / {r['load_after']:.2f} "
            f"| {r['started'][:16]}, `{r['commit']}`, {r['rounds']} rounds |")
    return "\n".join(lines) + "\n"


def prune_table(records: list[dict]) -> str:
    """The block-removal record as two tables: accuracy per criterion (mean +- std over seeds) at each budget and
    stage, and criticality's paired difference to each other criterion with its verdict."""
    rec = next((r for r in records if r["benchmark"] == "prune"), None)
    if rec is None:
        return "*No `prune` record yet: run benchmarks/prune.py.*\n"
    summary, compare = rec["tables"]["summary"], rec["tables"]["compare"]
    criteria = list(dict.fromkeys(r["criterion"] for r in summary))
    cells: dict[tuple, dict[str, str]] = {}
    for r in summary:
        std = "" if r.get("accuracy_std") is None or r["accuracy_std"] != r["accuracy_std"] else f" +- {r['accuracy_std']:.3f}"
        cells.setdefault((r["stage"], r["budget"]), {})[r["criterion"]] = f"{r['accuracy']:.3f}{std}"
    lines = [f"*Measured {rec['started']} on {rec['device']}, commit `{rec['commit']}`"
             f"{' (+ uncommitted changes)' if rec.get('dirty') else ''}, torch {rec['torch']}; "
             f"{rec['summary']['prune']['median']:.0f} s; unpruned accuracy (zoo mean) "
             f"{rec['measures']['accuracy unpruned (zoo mean)']:.3f}.*", "",
             "Conditions: " + "; ".join(f"{k}: {_num(v)}" for k, v in rec["conditions"].items()) + ".", "",
             "| stage | budget | " + " | ".join(criteria) + " |", "|---|---|" + "---|" * len(criteria)]
    for (stage, budget), row in cells.items():
        lines.append(f"| {stage} | {budget} | " + " | ".join(row.get(c, "") for c in criteria) + " |")
    lines += ["", "| criticality minus | budget | stage | difference (mean +- std over seeds) | [min, max] | ahead | verdict |",
              "|---|---|---|---|---|---|---|"]
    for r in compare:
        lines.append(f"| {r['other']} | {r['budget']} | {r['stage']} | {r['difference']:+.3f} +- {r['std']:.3f} "
                     f"| [{r['min']:+.3f}, {r['max']:+.3f}] | {r['ahead']:.0%} | {r['verdict']} |")
    return "\n".join(lines + ["", f"Note: {rec['notes']}."]) + "\n"


TABLES = {"criticality_arch_": arch_table, "prune": prune_table}


def render(text: str, folder: Path) -> str:
    def block(m: re.Match) -> str:
        path = folder / f"{m['name']}.json"
        body = (render_record(json.loads(path.read_text())) if path.exists()
                else f"*No record `{path.name}` yet: run the benchmark to measure it.*\n")
        return f"{m.group(1)}{body}{m.group(4)}"

    def table(m: re.Match) -> str:
        records = [json.loads(p.read_text()) for p in sorted(folder.glob(f"{m['prefix']}*.json"))]
        body = TABLES[m["prefix"]](records) if records else f"*No `{m['prefix']}*` records yet.*\n"
        return f"{m.group(1)}{body}{m.group(4)}"

    return TABLE.sub(table, BLOCK.sub(block, text))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--records", type=Path, default=HERE / "records")
    ap.add_argument("--check", action="store_true", help="only check that RESULTS.md is up to date")
    args = ap.parse_args()
    old = args.results.read_text()
    new = render(old, args.records)
    if args.check:
        if new != old:
            print(f"{args.results} is out of date with {args.records}; run python benchmarks/render.py", file=sys.stderr)
            return 1
        return 0
    args.results.write_text(new)
    print(f"rendered {len(BLOCK.findall(new))} record block(s) into {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
