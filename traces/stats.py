"""A trace's statistics from the command line (:mod:`traces.workloads.statistics`).
"""
from __future__ import annotations

import time

from traces.common.cli import ArgumentParser, print_json, run_cli
from traces.formats.trace_read import read_trace
from traces.workloads.statistics import format_summary, summarize


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m traces.stats", description="Statistics of an expert-activation trace.")
    ap.add_argument("trace")
    ap.add_argument("--json", action="store_true", help="print one JSON object (default: a short table)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    trace = read_trace(a.trace)
    s = summarize(trace, progress=not a.json)
    s["seconds"] = time.perf_counter() - t0
    if a.json:
        print_json(s)
    else:
        print(format_summary(s))
    return 0


if __name__ == "__main__":
    run_cli(main)
