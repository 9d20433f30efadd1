#!/usr/bin/env python
"""Benchmark 3D segmentation on the MSD Hippocampus copy in ../shared/data (``experiment=hippocampus_unet3d``).

Runs ``medsec train experiment=hippocampus_unet3d`` in-process (the real pipeline: DecathlonSource ->
MedicalDataModule -> SegmentationTask -> Lightning Trainer -> best checkpoint by ``val/dice_mean`` tested
on whole volumes), then times sliding-window inference on the test volumes, and writes the
``segmentation`` section of BENCHMARKS.md. Split: fold 0 of 5 (seed 0) is the test set (20 %); 10 % of
the other cases is the validation set, the rest trains.

    python scripts/benchmark_segmentation.py                                   # about 30 CPU minutes
    python scripts/benchmark_segmentation.py --quick --output /tmp/B.md       # smoke test, ~1 minute
"""
from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from medsec.tasks.segmentation import SegmentationTask
from medsec.utils.benchmarks import (
    benchmark_parser,
    command,
    fmt,
    machine_summary,
    produced_by,
    publish,
    timed_train,
)
from medsec.utils.config import REPO_ROOT

SECTION = "segmentation"
EXPERIMENT = "hippocampus_unet3d"
GPU_EXPERIMENT = "conf/experiment/hippocampus_dynunet_gpu.yaml"
REFERENCE = {"anterior": 0.90, "posterior": 0.89}
REFERENCE_NAME = "nnU-Net 3D full resolution, MSD Task04 test set (Isensee et al. 2021)"
QUICK = ["data.source.max_cases=16", "trainer.max_epochs=1", "trainer.max_time=null",
         "model.net.channels=[8,16]", "model.net.strides=[2]"]
GOAL_DICE = 0.85
GOAL_MINUTES = 30.0


def time_inference(run_dir: Path) -> dict[str, float]:
    """Whole-volume sliding-window inference of the best checkpoint over the test volumes
    (data already read and cached; volumes per second of the network and window blending)."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    task = SegmentationTask.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt", map_location="cpu").eval()
    volumes = [batch["image"] for batch in datamodule.test_dataloader()]
    start = time.perf_counter()
    with torch.no_grad():
        for image in volumes:
            task.infer(image)
    seconds = time.perf_counter() - start
    return {"volumes": len(volumes), "seconds": seconds, "volumes_per_s": len(volumes) / seconds,
            "splits": {split: len(records) for split, records in datamodule.data.splits.items()}}


def bench(out_dir: Path, extra: list[str], quick: bool) -> dict[str, Any]:
    overrides = [f"experiment={EXPERIMENT}", *extra, *(QUICK if quick else [])]
    line = command("train", overrides)
    print(f"[benchmark] {line}", flush=True)
    metrics, epochs, wall = timed_train(overrides, out_dir)
    inference = time_inference(out_dir)
    row = {"command": line, "metrics": metrics, "epochs": len(epochs), "wall_s": wall,
           "train_s": sum(e["seconds"] for e in epochs), "inference": inference, "run_dir": str(out_dir)}
    print(f"[benchmark] test Dice {fmt(metrics.get('test/dice_mean'))} in {wall / 60:.1f} min; "
          f"{inference['volumes_per_s']:.1f} volumes/s", flush=True)
    return row


def render(args: argparse.Namespace, row: dict[str, Any], started: dt.datetime) -> str:
    m = row["metrics"]
    lines = [
        "## Segmentation on real data (MSD Task04 Hippocampus)",
        "",
        f"{produced_by('benchmark_segmentation.py', started)}. Machine: {machine_summary()}. "
        "The machine was shared with another engineer's jobs while this ran.",
    ]
    if args.quick:
        lines += ["", "**Smoke mode (`--quick`): 16 cases, one epoch, a tiny network; the figures mean nothing.**"]
    lines += [
        "",
        "Data: the 260 labelled cases of the shared copy (see its PROVENANCE.txt). Split: fold 0 of 5 (seed 0) "
        "is the held-out test set (20 %); a ninth of the other cases is the validation set that picks the "
        f"checkpoint (`val/dice_mean`); the rest train ({_sizes(row)}). Training: random 32x48x32 crops, flips, intensity "
        "jitter; test: whole volumes, Gaussian sliding windows (overlap 0.5). Dice and HD95 (in mm, from each "
        "volume's voxel spacing) are per-case means over the test cases, background excluded.",
        "",
        "| class | test Dice | nnU-Net Dice | test HD95 (mm) |",
        "|---|---|---|---|",
    ]
    for name, ref in REFERENCE.items():
        lines.append(f"| {name} | {fmt(m.get(f'test/dice_{name}'))} | {ref:.2f} | {fmt(m.get(f'test/hd95_mm_{name}'), 2)} |")
    lines.append(f"| **mean** | **{fmt(m.get('test/dice_mean'))}** | {sum(REFERENCE.values()) / 2:.3f} "
                 f"| {fmt(m.get('test/hd95_mm_mean'), 2)} |")
    inference = row["inference"]
    lines += [
        "",
        f"- Training: {row['epochs']} epochs, {row['train_s'] / 60:.1f} min in training steps; the whole "
        f"`medsec train` (data reading and checks, fitting with validation, testing, outputs) took "
        f"{row['wall_s'] / 60:.1f} min. Best validation Dice {fmt(m.get('val/dice_mean_best'))}.",
        f"- Inference: {inference['volumes_per_s']:.1f} test volumes/s ({inference['volumes']} volumes, "
        "sliding windows of the best checkpoint, data already in memory).",
        f"- Reproduce: `{row['command']}`" + (f" with {args.threads} torch thread(s)" if args.threads else "") + ".",
        f"- Reference: {REFERENCE_NAME}, on the official (unreleased-label) test set, so not the same cases.",
        f"- nnU-Net-level recipe for a GPU (nnU-Net's DynUNet, 40x56x40 patches, 300 epochs, not run here): "
        f"`{GPU_EXPERIMENT}` (`medsec train experiment=hippocampus_dynunet_gpu`).",
        "",
        "### Goals missed",
        "",
    ]
    lines += [f"- {miss}" for miss in _misses(row, args.quick)] or ["- none"]
    return "\n".join(lines) + "\n"


def _sizes(row: dict[str, Any]) -> str:
    return ", ".join(f"{n} {split}" for split, n in row["inference"]["splits"].items())


def _misses(row: dict[str, Any], quick: bool) -> list[str]:
    if quick:
        return ["smoke mode: no goal applies"]
    misses = []
    dice = row["metrics"].get("test/dice_mean")
    if dice is None or dice < GOAL_DICE:
        misses.append(f"mean test Dice {fmt(dice)} is below {GOAL_DICE:.2f}.")
    if row["train_s"] > GOAL_MINUTES * 60:
        misses.append(f"training took {row['train_s'] / 60:.1f} min, over {GOAL_MINUTES:.0f} CPU minutes.")
    return misses


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, SECTION, quick="smoke mode: 16 cases, one epoch, a tiny network")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="run directory (default: outputs/benchmarks/<timestamp>/hippocampus_unet3d)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 is faster than 2 on a machine shared with other jobs)")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override (shown in the command)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    out_dir = (args.out_dir or REPO_ROOT / "outputs" / "benchmarks" / f"{started:%Y-%m-%d_%H-%M-%S}" / EXPERIMENT)
    row = bench(out_dir.resolve(), args.extra, args.quick)
    markdown = render(args, row, started)
    publish(args.output, SECTION, markdown)
    print(f"[benchmark] wrote section '{SECTION}' of {args.output}; run in {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
