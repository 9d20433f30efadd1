"""An adversarial-example detector on the model's features: local intrinsic dimensionality (Ma et al.
2018) and kernel density (Feinman et al. 2017) scores combined by logistic regression."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medsec.attacks.adapters import TaskAdapter
from medsec.errors import ConfigError


def features(victim: TaskAdapter, images: torch.Tensor) -> torch.Tensor:
    """Penultimate-layer features of a classifier (``net.features``), flattened."""
    net = getattr(victim.task, "net", None)
    if net is None or not hasattr(net, "features"):
        raise ConfigError("detector: the model exposes no features (classifiers built by medsec.models do)")
    with torch.no_grad():
        return net.features(images).flatten(1)


def lid_scores(queries: torch.Tensor, reference: torch.Tensor, k: int = 20) -> np.ndarray:
    """Maximum-likelihood LID estimate of each query among its ``k`` nearest reference points."""
    distances = torch.cdist(queries, reference)
    nearest = distances.topk(min(k, reference.shape[0]), largest=False).values.clamp(min=1e-12)
    return (-1.0 / torch.log(nearest / nearest[:, -1:]).mean(1).clamp(max=-1e-12)).numpy()


def kd_scores(queries: torch.Tensor, reference: torch.Tensor, bandwidth: float) -> np.ndarray:
    """Gaussian kernel density of each query under the clean reference features (log scale)."""
    distances = torch.cdist(queries, reference) ** 2
    return torch.logsumexp(-distances / (2 * bandwidth**2), dim=1).numpy()


def detection_auc(victim: TaskAdapter, reference_images: torch.Tensor, clean: torch.Tensor,
                  adversarial: torch.Tensor, k: int = 20, folds: int = 5, seed: int = 0) -> float:
    """ROC AUC of telling ``adversarial`` from ``clean`` images, by cross-validated logistic
    regression on [LID, KD] scores relative to clean training features (``reference_images``)."""
    reference = features(victim, reference_images)
    bandwidth = float(torch.cdist(reference, reference).median()) or 1.0
    rows = []
    for images in (clean, adversarial):
        f = features(victim, images)
        rows.append(np.stack([lid_scores(f, reference, k), kd_scores(f, reference, bandwidth)], axis=1))
    x = np.concatenate(rows)
    y = np.concatenate([np.zeros(len(clean)), np.ones(len(adversarial))])
    model = make_pipeline(StandardScaler(), LogisticRegression(random_state=seed))
    scores = cross_val_predict(model, x, y, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores))
