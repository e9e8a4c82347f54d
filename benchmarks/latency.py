"""Deployment latency (issue 23): the exported teacher against the exported compressed runs of a sweep.

The command line of :mod:`apjax.deploy.latency` (the sweep's ``deploy`` stage runs the same code):
every finished run of a sweep (the seed-0 runs unless ``--all-seeds``) exported, loaded and timed warm at
batch 1 (median and p95 ms per image over ``--calls`` calls) and at ``--batch-size`` (images/s of the
median of ``--batch-calls`` calls), the runs alternating call by call.

    python -m benchmarks.latency --sweep workdirs/science --out benchmarks/results/latency_cpu.json
    python -m benchmarks.latency --sweep workdirs/science --runs teacher,kd_x2_sswa,prune_s_sswa
    python -m benchmarks.latency --sweep path/to/one_run --tiny            # a run's own folder: one row

``--exports DIR`` keeps the exports in ``DIR/<run>`` and reuses the ones already there. The JSON records
the command, date, machine, jax version and load average; a Markdown table is written beside it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from apjax import cli
from apjax.deploy.latency import find_runs, latency_report, write_latency


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", required=True, help="a sweep's folder (or one run's own folder)")
    p.add_argument("--runs", default=None, help="comma-separated runs (default: every finished seed-0 run)")
    p.add_argument("--all-seeds", action="store_true", help="the @s<k> runs too")
    p.add_argument("--exports", default=None, help="keep exports here, reuse them (default: a temp dir)")
    p.add_argument("--out", default="benchmarks/results/latency_cpu.json", help="JSON (a .md beside it)")
    p.add_argument("--calls", type=int, default=30, help="timed calls at batch 1 per run and function")
    p.add_argument("--batch-calls", type=int, default=5, help="timed calls at the large batch")
    p.add_argument("--batch-size", type=int, default=64, help="the throughput batch")
    p.add_argument("--tiny", action="store_true", help="3 calls at batch 1, 2 at batch 8 (a test's size)")
    args = p.parse_args(argv)
    if args.tiny:
        args.calls, args.batch_calls, args.batch_size = 3, 2, 8
    if min(args.calls, args.batch_calls, args.batch_size) < 1:
        p.error("--calls, --batch-calls and --batch-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    names = [n.strip() for n in args.runs.split(",") if n.strip()] if args.runs else None
    command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *(argv or sys.argv[1:])])
    with cli.one_sentence_errors(args.out):  # a user's mistake ends in one sentence
        runs = find_runs(Path(args.sweep).expanduser(), names, args.all_seeds)
        report = latency_report(
            runs,
            Path(args.exports) if args.exports else None,
            args.calls,
            args.batch_calls,
            args.batch_size,
            command=command,
            log=lambda line: print(line, flush=True),
        )
    report["settings"] = {**report["settings"], **vars(args)}
    write_latency(report, Path(args.out))
    print(f"\nwritten to {args.out}\n\n{report['table_markdown']}")
    return report


if __name__ == "__main__":
    main()
