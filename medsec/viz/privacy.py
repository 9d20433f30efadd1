"""Plots for `medsec audit`: membership-inference ROC curves on log-log axes."""
from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np

from medsec.analysis.privacy.membership import dp_tpr_bound


def plot_audit_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], lowest: float,
                   epsilon: float | None = None, delta: float = 0.0) -> plt.Figure:
    """One ROC curve per attack (name -> FPR, TPR, AUC) on log-log axes from ``lowest`` to 1, with
    chance and, given the model's claimed ``epsilon``, the most TPR (epsilon, delta)-DP allows."""
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUC {auc:.3f})")
    grid = np.logspace(np.log10(lowest), 0, 200)
    ax.plot(grid, grid, ls="--", color="grey", lw=1, label="chance")
    if epsilon is not None:
        ax.plot(grid, dp_tpr_bound(grid, epsilon, delta), color="black", lw=1.2,
                label=f"DP bound (eps={epsilon:g}, delta={delta:.2g})")
    ax.set(xscale="log", yscale="log", xlim=(lowest, 1), ylim=(lowest, 1.05), xlabel="false positive rate",
           ylabel="true positive rate", title="membership inference (members vs non-members)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig
