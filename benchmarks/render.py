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


def render(text: str, folder: Path) -> str:
    def block(m: re.Match) -> str:
        path = folder / f"{m['name']}.json"
        body = (render_record(json.loads(path.read_text())) if path.exists()
                else f"*No record `{path.name}` yet: run the benchmark to measure it.*\n")
        return f"{m.group(1)}{body}{m.group(4)}"

    return BLOCK.sub(block, text)


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
