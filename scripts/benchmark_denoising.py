#!/usr/bin/env python
"""Benchmark denoising on real images: noisy input, Gaussian filter, non-local means, the
convolutional denoising autoencoder and DnCNN, through the same ``DenoisingTask`` test loop.

Data (the configs of ``experiment=denoising_cxr`` and ``experiment=denoising_hippocampus``): the NIH
ChestX-ray14 sample at 256x256 with Poisson noise (photon counting: low-dose X-ray), and 2D slices
of the MSD hippocampus MRI volumes (64x64) with Rician noise (MRI magnitude). One blind network of
each kind is trained per data set on random patches with noise levels drawn from a range covering
both test levels, then every method is tested on the same noisy test images (same seeds).

    python scripts/benchmark_denoising.py --budget 8                      # the BENCHMARKS.md run: about 40 CPU minutes
    python scripts/benchmark_denoising.py                                 # budget 1: about 5 minutes, NLM still wins on X-rays
    python scripts/benchmark_denoising.py --quick --output /tmp/B.md      # smoke test, ~2 minutes
"""
from __future__ import annotations

import argparse
import datetime as dt
import time
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from medsec.data.noise import level_slug
from medsec.tasks.denoising import DenoisingTask
from medsec.utils.benchmarks import benchmark_parser, data_config, machine_summary, produced_by, publish
from medsec.utils.config import CONFIG_DIR

SECTION = "denoising"
GOAL_DB = 1.0
DATASETS: dict[str, dict[str, Any]] = {
    "cxr": {"title": "NIH ChestX-ray14 sample, 256x256", "experiment": "denoising_cxr",
            "overrides": ["data.source.max_images=300"], "noise": "poisson", "train_levels": [60, 600],
            "test_levels": [100, 400], "crop": 40, "patches": 2, "batch": 8, "test_images": 16,
            "quick": ["data.source.max_images=60"]},
    "hippocampus": {"title": "MSD hippocampus MRI slices, 64x64", "experiment": "denoising_hippocampus",
                    "overrides": [], "noise": "rician", "train_levels": [0.02, 0.12],
                    "test_levels": [0.04, 0.08], "crop": 40, "patches": 1, "batch": 16, "test_images": 64,
                    "quick": ["data.source.max_cases=12"]},
}
NETWORKS: dict[str, dict[str, Any]] = {
    "DAE": {"config": "dae", "net": {"channels": [32, 64, 96]}, "steps": 400, "minutes": 2.0, "lr": 2e-3},
    "DnCNN": {"config": "dncnn", "net": {"depth": 8, "features": 32}, "steps": 1000, "minutes": 5.5, "lr": 2e-3},
}
BASELINES: dict[str, dict[str, Any]] = {
    "Gaussian filter": {"_target_": "medsec.models.baselines.GaussianFilter", "sigma": 1.0},
    "NLM": {"_target_": "medsec.models.baselines.NonLocalMeans"},
}
QUICK = {"steps": 10, "test_images": 8}


def datamodule(spec: dict[str, Any], quick: bool) -> L.LightningDataModule:
    """The experiment's data module (its data config, resolved as ``medsec train`` would)."""
    overrides = [f"experiment={spec['experiment']}", *spec["overrides"], *(spec["quick"] if quick else [])]
    data_cfg = data_config(overrides) | {"batch_size": spec["batch"], "num_workers": 0}
    return instantiate(data_cfg, _convert_="all")


def make_task(spec: dict[str, Any], net: dict[str, Any], info: dict[str, Any], lr: float = 1e-3) -> DenoisingTask:
    return DenoisingTask(
        model={"net": net}, optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": lr},
        noise={"name": spec["noise"], "levels": spec["train_levels"]},
        test_noise={spec["noise"]: spec["test_levels"]}, crop_size=spec["crop"],
        patches_per_image=spec["patches"], num_grid=2, **info)


def trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test(task: DenoisingTask, dm: L.LightningDataModule, batches: int) -> dict[str, float]:
    trainer(limit_test_batches=batches).test(task, datamodule=dm, verbose=False)
    return {k: float(v) for k, v in task.trainer.callback_metrics.items()}


def bench_dataset(key: str, quick: bool, budget: float = 1.0) -> dict[str, Any]:
    spec = DATASETS[key]
    dm = datamodule(spec, quick)
    info = dm.task_info()
    test_images = QUICK["test_images"] if quick else spec["test_images"]
    batches = max(1, test_images // spec["batch"])
    results: dict[str, dict[str, float]] = {}
    train_s: dict[str, float] = {}
    steps_done: dict[str, int] = {}
    for name, net in BASELINES.items():
        print(f"[benchmark] {key}: {name}", flush=True)
        results[name] = test(make_task(spec, net, info), dm, batches)
    for name, recipe in NETWORKS.items():
        steps = QUICK["steps"] if quick else round(budget * recipe["steps"])
        net = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / f"{recipe['config']}.yaml").net)
        task = make_task(spec, net | recipe["net"], info, lr=recipe["lr"])
        minutes = 0.5 if quick else budget * recipe["minutes"]
        print(f"[benchmark] {key}: training {name} for {steps} steps or {minutes} min", flush=True)
        L.seed_everything(0, workers=True)
        start = time.perf_counter()
        trainer(max_steps=steps, max_epochs=-1, max_time={"seconds": 60 * minutes}, limit_val_batches=0).fit(
            task, datamodule=dm)
        train_s[name] = time.perf_counter() - start
        steps_done[name] = task.global_step
        results[name] = test(task.eval(), dm, batches)
    splits = {split: len(records) for split, records in dm.data.splits.items()}
    return {"key": key, "spec": spec, "results": results, "train_s": train_s, "steps": steps_done, "splits": splits,
            "test_images": min(batches * spec["batch"], splits["test"])}


