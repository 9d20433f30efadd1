#!/usr/bin/env python
"""Time `medsec <verb> --help` for every verb and write the ``startup`` section of BENCHMARKS.md.

Each verb is timed in a fresh interpreter two ways: as `python -m medsec <verb> --help` runs now
(the verb's module, and torch with it, imported only when a job runs) and eagerly, importing the
verb's module first as medsec did before issue 18. Wall time is the best of the repetitions (the
least disturbed by other work on the machine); CPU time (user + system) is the median. Goal: every
verb under 3 s.

    python scripts/benchmark_startup.py                      # about 6 minutes on 2 idle cores
    python scripts/benchmark_startup.py --quick --output /tmp/B.md
"""
from __future__ import annotations

import datetime as dt
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from medsec.cli import VERBS
from medsec.utils.benchmarks import (
    benchmark_parser,
    fmt,
    machine_summary,
    mark,
    parse_args,
    produced_by,
    publish,
)

SECTION = "startup"
GOAL_S = 3.0
HEAVY = ("torch", "lightning", "monai", "torchvision", "flwr", "tenseal", "opacus", "matplotlib")
PROBE = """
import sys
from medsec.cli import main
try:
    main([{verb!r}, "--help"])
finally:
    print("HEAVY", *[m for m in {heavy!r} if m in sys.modules], file=sys.stderr)
"""


def help_seconds(verb: str, eager: bool) -> tuple[float, float, list[str]]:
    """Wall and CPU seconds of one `medsec <verb> --help` in a new interpreter (``eager``: the verb's
    module imported first), and the heavy packages it had imported by the end."""
    code = (f"import {VERBS[verb][0]}\n" if eager else "") + PROBE.format(verb=verb, heavy=HEAVY)
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"medsec {verb} --help failed:\n{done.stderr[-2000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    heavy = next(line for line in done.stderr.splitlines() if line.startswith("HEAVY")).split()[1:]
    return seconds, cpu, heavy


def measure(reps: int) -> list[dict[str, Any]]:
    """Per verb, the best wall and median CPU seconds of ``reps`` eager and lazy runs, interleaved."""
    rows = []
    for verb in VERBS:
        runs: dict[str, list[tuple[float, float, list[str]]]] = {"eager": [], "lazy": []}
        for _ in range(reps):
            for way, results in runs.items():
                results.append(help_seconds(verb, eager=way == "eager"))
        row: dict[str, Any] = {"verb": verb, "heavy": runs["lazy"][-1][2]}
        for way, results in runs.items():
            row[f"{way}_s"] = min(wall for wall, _, _ in results)
            row[f"{way}_cpu_s"] = statistics.median(cpu for _, cpu, _ in results)
        print(f"[startup] {verb}: {row['eager_s']:.2f} s eager -> {row['lazy_s']:.2f} s lazy "
              f"(CPU {row['eager_cpu_s']:.2f} -> {row['lazy_cpu_s']:.2f} s)", flush=True)
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]], reps: int, started: dt.datetime, load: tuple[float, float]) -> str:
    lines = [
        "## Start-up: `medsec <verb> --help`", "",
        f"{produced_by('benchmark_startup.py', started)}.",
        (f"Machine: {machine_summary()}. Load average (1 min) {load[0]:.1f} when it started and {load[1]:.1f} "
         "when it ended (the machine is shared with other work)."), "",
        (f"Seconds in a fresh interpreter over {reps} interleaved repetitions: wall time the best of them (the "
         "least disturbed by other work on the machine), CPU time (user + system) their median. *Before*: the "
         "verb's module imported first, as `medsec` did before issue 18 (torch, Lightning, MONAI and the verb's "
         "own stacks loaded to print help). *Now*: the module is imported only when a job runs. "
         f"Goal: under {GOAL_S:g} s wall time for every verb, with none of the heavy packages imported. A verb "
         "whose module imports its stacks inside its functions (`predict`, new with issue 18) costs the same "
         "both ways."), "",
        "| verb | before: wall (s) | before: CPU (s) | now: wall (s) | now: CPU (s) | heavy packages imported now | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| `{row['verb']}` | {fmt(row['eager_s'], 2)} | {fmt(row['eager_cpu_s'], 2)} | "
                     f"{fmt(row['lazy_s'], 2)} | {fmt(row['lazy_cpu_s'], 2)} | {', '.join(row['heavy']) or 'none'} | "
                     f"{mark(row['lazy_s'] < GOAL_S and not row['heavy'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, SECTION, quick="one run of each instead of --reps")
    parser.add_argument("--reps", type=int, default=3, help="runs of each verb and way, interleaved")
    args = parse_args(parser, argv, quick={"reps": 1})
    started, load = dt.datetime.now(dt.timezone.utc), os.getloadavg()[0]
    rows = measure(args.reps)
    publish(args.output, SECTION, render(rows, args.reps, started, (load, os.getloadavg()[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
