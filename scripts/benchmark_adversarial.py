#!/usr/bin/env python
"""Benchmark attacks and defences and write the ``adversarial`` section of BENCHMARKS.md.

On PneumoniaMNIST (official split, 28x28): trains a standard small CNN, the same network with PGD
adversarial training (``protect=[adversarial_training]``) and a second standard network (the transfer surrogate),
then runs ``medsec attack`` (in-process, the real verb) for the survey's Table-1 rows: FGSM, BIM,
PGD-10, PGD-L2, C&W, DeepFool, JSMA and UAP, white-box and transfer, with JPEG/median defences and
the detector. Also times medsec's PGD against calling torchattacks directly on the same model and
images.

``--dense`` instead writes the ``adversarial_dense`` section: the NIH ChestX-ray14 DenseNet-121
(``experiment=nih_cxr14_densenet121``, multi-label, macro AUROC) and the MSD hippocampus 3D U-Net
(``experiment=hippocampus_unet3d``, Dice), trained here or given by ``--nih-ckpt`` / ``--hippo-ckpt``,
attacked by ``medsec attack attack=pgd`` at 1, 2, 4 and 8/255, with the wall and CPU seconds of each row.

    python scripts/benchmark_adversarial.py                 # about 30 minutes on 2 CPU cores
    python scripts/benchmark_adversarial.py --dense         # about 12 CPU minutes
    python scripts/benchmark_adversarial.py --quick --output /tmp/B.md
    python scripts/benchmark_adversarial.py --dense --quick --output /tmp/B.md   # synthetic data, a minute
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torchattacks

from medsec import api
from medsec.analysis.attacks import adapter_for, build_attack
from medsec.analysis.attacks.report import detection_cell
from medsec.tasks.classification import ClassificationTask
from medsec.utils.benchmarks import (
    benchmark_parser,
    command,
    fmt,
    machine_summary,
    mark,
    produced_by,
    publish,
)
from medsec.utils.config import REPO_ROOT

SECTION, DENSE_SECTION = "adversarial", "adversarial_dense"
DATA = ["data=medmnist", "model=small_cnn", "model.net.width=32", "data.augment=false"]
GOAL_AT_GAIN, GOAL_CLEAN_DROP, GOAL_DETECTOR, GOAL_OVERHEAD = 30.0, 5.0, 0.95, 1.10
QUIET = ["callbacks.rich_progress_bar=null"]
SMOKE = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "data.num_workers=0"]
DENSE_EPS = ("1/255", "2/255", "4/255", "8/255")
# name -> title, metric, the real recipe, and its synthetic stand-in for --quick
DENSE: dict[str, dict[str, Any]] = {
    "nih": {"title": "NIH ChestX-ray14 sample, DenseNet-121 (multi-label, 14 findings)", "metric": "macro AUROC",
            "recipe": ["experiment=nih_cxr14_densenet121"],
            "smoke": ["data=synthetic", "data.source.multilabel=true", "data.source.num_classes=3",
                      "data.source.num_samples=[32,16,16]", "data.batch_size=16", "model=densenet121"]},
    "hippocampus": {"title": "MSD Task04 hippocampus, 3D U-Net", "metric": "Dice",
                    "recipe": ["experiment=hippocampus_unet3d"],
                    "smoke": ["data=synthetic_seg", "data.source.spatial_dims=3", "data.source.image_size=16",
                              "data.source.num_samples=[8,4,4]", "data.batch_size=4", "task=segmentation",
                              "model=unet3d", "model.net.channels=[8,16]", "model.net.strides=[2]",
                              "task.roi_size=16"]},
}


def timed_run(verb: str, overrides: list[str], out_dir: Path) -> tuple[dict[str, Any], float, float]:
    """``medsec VERB OVERRIDES`` in this process; returns its result, wall and process CPU seconds."""
    start, cpu = time.perf_counter(), time.process_time()
    result = api.run(verb, overrides, out_dir)
    return result, time.perf_counter() - start, time.process_time() - cpu


def train_checkpoint(name: str, overrides: list[str], out_dir: Path, reuse: bool) -> tuple[Path, dict[str, Any]]:
    """Train ``overrides`` into ``out_dir`` (or, with ``reuse``, keep its checkpoint); returns the best
    checkpoint and the run's test metrics with its wall and CPU seconds (empty when reused)."""
    path = out_dir / "checkpoints" / "best.ckpt"
    if reuse and path.is_file():
        print(f"[adv] reusing {path}", flush=True)
        return path, {}
    metrics, wall, cpu = timed_run("train", overrides, out_dir)
    print(f"[adv] trained {name} in {wall:.0f} s ({cpu:.0f} CPU s)", flush=True)
    return path, metrics | {"wall_s": wall, "cpu_s": cpu}


