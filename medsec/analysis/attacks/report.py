"""The robustness report's table: one markdown row per attack, epsilon and defence."""
from __future__ import annotations

from typing import Any


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