def rows(bench: dict[str, Any]) -> list[dict[str, Any]]:
    spec, results = bench["spec"], bench["results"]
    out = []
    for level in spec["test_levels"]:
        suffix = f"{spec['noise']}_{level_slug(level)}"
        noisy = results["NLM"]
        row = {"data": bench["key"], "noise": spec["noise"], "level": level,
               "noisy": (noisy[f"test/noisy_psnr_{suffix}"], noisy[f"test/noisy_ssim_{suffix}"])}
        for method, metrics in results.items():
            row[method] = (metrics[f"test/psnr_{suffix}"], metrics[f"test/ssim_{suffix}"], metrics["test/ms_per_image"])
        row["gain"] = row["DnCNN"][0] - row["NLM"][0]
        out.append(row)
    return out


def render(args: argparse.Namespace, benches: list[dict[str, Any]], started: dt.datetime, wall: float) -> str:
    methods = [*BASELINES, *NETWORKS]
    level_names = {"poisson": "dose", "rician": "sigma", "gaussian": "sigma", "speckle": "sigma"}
    lines = [
        "## Denoising on real images (noisy input, Gaussian filter, non-local means, DAE, DnCNN)",
        "",
        f"{produced_by('benchmark_denoising.py', started)} in {wall / 60:.1f} min. Machine: {machine_summary()}. "
        "The machine was shared with other jobs while this ran.",
    ]
    if args.quick:
        lines += ["", "**Smoke mode (`--quick`): few images, 10 training steps; the figures mean nothing.**"]
    lines += [
        "",
        "Noise models chosen by modality: Poisson (photon counting, low-dose X-ray; level = dose, photons at "
        "intensity 1, lower is noisier) on the chest X-rays; Rician (MRI magnitude; level = sigma of the "
        "complex Gaussian noise, intensities in [0, 1]) on the MRI slices. Every method sees the same noisy "
        "test images (seeded); cells are PSNR dB / SSIM on whole test images (mean over images), with "
        "ms/image of the method itself (2 CPU threads). Networks are blind (one per data set, trained on "
        "levels drawn per patch from the range in the last column), on random patches; "
        "NLM is blind too (noise sigma estimated per image by Donoho's Haar-wavelet median estimator, "
        "h = 0.8 sigma, 5x5 patches, 13x13 search); the Gaussian filter has a fixed sigma of 1 pixel.",
        "",
        f"| data | noise, level | noisy input | {' | '.join(methods)} | DnCNN - NLM (dB) | train levels |",
        "|---|---|---|" + "---|" * len(methods) + "---|---|",
    ]
    all_rows = [(b, r) for b in benches for r in rows(b)]
    for bench, row in all_rows:
        cells = [f"{row[m][0]:.2f} / {row[m][1]:.3f} ({row[m][2]:.0f} ms)" for m in methods]
        spec = bench["spec"]
        lines.append(f"| {spec['title']} | {row['noise']}, {level_names[row['noise']]} {level_slug(row['level'])} "
                     f"| {row['noisy'][0]:.2f} / {row['noisy'][1]:.3f} | {' | '.join(cells)} | "
                     f"**{row['gain']:+.2f}** | {spec['train_levels']} |")
    lines.append("")
    for bench in benches:
        spec = bench["spec"]
        trained = ", ".join(f"{name} {bench['steps'][name]} steps in {seconds / 60:.1f} min"
                            for name, seconds in bench["train_s"].items())
        lines.append(f"- {spec['title']} (`experiment={spec['experiment']}` data): splits "
                     f"{bench['splits']} (split by patient/case), tested on the first {bench['test_images']} test "
                     f"images; patches {spec['crop']}x{spec['crop']} ({spec['patches']} per image), batch "
                     f"{spec['batch']}; {trained}.")
    nets = "; ".join(f"{name}: `{recipe['config']}` with {recipe['net']}, Adam lr {recipe['lr']}, at most "
                     f"{round(args.budget * recipe['steps'])} steps or {args.budget * recipe['minutes']:g} min"
                     for name, recipe in NETWORKS.items())
    lines += [
        f"- Networks: {nets} (smaller than the paper's 17x64 DnCNN and time-boxed, for the CPU budget: on a "
        "shared machine the number of steps varies with the load; `--budget 10` multiplies steps and minutes).",
        "- Reference (published, different data and noise): ldct-benchmark (Eulig et al. 2024), low-dose CT, "
        "PSNR noisy input 18.1 / 29.1 / 30.9 dB (chest / abdomen / neuro), CNN-10 27.3 / 32.7 / 32.0, RED-CNN "
        "28.0 / 33.7 / 34.1: trained CNNs gain 3-9 dB over the input there; compare the gains, not the levels.",
        "",
        "### Goals",
        "",
    ]
    if args.quick:
        lines.append("- smoke mode: no goal applies")
    else:
        for bench, row in all_rows:
            met = row["gain"] >= GOAL_DB
            lines.append(f"- {'met' if met else 'MISSED'}: DnCNN >= NLM + {GOAL_DB:.0f} dB on {bench['spec']['title']}, "
                         f"{row['noise']} {level_slug(row['level'])} ({row['gain']:+.2f} dB).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, SECTION, quick="smoke mode: few images, 10 training steps")
    parser.add_argument("--data", nargs="+", choices=sorted(DATASETS), default=list(DATASETS),
                        help="data sets to run")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="multiply every network's training steps and minutes (e.g. 10 on a GPU or a quiet machine)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    start = time.perf_counter()
    benches = [bench_dataset(key, args.quick, args.budget) for key in args.data]
    markdown = render(args, benches, started, time.perf_counter() - start)
    publish(args.output, SECTION, markdown)
    print(f"[benchmark] wrote section '{SECTION}' of {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
