"""`medsec attack ckpt_path=... attack=pgd attack.eps=[1/255,2/255]`: attack a trained model on its
test split and write ``robustness.json``, ``robustness.md`` and plots.

White-box by default; ``surrogate_ckpt_path=...`` crafts the examples on another model and
evaluates them on ``ckpt_path`` (transfer, black-box). ``targeted=random|least_likely|<class>``,
``defenses=[none,jpeg,median]`` and ``detector=true`` (LID/KD detection AUC) are options.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from medsec.analysis.attacks.adapters import adapter_for
from medsec.analysis.attacks.detector import detection_auc
from medsec.analysis.attacks.evaluate import parse_eps, run_attack
from medsec.analysis.attacks.registry import ATTACKS, build_attack
from medsec.analysis.attacks.report import markdown_table
from medsec.core.app import hydra_app
from medsec.core.run import Run
from medsec.errors import ConfigError
from medsec.viz.attacks import adversarial_grid_png, plot_eps_curve
from medsec.viz.plots import png_bytes

log = logging.getLogger("medsec.attack")


def attack(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured attack; returns the report written to ``robustness.json``."""
    if cfg.max_images < 1:
        raise ConfigError(f"max_images must be positive, got {cfg.max_images}")
    run = Run.open(cfg)
    torch.manual_seed(cfg.seed)
    victim = adapter_for(run.task)
    surrogate = cfg.get("surrogate_ckpt_path")
    crafter = adapter_for(Run.open_checkpoint(cfg, surrogate, run.out_dir).task) if surrogate else victim
    spec = OmegaConf.to_container(cfg.attack, resolve=True)
    name, eps_values = spec.pop("name"), parse_eps(spec.pop("eps", None))
    if not ATTACKS[name].budget:
        eps_values = [None]
    batches = run.batches("test", cfg.max_images)
    needs_train = ATTACKS[name].universal or cfg.detector
    train_batches = run.batches("train", cfg.train_images) if needs_train else []
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
    writer = run.writer  # sealing with encrypt_outputs
    writer.write_json("robustness.json", report)
    writer.write("robustness.md", markdown_table(report).encode())
    writer.write("plots/eps_curve.png", png_bytes(plot_eps_curve(rows)))
    title = f"{name} eps={rows[-1]['eps']:.4g}" if rows[-1]["eps"] else name
    writer.write("plots/adversarial_grid.png", adversarial_grid_png(sample, run.task.class_names, title))
    log.info("results in %s", run.out_dir)
    return report


main = hydra_app("attack", attack)

if __name__ == "__main__":
    main()
