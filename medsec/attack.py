"""`medsec attack ckpt_path=... attack=pgd attack.eps=[1/255,2/255]`: attack a trained model on its
test split and write ``robustness.json``, ``robustness.md`` and plots.

White-box by default; ``surrogate_ckpt_path=...`` crafts the examples on another model and
evaluates them on ``ckpt_path`` (transfer, black-box). ``targeted=random|least_likely|<class>``,
``defenses=[none,jpeg,median]`` and ``detector=true`` (LID/KD detection AUC) are options.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from medsec.attacks.adapters import adapter_for
from medsec.attacks.detector import detection_auc
from medsec.attacks.evaluate import Batches, parse_eps, run_attack
from medsec.attacks.registry import EPS_ATTACKS, build_attack
from medsec.data.datamodule import MedicalDataModule
from medsec.errors import ConfigError
from medsec.eval import load_run
from medsec.utils.config import CONFIG_DIR, register_resolvers
from medsec.utils.outputs import OutputWriter
from medsec.utils.run import save_resolved_config, user_errors_exit
from medsec.viz.attacks import adversarial_grid_png, plot_eps_curve
from medsec.viz.plots import png_bytes

log = logging.getLogger("medsec.attack")


def take(datamodule: MedicalDataModule, split: str, max_images: int) -> Batches:
    """Up to ``max_images`` (images, target) pairs of ``split``, in batches."""
    datamodule.setup(None)
    loader = {"train": datamodule.train_dataloader, "test": datamodule.test_dataloader}[split]()
    batches, count = [], 0
    for batch in loader:
        keep = min(len(batch["image"]), max_images - count)
        batches.append((batch["image"][:keep], batch.get("label", batch.get("mask"))[:keep]))
        count += keep
        if count >= max_images:
            break
    return batches


def markdown_table(report: dict[str, Any]) -> str:
    """``robustness.md``: one row per attack, epsilon and defence."""
    lines = [f"# Robustness of `{report['checkpoint']}`", "",
             f"Threat model: {report['threat']}" + (f" (surrogate `{report['surrogate']}`)" if report["surrogate"] else "")
             + f"; targeted: {report['targeted'] or 'no'}; {report['rows'][0]['images']} test images.", "",
             "| attack | eps | defence | clean | adversarial | degradation % | success % | L-inf | L2 | SSIM | PSNR dB | ms/image | detection AUC (fooled / all) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(value: Any, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for r in report["rows"]:
        eps = "-" if r["eps"] is None else (f"{r['eps']:.3f}" if r["norm"] == "l2" else f"{255 * r['eps']:g}/255")
        success = None if r["success_rate"] is None else 100 * r["success_rate"]
        lines.append(f"| {r['attack']} | {eps} | {r['defense']} | {f(r['clean'])} | {f(r['adversarial'])} | "
                     f"{f(r['degradation_pct'], 1)} | {f(success, 1)} | {f(r['linf'], 4)} | {f(r['l2'], 3)} | "
                     f"{f(r['ssim'])} | {f(r['psnr'], 1)} | {f(r['ms_per_image'], 1)} | {detection_cell(r)} |")
    return "\n".join(lines) + "\n"


def detection_cell(row: dict[str, Any]) -> str:
    """``AUC on fooled pairs / AUC on all images (pairs)``, or ``-`` without a detector."""
    if row.get("detection_auc") is None:
        return "-"
    return f"{row['detection_auc']:.3f} / {row['detection_auc_all']:.3f} ({row['detection_pairs']} pairs)"


def attack(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured attack; returns the report written to ``robustness.json``."""
    L.seed_everything(cfg.seed, workers=True)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.paths.output_dir)
    save_resolved_config(cfg, out_dir)
    task, datamodule, stage = load_run(cfg, cfg.ckpt_path)
    victim = adapter_for(task)
    crafter = adapter_for(load_run(cfg, cfg.surrogate_ckpt_path)[0]) if cfg.get("surrogate_ckpt_path") else victim
    spec = OmegaConf.to_container(cfg.attack, resolve=True)
    name, eps_values = spec.pop("name"), parse_eps(spec.pop("eps", None))
    if name not in EPS_ATTACKS:
        eps_values = [None]
    batches = take(datamodule, "test", cfg.max_images)
    needs_train = name == "uap" or cfg.detector
    train_batches = take(datamodule, "train", cfg.train_images) if needs_train else []
    rows: list[dict[str, Any]] = []
    sample: dict[str, torch.Tensor] = {}
    for eps in eps_values:
        configured = build_attack(name, crafter, eps, **spec)
        if configured.needs_fit:
            configured.fit(train_batches)
        new_rows, sample = run_attack(victim, configured, batches, targeted=cfg.targeted, defenses=list(cfg.defenses),
                                      seed=cfg.seed, keep_images=cfg.detector)
        if cfg.detector:
            reference, reference_labels = (torch.cat(parts) for parts in zip(*train_batches))
            detection = detection_auc(victim, reference, reference_labels, sample["all_clean"],
                                      sample["all_adversarial"], sample["all_target"])
            new_rows[0] |= {f"detection_{key}": value for key, value in detection.items()}
        rows += new_rows
        log.info("%s eps=%s: %s %.3f -> %.3f", name, eps, new_rows[0]["metric"], new_rows[0]["clean"],
                 new_rows[0]["adversarial"])
    report = {"checkpoint": str(cfg.ckpt_path), "surrogate": cfg.get("surrogate_ckpt_path"),
              "threat": "transfer (black-box)" if cfg.get("surrogate_ckpt_path") else "white-box",
              "attack": name, "params": spec, "targeted": cfg.targeted, "kind": victim.kind, "rows": rows}
    writer = stage.output_writer(out_dir) if stage else OutputWriter(out_dir)  # sealing with encrypt_outputs
    writer.write_json("robustness.json", report)
    writer.write("robustness.md", markdown_table(report).encode())
    writer.write("plots/eps_curve.png", png_bytes(plot_eps_curve(rows)))
    title = f"{name} eps={rows[-1]['eps']:.4g}" if rows[-1]["eps"] else name
    writer.write("plots/adversarial_grid.png", adversarial_grid_png(sample, task.class_names, title))
    log.info("results in %s", out_dir)
    return report


@user_errors_exit
def run(cfg: DictConfig) -> dict[str, Any]:
    if cfg.max_images < 1:
        raise ConfigError(f"max_images must be positive, got {cfg.max_images}")
    return attack(cfg)


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="attack")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
