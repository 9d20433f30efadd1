#!/usr/bin/env python
"""Benchmark medsec's classification recipes on the real data in ../shared/data.

For each data set, runs ``medsec train experiment=<recipe>`` in-process (the real pipeline: Hydra
config -> MedicalDataModule -> ClassificationTask -> Lightning Trainer -> best checkpoint tested),
records test AUROC / ACC, wall time and training images/s, and writes a table beside the published
reference figures into the ``classification`` section of BENCHMARKS.md. It also times medsec's
training loop against a bare PyTorch loop on PneumoniaMNIST (the pipeline overhead).

    python scripts/benchmark_classification.py                      # everything (about 45 CPU minutes)
    python scripts/benchmark_classification.py --quick --output /tmp/B.md   # smoke test, ~2 minutes
    python scripts/benchmark_classification.py --datasets breastmnist --no-overhead
    python scripts/benchmark_classification.py --datasets breastmnist --seeds 42 43 44 --no-overhead

With ``--seeds`` each recipe runs once per seed (``seed=<s>``): the table shows the mean and standard
deviation, and a sub-table each seed's test AUROC / ACC and process CPU minutes.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from medsec.utils.benchmarks import (
    benchmark_parser,
    command,
    fmt,
    machine_summary,
    mark,
    produced_by,
    publish,
    timed_train,
)
from medsec.utils.config import REPO_ROOT, compose_config

SECTION = "classification"
MEDMNIST_REF = "MedMNIST v2 ResNet-18 (28), Yang et al. 2023 (medmnist.github.io)"
DATASETS: dict[str, dict[str, Any]] = {
    "pneumoniamnist": {
        "experiment": "pneumoniamnist_resnet18",
        "title": "PneumoniaMNIST",
        "split": "official test (624)",
        "reference": (0.944, 0.854, MEDMNIST_REF),
    },
    "breastmnist": {
        "experiment": "breastmnist_resnet18",
        "title": "BreastMNIST",
        "split": "official test (156)",
        "reference": (0.901, 0.863, MEDMNIST_REF),
    },
    "nih": {
        "experiment": "nih_cxr14_densenet121",
        "title": "NIH ChestX-ray14 sample (14 findings)",
        "split": "patient-disjoint 20 % of the 621-image sample",
        "reference": (0.841, None, "CheXNet, DenseNet-121, Rajpurkar et al. 2017 (112k images)"),
    },
}
QUICK = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1"]
GOAL_MINUTES = 15.0  # CPU minutes per run (per seed)
GOAL_RATIO = 0.90


def _rate(epochs: list[dict[str, float]], clock: str = "seconds") -> float | None:
    """Images per second of ``clock``: wall time (``seconds``) or process CPU time (``cpu_seconds``)."""
    seconds = sum(e[clock] for e in epochs)
    return sum(e["images"] for e in epochs) / seconds if seconds > 0 else None


# ---- accuracy benchmark -------------------------------------------------------------------------
def bench_dataset(key: str, out_root: Path, extra: list[str], quick: bool,
                  seed: int | None = None) -> dict[str, Any]:
    """One run of ``key``'s recipe (with ``seed=<seed>`` when given): its test metrics, wall and
    process CPU seconds."""
    spec = DATASETS[key]
    seeded = [] if seed is None else [f"seed={seed}"]
    overrides = [f"experiment={spec['experiment']}", *seeded, *extra, *(QUICK if quick else [])]
    line = command("train", overrides)
    run_dir = out_root / (spec["experiment"] + ("" if seed is None else f"-seed{seed}"))
    print(f"[benchmark] {key}: {line}", flush=True)
    cpu = time.process_time()
    metrics, epochs, wall = timed_train(overrides, run_dir)
    row = {
        "key": key,
        "seed": seed,
        "command": line,
        "test_auroc": metrics.get("test/auroc"),
        "test_acc": metrics.get("test/acc"),
        "val_auroc_best": metrics.get("val/auroc_best"),
        "epochs": len(epochs),
        "wall_s": wall,
        "cpu_s": time.process_time() - cpu,
        "train_images_per_s": _rate(epochs),
        "per_class": {k.removeprefix("test/auroc_"): v for k, v in metrics.items()
                      if k.startswith("test/auroc_")},
        "run_dir": str(run_dir),
    }
    print(f"[benchmark] {key}: test AUROC {fmt(row['test_auroc'])} ACC {fmt(row['test_acc'])} "
          f"in {wall / 60:.1f} min ({row['cpu_s'] / 60:.1f} CPU min), "
          f"{fmt(row['train_images_per_s'], 1)} train img/s", flush=True)
    return row


def _spread(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``None`` when undefined)."""
    known = [v for v in values if v is not None]
    if not known:
        return None, None
    return statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row for a data set's runs: the run itself, or over several seeds the means (with
    ``*_sd`` standard deviations) and the runs under ``seeds``."""
    if len(runs) == 1:
        return runs[0]
    line = runs[0]["command"].replace(f"seed={runs[0]['seed']}", "seed=<s>")
    summary = dict(runs[0], seeds=runs, command=line)
    for name in ("test_auroc", "test_acc", "wall_s", "cpu_s", "epochs", "train_images_per_s"):
        summary[name], summary[f"{name}_sd"] = _spread([run.get(name) for run in runs])
    summary["per_class"] = {}
    return summary


def _cell(row: dict[str, Any], name: str) -> str:
    """``mean ± sd`` for a multi-seed row, else the value."""
    sd = row.get(f"{name}_sd")
    return fmt(row[name]) + ("" if sd is None else f" ± {sd:.3f}")


# ---- pipeline overhead --------------------------------------------------------------------------
def _bare_loop(cfg: DictConfig, epochs: int, batches: int) -> list[dict[str, float]]:
    """The same network, optimiser, loss and batches as the recipe, in a plain PyTorch loop over a
    TensorDataset of the same uint8 arrays scaled to [0, 1] (no augmentation, no validation)."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(cfg.seed)
    source = cfg.data.source
    with np.load(Path(source.root) / f"{source.flag}.npz") as npz:
        images = torch.from_numpy(npz["train_images"]).unsqueeze(1).float().div_(255.0)
        labels = torch.from_numpy(npz["train_labels"].reshape(-1).astype(np.int64))
    loader = DataLoader(TensorDataset(images, labels), batch_size=cfg.data.batch_size, shuffle=True,
                        num_workers=0, drop_last=False)
    num_classes = int(labels.max()) + 1
    net = instantiate(cfg.model.net, num_classes=num_classes, in_channels=1, spatial_dims=2)
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    optimizer = instantiate(task_cfg["optimizer"])(params=net.parameters())
    scheduler = instantiate(task_cfg["scheduler"])(optimizer=optimizer) if task_cfg.get("scheduler") else None
    weight = None
    if task_cfg.get("class_weights") == "balanced":
        counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
        weight = counts.sum() / (num_classes * counts)
    net.train()
    out = []
    for _ in range(epochs):
        start, cpu, seen = time.perf_counter(), time.process_time(), 0
        for i, (x, y) in enumerate(loader):
            if i >= batches:
                break
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net(x), y, weight=weight)
            loss.backward()
            optimizer.step()
            seen += len(y)
        if scheduler is not None:
            scheduler.step()
        out.append({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                    "images": seen})
    return out


def bench_overhead(out_root: Path, reps: int, epochs: int, batches: int) -> dict[str, Any]:
    """Images/s of medsec's training loop vs a bare PyTorch loop, same model/data/batches, run
    alternately ``reps`` times; the first of ``epochs`` epochs is a warm-up and not counted."""
    experiment = DATASETS["pneumoniamnist"]["experiment"]
    common = [f"experiment={experiment}", "logger=none", "callbacks=none", "test=false",
              f"trainer.max_epochs={epochs}", f"trainer.limit_train_batches={batches}",
              "trainer.limit_val_batches=0", "+trainer.enable_checkpointing=false",
              "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]
    variants = {
        "medsec (no augmentation)": [*common, "data.augment=false"],
        "medsec (recipe's augmentation)": common,
    }
    slugs = dict(zip(variants, ("medsec-noaug", "medsec-aug")))
    counted = slice(1, None) if epochs > 1 else slice(None)
    names = ["bare PyTorch", *variants]
    rates: dict[str, list[float]] = {name: [] for name in names}
    cpu_rates: dict[str, list[float]] = {name: [] for name in names}

    def record(name: str, rep: int, per_epoch: list[dict[str, float]]) -> None:
        rates[name].append(_rate(per_epoch[counted]) or float("nan"))
        cpu_rates[name].append(_rate(per_epoch[counted], "cpu_seconds") or float("nan"))
        print(f"[overhead] rep {rep}: {name}: {rates[name][-1]:.1f} img/s "
              f"({cpu_rates[name][-1]:.1f} per CPU-second)", flush=True)

    for rep in range(reps):
        bare_cfg = compose_config("train", variants["medsec (no augmentation)"],
                                  output_dir=out_root / "overhead" / "bare")
        record("bare PyTorch", rep, _bare_loop(bare_cfg, epochs, batches))
        for name, overrides in variants.items():
            _, per_epoch, _ = timed_train(overrides, out_root / "overhead" / f"{slugs[name]}-{rep}")
            record(name, rep, per_epoch)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu_rates.items()}
    bare, bare_cpu = medians["bare PyTorch"], cpu_medians["bare PyTorch"]
    return {
        "rates": rates,
        "medians": medians,
        "cpu_rates": cpu_rates,
        "cpu_medians": cpu_medians,
        "ratio": medians["medsec (no augmentation)"] / bare,
        "ratio_cpu": cpu_medians["medsec (no augmentation)"] / bare_cpu,
        "ratio_augmented": medians["medsec (recipe's augmentation)"] / bare,
        "setup": {"experiment": experiment, "reps": reps, "epochs": epochs, "batches": batches},
        "common": common,
    }


# ---- report -------------------------------------------------------------------------------------
def render(args: argparse.Namespace, rows: list[dict[str, Any]], overhead: dict[str, Any] | None,
           started: dt.datetime, total_s: float) -> str:
    lines = [
        "## Classification on real data",
        "",
        f"{produced_by('benchmark_classification.py', started)} in {total_s / 60:.0f} min.",
        f"Machine: {machine_summary()}. The machine was shared with another engineer's test runs while this "
        "ran, so times and images/s are pessimistic and noisy (repeat runs vary by tens of per cent).",
    ]
    if args.quick:
        lines += ["", "**Smoke mode (`--quick`): a couple of batches per stage; the figures mean nothing.**"]
    if rows:
        lines += [
            "",
            "Each row is one run of the recipe through the real pipeline (fit, pick the checkpoint with the "
            "best `val/auroc`, test it). MedMNIST rows use the official test split; AUROC is the macro mean "
            "over classes (NIH: over the findings with positives and negatives in the test split).",
            "",
            "| data set | test split | test AUROC | test ACC | reference AUROC / ACC | epochs | wall time "
            "| train img/s | reproduce with |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            spec = DATASETS[row["key"]]
            ref_auc, ref_acc, _ = spec["reference"]
            seeds = f" ({len(row['seeds'])} seeds, mean ± sd)" if "seeds" in row else ""
            lines.append(
                f"| {spec['title']}{seeds} | {spec['split']} | {_cell(row, 'test_auroc')} "
                f"| {_cell(row, 'test_acc')} "
                f"| {fmt(ref_auc)} / {fmt(ref_acc)} | {row['epochs']:.0f} | {row['wall_s'] / 60:.1f} min "
                f"| {fmt(row['train_images_per_s'], 0)} | `{row['command']}` |"
            )
        lines += ["", "References:"]
        refs = {DATASETS[r["key"]]["reference"][2] for r in rows}
        lines += [f"- {ref}" for ref in sorted(refs)]
        lines += _notes(rows)
        for row in rows:
            if "seeds" in row:
                lines += _seed_lines(row)
    if overhead is not None:
        lines += _overhead_lines(overhead)
    misses = _misses(rows, overhead, args.quick)
    lines += ["", "### Goals missed", ""]
    lines += [f"- {m}" for m in misses] if misses else ["- none"]
    return "\n".join(lines) + "\n"


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    notes = ["", "Notes:"]
    keys = {r["key"] for r in rows}
    if "pneumoniamnist" in keys:
        notes.append("- PneumoniaMNIST: our copy's train split lacks 826 of the official 1214 normal images "
                     "(3882 = 388 normal / 3494 pneumonia instead of 4708 = 1214 / 3494); val and test are "
                     "the "
                     "official 524 / 624. The recipe weights the classes inversely to their train frequency. "
                     "The MedMNIST baselines train 100 epochs on the full split.")
    if "breastmnist" in keys:
        notes.append("- BreastMNIST: official 546 / 78 / 156 split. With 156 test images (42 malignant) one "
                     "image moves ACC by 0.6 points; AUROC varies by a few points between seeds.")
    if "nih" in keys:
        nih = next(r for r in rows if r["key"] == "nih")
        notes.append("- NIH: a 621-image pathology-enriched sample (not an official split), 14 findings, "
                     "from scratch without ImageNet weights at a small image size: the figure proves the "
                     "multi-label pipeline end to end and cannot reproduce CheXNet's 0.841 (112k training "
                     "images, ImageNet-pretrained, 224 px). ACC is the mean per-finding accuracy, dominated "
                     "by negatives.")
        if nih["per_class"]:
            cells = ", ".join(f"{k} {fmt(v, 2)}" for k, v in nih["per_class"].items())
            notes.append(f"- NIH per-finding test AUROC: {cells}.")
    return notes


def _seed_lines(row: dict[str, Any]) -> list[str]:
    """The per-seed sub-table of a multi-seed row, its mean ± sd and the goal's verdict."""
    spec = DATASETS[row["key"]]
    ref_auc = spec["reference"][0]
    lines = ["", f"### {spec['title']} over {len(row['seeds'])} seeds", "",
             f"`{row['command']}`, one run per seed, each selecting its checkpoint on `val/auroc` and tested "
             "once. CPU minutes = process CPU time of the whole run (fit, validation, test).", "",
             "| seed | test AUROC | test ACC | best val AUROC | epochs | wall min | CPU min |",
             "|---|---|---|---|---|---|---|"]
    for run in row["seeds"]:
        cpu = run.get("cpu_s")
        lines.append(f"| {run['seed']} | {fmt(run['test_auroc'])} | {fmt(run['test_acc'])} "
                     f"| {fmt(run['val_auroc_best'])} | {run['epochs']} | {run['wall_s'] / 60:.1f} "
                     f"| {'-' if cpu is None else f'{cpu / 60:.1f}'} |")
    cpu_minutes = None if row["cpu_s"] is None else row["cpu_s"] / 60
    lines.append(f"| mean ± sd | {_cell(row, 'test_auroc')} | {_cell(row, 'test_acc')} | | | "
                 f"{row['wall_s'] / 60:.1f} | {fmt(cpu_minutes, 1)} |")
    worst = max((run.get("cpu_s") or 0.0) for run in row["seeds"]) / 60
    auc = row["test_auroc"]
    lines += ["", f"Goal: {len(row['seeds'])}-seed mean test AUROC >= {ref_auc:.3f} (MedMNIST ResNet-18): "
              f"{fmt(auc)}, {mark(auc is not None and auc >= ref_auc)}; each seed within "
              f"{GOAL_MINUTES:.0f} CPU minutes: at most {worst:.1f}, {mark(worst <= GOAL_MINUTES)}."]
    return lines


def _overhead_lines(overhead: dict[str, Any]) -> list[str]:
    setup = overhead["setup"]
    lines = [
        "",
        "### Pipeline overhead (PneumoniaMNIST, training loop only)",
        "",
        f"The `{setup['experiment']}` recipe's model, optimiser, loss, batch size and data, "
        f"{setup['batches']} batches per epoch for {setup['epochs']} epochs (the first is a warm-up and "
        "not counted), no validation. medsec = `medsec train "
        f"{' '.join(overhead['common'])}` (Lightning Trainer + MedicalDataModule + MONAI CacheDataset), "
        "with `data.augment=false` for the like-for-like row; bare = a plain PyTorch loop (same network "
        "class, AdamW, weighted cross-entropy) over a TensorDataset of the same uint8 images scaled to "
        f"[0, 1], DataLoader without workers. The loops alternate; {setup['reps']} repetitions, median. "
        "Images per CPU-second (process CPU time, both threads) is less sensitive to the other jobs on "
        "the machine than wall-clock images/s.",
        "",
        "| loop | images/s per repetition | median images/s | vs bare | median images per CPU-s "
        "| vs bare (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    bare, bare_cpu = overhead["medians"]["bare PyTorch"], overhead["cpu_medians"]["bare PyTorch"]
    for name, values in overhead["rates"].items():
        median, cpu = overhead["medians"][name], overhead["cpu_medians"][name]
        lines.append(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | {median:.1f} "
                     f"| {median / bare:.2f} | {cpu:.1f} | {cpu / bare_cpu:.2f} |")
    lines += ["", f"Ratio medsec / bare (same data, no augmentation): **{overhead['ratio']:.2f}** "
                  f"wall-clock, {overhead['ratio_cpu']:.2f} per CPU-second (goal >= {GOAL_RATIO:.2f}). With "
                  "the recipe's augmentation (MONAI RandFlipd + RandAffined per image): "
                  f"{overhead['ratio_augmented']:.2f}; "
                  "that difference is the cost of augmenting, not of the loop."]
    return lines


def _misses(rows: list[dict[str, Any]], overhead: dict[str, Any] | None, quick: bool) -> list[str]:
    if quick:
        return ["smoke mode: no goal applies"]
    misses = []
    for row in rows:
        spec = DATASETS[row["key"]]
        ref_auc, ref_acc, _ = spec["reference"]
        auc, acc = row["test_auroc"], row["test_acc"]
        if row["key"] == "nih":
            misses.append(f"{spec['title']}: test AUROC {fmt(auc)} vs CheXNet {ref_auc:.3f}, expected with "
                          "this sample (see the note); not a goal here.")
        elif auc is None or auc < ref_auc:
            mean = f" (mean of {len(row['seeds'])} seeds)" if "seeds" in row else ""
            misses.append(f"{spec['title']}: test AUROC {fmt(auc)}{mean} is below the MedMNIST {ref_auc:.3f}.")
        if ref_acc is not None and acc is not None and acc < ref_acc:
            misses.append(f"{spec['title']}: test ACC {acc:.3f} is below the MedMNIST {ref_acc:.3f} "
                          "(the AUROC is the goal; ACC is reported for comparison).")
        runs = row.get("seeds", [row])
        minutes = max(run.get("cpu_s") or run["wall_s"] for run in runs) / 60
        if minutes > GOAL_MINUTES:
            misses.append(f"{spec['title']}: {minutes:.1f} min exceeds {GOAL_MINUTES:.0f} CPU minutes "
                          "per run.")
    if overhead is not None and overhead["ratio"] < GOAL_RATIO:
        misses.append(f"pipeline overhead: medsec/bare = {overhead['ratio']:.2f} < {GOAL_RATIO:.2f}.")
    return misses


# ---- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, SECTION, quick="smoke mode: a couple of batches per stage")
    parser.add_argument("--datasets", nargs="*", choices=sorted(DATASETS), default=list(DATASETS),
                        help="data sets to benchmark (default: all; none: only the overhead)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="run directories (default: outputs/benchmarks/<timestamp>)")
    parser.add_argument("--no-overhead", dest="overhead", action="store_false",
                        help="skip the medsec vs bare PyTorch timing")
    parser.add_argument("--overhead-reps", type=int, default=3)
    parser.add_argument("--overhead-batches", type=int, default=12,
                        help="training batches per epoch in the overhead timing")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for every recipe (shown in the commands)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--rows-from", type=Path, nargs="*", default=[], metavar="JSON",
                        help="take data-set rows (all seeds) from earlier --json results instead of re-running them")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="run each recipe once per seed and report mean ± sd (default: the recipe's seed)")
    args = parser.parse_args(argv)

    started = dt.datetime.now(dt.timezone.utc)
    stamp = f"{started:%Y-%m-%d_%H-%M-%S}"
    out_root = (args.out_dir or REPO_ROOT / "outputs" / "benchmarks" / stamp).resolve()
    t0 = time.perf_counter()
    earlier: dict[str, list[dict[str, Any]]] = {}
    for path in args.rows_from:
        for row in json.loads(path.read_text())["rows"]:
            earlier.setdefault(row["key"], []).append(row)
    runs = {key: earlier.get(key) or [bench_dataset(key, out_root, args.extra, args.quick, seed)
                                      for seed in args.seeds or [None]] for key in args.datasets}
    rows = [summarise(runs[key]) for key in args.datasets]
    overhead = None
    if args.overhead:
        reps = 1 if args.quick else args.overhead_reps
        batches = 2 if args.quick else args.overhead_batches
        overhead = bench_overhead(out_root, reps=reps, epochs=2, batches=batches)
    total = time.perf_counter() - t0
    markdown = render(args, rows, overhead, started, total)
    publish(args.output, SECTION, markdown)
    if args.json:
        args.json.write_text(json.dumps({"rows": [run for key in args.datasets for run in runs[key]],
                                         "overhead": overhead}, indent=2, default=str) + "\n")
    print(f"[benchmark] wrote section '{SECTION}' of {args.output}; runs in {out_root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