def train_models(work: Path, epochs: int, quick: bool, reuse: bool = False) -> dict[str, Path]:
    limit = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=2"] if quick else []
    common = [*DATA, f"trainer.max_epochs={epochs}", *QUIET, *limit]
    runs = {"standard": [], "pgd_at": ["protect=[adversarial_training]", "protect.adversarial_training.steps=5"],
            "surrogate": ["seed=7"]}
    return {name: train_checkpoint(name, [*common, *extra], work / name, reuse)[0] for name, extra in runs.items()}


def attack_rows(ckpts: dict[str, Path], work: Path, quick: bool) -> list[dict[str, Any]]:
    n = 64 if quick else 624
    plans = [  # (label, checkpoint, overrides)
        ("standard", "standard", ["attack=fgsm"]),
        ("standard", "standard", ["attack=bim"]),
        ("standard", "standard", ["attack=pgd", "defenses=[none,jpeg,median]", "detector=true"]),
        ("standard", "standard", ["attack=pgdl2"]),
        ("standard", "standard", ["attack=uap"]),
        ("standard", "standard", ["attack=cw", f"max_images={min(n, 256)}"]),
        ("standard", "standard", ["attack=deepfool", f"max_images={min(n, 256)}"]),
        ("standard", "standard", ["attack=jsma", f"max_images={min(n, 64)}"]),
        ("standard", "standard", ["attack=pgd", "targeted=least_likely"]),
        ("pgd_at", "pgd_at", ["attack=pgd", "defenses=[none,jpeg]"]),
        ("transfer", "standard", ["attack=pgd", f"surrogate_ckpt_path={ckpts['surrogate']}"]),
    ]
    rows = []
    for i, (label, ckpt, extra) in enumerate(plans):
        overrides = [f"ckpt_path={ckpts[ckpt]}", f"max_images={n}", "train_images=512", *extra]
        start = time.perf_counter()
        report = api.run("attack", overrides, work / f"attack-{i}")
        for row in report["rows"]:
            rows.append(row | {"model": label, "threat": report["threat"], "wall_s": time.perf_counter() - start})
        print(f"[adv] {label} {' '.join(extra)}: {len(report['rows'])} rows", flush=True)
    return rows


