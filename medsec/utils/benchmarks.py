"""Helpers shared by the benchmark scripts in ``scripts/``: what machine ran them, and one
``BENCHMARKS.md`` that several scripts write into, each its own marked section."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

TITLE = "# medsec benchmarks"


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
