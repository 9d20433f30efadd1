"""The privacy audit's table: one markdown row per membership attack."""
from __future__ import annotations

from typing import Any


def markdown_table(report: dict[str, Any]) -> str:
    """``audit.md``: AUC, TPR at each FPR, the epsilon lower bound and the DP bound per attack."""
    fprs = [f"{f:g}" for f in report["fpr"]]
    claimed = report["claimed"]
    summary = (f"{report['members']} training images (members) against {report['non_members']} test images "
               f"(non-members); delta = {report['delta']:.3g}; the epsilon lower bounds hold with "
               f"{100 * report['confidence']:g}% confidence (Clopper-Pearson).")
    bound = "DP bound" if claimed is None else f"DP bound (claimed eps = {claimed['epsilon']:g}): TPR at most"
    header = ["attack", "AUC", *(f"TPR@{100 * float(f):g}% FPR" for f in fprs), "empirical eps lower bound", bound]
    lines = [f"# Membership audit of `{report['checkpoint']}`", "", summary, "",
             "| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * len(fprs) + "---:|---|"]
    for name, result in report["attacks"].items():
        cells = [name, f"{result['auc']:.3f}", *(f"{result['tpr_at_fpr'][f]:.4f}" for f in fprs),
                 f"{result['epsilon']['lower']:.3f}", _bound_cell(result)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _bound_cell(result: dict[str, Any]) -> str:
    """The TPR the claimed epsilon allows at each FPR, and whether the lower bound stays within the claim."""
    if "dp_tpr_bound" not in result:
        return "- (no claimed epsilon)"
    bounds = " / ".join(f"{b:.4f}" for b in result["dp_tpr_bound"].values())
    return f"{bounds}; {'within' if result['within_dp_bound'] else '**exceeded**'}"
