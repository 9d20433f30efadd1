"""Helpers shared by the benchmark scripts in ``scripts/``: what machine ran them, and one
``BENCHMARKS.md`` that several scripts write into, each its own marked section; their common
options, timed training runs (through :func:`medsec.api.run`) and table cells."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsec.utils.config import REPO_ROOT

TITLE = "# medsec benchmarks"
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"
THROUGHPUT = "medsec.utils.callbacks.TrainThroughput"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_summary() -> str:
    """One line: CPU model, cores, RAM, torch version and intra-op threads (plus the GPU, if any)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = _ram_gib()
    parts = [
        f"CPU {_cpu_model()}",
        f"{cores} cores",
        f"{ram:.0f} GiB RAM" if ram is not None else "RAM unknown",
        f"Python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"{torch.get_num_threads()} torch threads",
    ]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    else:
        parts.append("no GPU")
    return ", ".join(parts)


def _markers(name: str) -> tuple[str, str]:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"section name must be letters, digits, '_', '-' or '.', got {name!r}")
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def update_section(path: str | Path, name: str, markdown: str) -> Path:
    """Put ``markdown`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``.

    The section replaces an earlier one of the same name in place, is appended when absent, and
    the file is created with a ``# medsec benchmarks`` title when missing. Other sections and any
    text outside the markers are kept as they are. Written atomically.
    """
    path = Path(path)
    start, end = _markers(name)
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else f"{TITLE}\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def publish(output: str | Path, name: str, markdown: str) -> Path:
    """Write ``markdown`` as section ``name`` of ``output`` (:func:`update_section`) and print it."""
    path = update_section(output, name, markdown)
    print(markdown)
    return path


def benchmark_parser(doc: str, section: str, quick: str | None = None) -> argparse.ArgumentParser:
    """The options every benchmark script has: ``--output`` (default ``BENCHMARKS.md`` at the
    repository root) and, given its help text, ``--quick``; the script's docstring is the help."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if quick is not None:
        parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--output", type=Path, default=BENCHMARKS_MD,
                        help=f"markdown file whose '{section}' section is (re)written")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
               quick: dict[str, Any] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``; with ``--quick``, the smoke run's ``quick`` values replace those
    of the options they name."""
    args = parser.parse_args(argv)
    if getattr(args, "quick", False):
        for name, value in (quick or {}).items():
            setattr(args, name, value)
    return args


def produced_by(script: str, started: dt.datetime) -> str:
    """``Produced by `python scripts/<script> <its arguments>` on <date> <time> UTC``."""
    line = " ".join(shlex.quote(a) for a in [f"scripts/{script}", *sys.argv[1:]])
    return f"Produced by `python {line}` on {started:%Y-%m-%d %H:%M} UTC"


def command(verb: str, overrides: Sequence[str]) -> str:
    """The command line that reproduces a run: ``medsec <verb> <overrides, shell-quoted>``."""
    return f"medsec {verb} " + " ".join(shlex.quote(o) for o in overrides)


def fmt(value: float | None, digits: int = 3) -> str:
    """A table cell: ``value`` to ``digits`` decimals, ``-`` for none."""
    return "-" if value is None else f"{value:.{digits}f}"


def mark(ok: bool) -> str:
    """A goal's verdict: ``met`` or a bold ``**MISSED**``."""
    return "met" if ok else "**MISSED**"


def timed_train(overrides: Sequence[str],
                out_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, float]], float]:
    """``medsec train OVERRIDES`` in this process (:func:`medsec.api.run`) into ``out_dir``, with the
    throughput callback on (whatever the ``callbacks`` group); returns (metrics, per-epoch wall and CPU
    seconds and images of training, wall seconds of the whole run)."""
    from medsec import api

    path = Path(out_dir) / "throughput.json"
    start = time.perf_counter()
    metrics = api.run("train", [*overrides, f"++callbacks.throughput._target_={THROUGHPUT}",
                                f"++callbacks.throughput.path={path}"], out_dir)
    wall = time.perf_counter() - start
    epochs = json.loads(path.read_text())["epochs"] if path.exists() else []
    return metrics, epochs, wall


def data_config(overrides: Sequence[str]) -> dict[str, Any]:
    """The ``data`` config that ``medsec train OVERRIDES`` would use, resolved (for a benchmark that
    reads a recipe's data without training on it)."""
    from omegaconf import OmegaConf

    from medsec.utils.config import compose_config

    with tempfile.TemporaryDirectory() as tmp:
        return OmegaConf.to_container(compose_config("train", overrides, output_dir=tmp).data, resolve=True)