def overhead(ckpt: Path, reps: int) -> dict[str, float]:
    """Seconds for PGD-10 at 2/255 on the same 256 images: medsec's Attack vs torchattacks.PGD."""

    task = ClassificationTask.load_from_checkpoint(ckpt, map_location="cpu")
    adapter = adapter_for(task)
    images = torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = adapter(images).argmax(1)
    ours = build_attack("pgd", adapter, 2 / 255, steps=10)
    direct = torchattacks.PGD(adapter, eps=2 / 255, alpha=0.5 / 255, steps=10, random_start=True)
    times: dict[str, list[float]] = {"medsec": [], "torchattacks": []}
    for _ in range(reps):
        for name, fn in (("medsec", lambda: ours(images, labels)), ("torchattacks", lambda: direct(images, labels))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    result = {k: statistics.median(v) for k, v in times.items()}
    result["ratio"] = result["medsec"] / result["torchattacks"]
    result["images_per_s"] = 256 / result["medsec"]
    print(f"[adv] overhead: {result}", flush=True)
    return result


def render(rows: list[dict[str, Any]], cost: dict[str, float], args: argparse.Namespace, epochs: int) -> str:
    def eps(r: dict[str, Any]) -> str:
        if r["eps"] is None:
            return "-"
        return f"{r['eps']:.2f} (L2)" if r["norm"] == "l2" else f"{round(255 * r['eps'])}/255"

    lines = [f"Command: `python scripts/benchmark_adversarial.py{' --quick' if args.quick else ''}` "
             f"({time.strftime('%Y-%m-%d')}). Machine: {machine_summary()}.", "",
             f"PneumoniaMNIST (28x28, official test split), `model=small_cnn` (width 32) trained {epochs} epochs: "
             "*standard*; *pgd_at* = the same with `protect=[adversarial_training]` (PGD-5 at 2/255 during training); "
             "*transfer* = examples crafted on a second standard network (seed 7), evaluated on *standard*. "
             "Metric: test accuracy; success = correct predictions turned wrong (targeted: the target reached).", "",
             "| model | threat | attack | eps | defence | targeted | clean acc | adv acc | degradation % | success % | L-inf | L2 | SSIM | PSNR dB | ms/img | detector AUC (fooled / all) |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        success = None if r["success_rate"] is None else 100 * r["success_rate"]
        lines.append(f"| {r['model']} | {r['threat']} | {r['attack']} | {eps(r)} | {r['defense']} | {r['targeted'] or '-'} | "
                     f"{fmt(r['clean'])} | {fmt(r['adversarial'])} | {fmt(r['degradation_pct'], 1)} | {fmt(success, 1)} | "
                     f"{fmt(r['linf'], 4)} | {fmt(r['l2'], 3)} | {fmt(r['ssim'])} | {fmt(r['psnr'], 1)} | "
                     f"{fmt(r['ms_per_image'], 1)} | {detection_cell(r)} |")
    lines += ["", *goals(rows, cost)]
    lines += ["", f"Attack throughput, PGD-10 at 2/255 on 256 images of the standard model: medsec {cost['medsec']:.2f} s "
              f"({cost['images_per_s']:.0f} images/s) vs torchattacks.PGD called directly {cost['torchattacks']:.2f} s; "
              f"ratio {cost['ratio']:.2f} (goal <= {GOAL_OVERHEAD})."]
    return "\n".join(lines)


def _pick(rows: list[dict[str, Any]], model: str, attack: str, eps: float, defense: str = "none") -> dict[str, Any] | None:
    return next((r for r in rows if r["model"] == model and r["attack"] == attack and r["eps"] is not None
                 and abs(r["eps"] - eps) < 1e-9 and r["defense"] == defense and not r["targeted"]), None)


def goals(rows: list[dict[str, Any]], cost: dict[str, float]) -> list[str]:
    standard, robust = _pick(rows, "standard", "pgd", 2 / 255), _pick(rows, "pgd_at", "pgd", 2 / 255)
    out = ["Goals:"]
    if standard and robust:
        gain = 100 * (robust["adversarial"] - standard["adversarial"])
        drop = 100 * (standard["clean"] - robust["clean"])
        out.append(f"- PGD-AT raises PGD-10 robust accuracy at 2/255 by {gain:.1f} points (goal >= {GOAL_AT_GAIN:.0f}): "
                   f"{mark(gain >= GOAL_AT_GAIN)}; clean accuracy drops {drop:.1f} points "
                   f"(goal <= {GOAL_CLEAN_DROP:.0f}): {mark(drop <= GOAL_CLEAN_DROP)}.")
        ceiling = 100 * (standard["clean"] - standard["adversarial"])
        if gain < GOAL_AT_GAIN and ceiling < GOAL_AT_GAIN:
            out.append(f"  The standard model keeps {standard['adversarial']:.3f} of its {standard['clean']:.3f} clean "
                       f"accuracy under PGD-10 at 2/255, so no defence could add more than {ceiling:.1f} points here: "
                       "at this epsilon on 28x28 images the goal is out of reach for this model.")
    if standard and standard.get("detection_auc") is not None:
        auc = standard["detection_auc"]
        out.append(f"- Detector (LID, KD, confidence, squeezing) AUC against PGD at 2/255: {auc:.3f} on the {standard['detection_pairs']} "
                   f"correctly classified test images whose attack succeeded, against their adversarial examples "
                   f"(Ma et al. 2018's protocol; goal >= {GOAL_DETECTOR}): {mark(auc >= GOAL_DETECTOR)}. "
                   f"Over every attacked image, failed attacks included: {standard['detection_auc_all']:.3f}.")
    out.append(f"- Attack overhead vs torchattacks: {cost['ratio']:.2f} (goal <= {GOAL_OVERHEAD}): "
               f"{mark(cost['ratio'] <= GOAL_OVERHEAD)}.")
    return out


# ---- multi-label and segmentation models (--dense) ---------------------------------------------
def dense_models(args: argparse.Namespace, work: Path) -> dict[str, dict[str, Any]]:
    """The NIH and hippocampus checkpoints (given, reused or trained) with their training runs."""
    given = {"nih": args.nih_ckpt, "hippocampus": args.hippo_ckpt}
    epochs = {"nih": [], "hippocampus": [f"trainer.max_epochs={args.hippo_epochs}"]}
    models = {}
    for name, spec in DENSE.items():
        overrides = [*spec["smoke"], *SMOKE] if args.quick else [*spec["recipe"], *epochs[name]]
        overrides += QUIET
        if given[name]:
            models[name] = {"ckpt": Path(given[name]), "train": {}, "command": None}
            continue
        ckpt, trained = train_checkpoint(name, overrides, work / name, args.reuse)
        models[name] = {"ckpt": ckpt, "train": trained, "command": command("train", overrides)}
    return models


def dense_rows(models: dict[str, dict[str, Any]], work: Path, steps: int,
               images: int | None) -> list[dict[str, Any]]:
    """``medsec attack attack=pgd`` once per model and epsilon, each timed (wall and process CPU)."""
    rows = []
    for name, model in models.items():
        for eps in DENSE_EPS:
            overrides = [f"ckpt_path={model['ckpt']}", "attack=pgd", f"attack.eps=[{eps}]",
                         f"attack.steps={steps}", *([f"max_images={images}"] if images else [])]
            report, wall, cpu = timed_run("attack", overrides, work / f"attack-{name}-{eps.replace('/', '_')}")
            row = report["rows"][0] | {"model": name, "kind": report["kind"], "wall_s": wall, "cpu_s": cpu,
                                       "command": command("attack", overrides)}
            rows.append(row)
            print(f"[adv] {name} eps {eps}: {row['metric']} {row['clean']:.3f} -> {row['adversarial']:.3f} "
                  f"in {wall:.0f} s ({cpu:.0f} CPU s)", flush=True)
    return rows


def render_dense(models: dict[str, dict[str, Any]], rows: list[dict[str, Any]], args: argparse.Namespace,
                 started: dt.datetime, total: tuple[float, float]) -> str:
    """The ``adversarial_dense`` section: how the models were made, then one row per model and epsilon."""
    lines = ["## Adversarial robustness: multi-label and segmentation models", "",
             f"{produced_by('benchmark_adversarial.py', started)}. Machine: {machine_summary()}. "
             f"Total {total[0] / 60:.1f} min wall, {total[1] / 60:.1f} CPU min.", ""]
    if args.quick:
        lines += ["**Smoke mode (`--quick`): synthetic data, one short epoch, a few images; "
                  "the figures mean nothing.**", ""]
    lines += ["Models:"]
    for name, model in models.items():
        train = model["train"]
        score = next((v for k, v in train.items() if k in ("test/auroc", "test/dice_mean")), None)
        made = (f"trained by `{model['command']}` in {train['wall_s']:.0f} s ({train['cpu_s']:.0f} CPU s), "
                f"test {DENSE[name]['metric']} {fmt(score)}" if train else f"checkpoint `{model['ckpt']}`")
        lines.append(f"- *{name}*: {DENSE[name]['title']}; {made}.")
    subset = "every test image" if args.max_images is None else f"the first {args.max_images} test images"
    lines += ["", f"Attack: `medsec attack attack=pgd` (white-box L-inf PGD, random start, {args.steps} steps of "
              "eps/4, untargeted: it ascends the task's own loss, masked BCE over the findings for NIH and "
              "Dice + cross-entropy through the sliding-window inference for the hippocampus), one call per "
              f"epsilon on the checkpoint's test split ({subset}). "
              "NIH: macro AUROC over the findings with positives and negatives among the attacked images; "
              "success = the share of findings whose decision (p >= 0.5) flipped. Hippocampus: mean foreground "
              "Dice per volume; success = Dice at most half the clean Dice. Wall and CPU seconds are the whole "
              "call (loading, clean and adversarial inference, attack); attack s is the crafting alone.", "",
              "| model | metric | eps | images | clean | PGD | degradation % | success % | L-inf | SSIM "
              "| attack s | ms/img | wall s | CPU s |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        success = None if r["success_rate"] is None else 100 * r["success_rate"]
        lines.append(f"| {r['model']} | {DENSE[r['model']]['metric']} | {round(255 * r['eps'])}/255 "
                     f"| {r['images']} | {fmt(r['clean'])} | {fmt(r['adversarial'])} | {fmt(r['degradation_pct'], 1)} "
                     f"| {fmt(success, 1)} | {fmt(r['linf'], 4)} | {fmt(r['ssim'])} | {r['seconds']:.1f} "
                     f"| {fmt(r['ms_per_image'], 0)} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} |")
    return "\n".join(lines)


def run_dense(args: argparse.Namespace) -> str:
    """Train or load the dense models, attack them, and render the section."""
    work = Path(args.work) / "dense"
    started, start, cpu = dt.datetime.now(dt.timezone.utc), time.perf_counter(), time.process_time()
    models = dense_models(args, work)
    rows = dense_rows(models, work, args.steps, args.max_images)
    total = (time.perf_counter() - start, time.process_time() - cpu)
    return render_dense(models, rows, args, started, total)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, SECTION, quick="a short smoke run")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--work", default=str(REPO_ROOT / "outputs" / "benchmarks" / "adversarial"))
    parser.add_argument("--reuse", action="store_true", help="keep checkpoints already in --work (same seeds and recipe)")
    dense = parser.add_argument_group(f"multi-label and segmentation models (the '{DENSE_SECTION}' section)")
    dense.add_argument("--dense", action="store_true", help=f"write the '{DENSE_SECTION}' section instead")
    dense.add_argument("--nih-ckpt", default=None, help="attack this NIH checkpoint instead of training one")
    dense.add_argument("--hippo-ckpt", default=None,
                       help="attack this hippocampus checkpoint instead of training one")
    dense.add_argument("--hippo-epochs", type=int, default=10,
                       help="epochs of experiment=hippocampus_unet3d when trained here (its 50 take ~21 min)")
    dense.add_argument("--steps", type=int, default=10, help="PGD steps (each of eps/4)")
    dense.add_argument("--max-images", type=int, default=None,
                       help="attack at most this many test images per model (default: all)")
    args = parser.parse_args(argv)
    if args.dense:
        if args.quick:
            args.max_images, args.steps = 4, 2
        publish(args.output, DENSE_SECTION, run_dense(args))
        return 0
    epochs = 1 if args.quick else args.epochs
    work = Path(args.work)
    ckpts = train_models(work, epochs, args.quick, args.reuse)
    rows = attack_rows(ckpts, work, args.quick)
    cost = overhead(ckpts["standard"], reps=1 if args.quick else 5)
    markdown = render(rows, cost, args, epochs)
    publish(args.output, SECTION, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
