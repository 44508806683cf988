"""``python -m benchmarks [--cases T1,T2] [--quick]``: run the suite, write the results.

Full runs write to ``benchmarks/results/``, quick runs to ``benchmarks/results/quick/`` so a
smoke test never overwrites the recorded numbers. Each case leaves ``<case>.json``; the page
``performance.md`` and the charts are rebuilt from every JSON in the folder, so running one case
updates its section and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import CASES, RESULTS_DIR, write_atomic
from benchmarks.report import build
from benchmarks.suite import Plan, log, run_case


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {','.join(CASES)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="few seeds, steps and seconds per case (a 2-3 minute smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: benchmarks/results[/quick])")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild performance.md and charts from the JSON already there")
    args = parser.parse_args(argv)
    args.cases = [c.strip().upper() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.out is None:
        args.out = RESULTS_DIR / "quick" if args.quick else RESULTS_DIR
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.report_only:
        plan = Plan.make(args.quick)
        start = time.perf_counter()
        for name in args.cases:
            log(f"{name} {CASES[name].title} ({'quick' if args.quick else 'full'})")
            result = run_case(name, plan, args.out / "logs")
            # One line per case: the curves would make an indented file thousands of lines long.
            write_atomic(args.out / f"{name}.json", json.dumps(result) + "\n")
            log(f"{name} done in {result['seconds']:.0f} s")
        log(f"suite done in {time.perf_counter() - start:.0f} s")
    print(build(args.out))


if __name__ == "__main__":
    main()
