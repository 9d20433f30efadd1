"""An adversarial-example detector on what the model computes: local intrinsic dimensionality at
every backbone layer (Ma et al. 2018), class-conditional kernel density of the penultimate features
(Feinman et al. 2017), the prediction's confidence, and feature squeezing (Xu et al. 2018: how far
the prediction moves when the input is median-filtered, reduced to 4 bits or JPEG-compressed),
combined by logistic regression.

Evaluation follows those papers: clean test images the model classifies correctly against the
adversarial examples of those same images that fool it (a failed attack leaves an image that is,
for the model, still clean). The AUC over every attacked image is reported beside it.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from medsec.analysis.attacks.adapters import TaskAdapter
from medsec.analysis.attacks.defenses import jpeg, median
from medsec.errors import ConfigError

MAX_LAYER_VALUES = 8192
"""Activations larger than this are average-pooled over space first (channels kept)."""


def layer_activations(victim: TaskAdapter, images: torch.Tensor) -> list[torch.Tensor]:
    """The flattened output of every direct child of the classifier's backbone (the last one is
    the penultimate feature vector), for a classifier built by :mod:`medsec.models`."""
    net = getattr(victim.task, "net", None)
    backbone = getattr(net, "backbone", None)
    if not isinstance(backbone, nn.Module) or not hasattr(net, "features"):
        raise ConfigError("detector: the model exposes no backbone layers (classifiers built by medsec.models do)")
    outputs: list[torch.Tensor] = []
    children = list(backbone.children()) or [backbone]
    hooks = [child.register_forward_hook(lambda _m, _i, out: outputs.append(_compact(out)))
             for child in children]
    try:
        with torch.no_grad():
            net.features(images)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def _compact(activation: torch.Tensor) -> torch.Tensor:
    """A copy of ``activation`` flattened per image (a copy: an in-place ReLU may overwrite it),
    spatially pooled when it holds more than :data:`MAX_LAYER_VALUES` values per image."""
    if activation.ndim > 2 and activation[0].numel() > MAX_LAYER_VALUES:
        dims = activation.ndim - 2
        side = max(1, int((MAX_LAYER_VALUES / activation.shape[1]) ** (1 / dims)))
        pool = nn.functional.adaptive_avg_pool2d if dims == 2 else nn.functional.adaptive_avg_pool3d
        activation = pool(activation, side)
    return activation.flatten(1).clone()


def lid_scores(queries: torch.Tensor, reference: torch.Tensor, k: int = 20) -> np.ndarray:
    """Maximum-likelihood LID estimate of each query among its ``k`` nearest reference points."""
    distances = torch.cdist(queries, reference)
    nearest = distances.topk(min(k, reference.shape[0]), largest=False).values.clamp(min=1e-12)
    return (-1.0 / torch.log(nearest / nearest[:, -1:]).mean(1).clamp(max=-1e-12)).numpy()


def kd_scores(queries: torch.Tensor, predicted: torch.Tensor, reference: torch.Tensor,
              reference_labels: torch.Tensor, bandwidth: float) -> np.ndarray:
    """Gaussian kernel density (log scale) of each query under the clean reference features of the
    class the model predicts for it."""
    scores = np.full(len(queries), -np.inf)
    for label in predicted.unique():
        members = reference[reference_labels == label]
        chosen = predicted == label
        if len(members):
            distances = torch.cdist(queries[chosen], members) ** 2
            scores[chosen.numpy()] = torch.logsumexp(-distances / (2 * bandwidth**2), dim=1).numpy()
    return np.maximum(scores, np.finfo(np.float64).min)  # a class without references: lowest density


def squeeze_scores(victim: TaskAdapter, images: torch.Tensor, probs: torch.Tensor) -> list[np.ndarray]:
    """[confidence, one squeezing distance per squeezer]: the largest of ``probs`` (the softmax of
    ``images``), and the L1 distance between it and the softmax of the median-filtered, 4-bit and
    JPEG (quality 75, 2D images) versions. Each squeezer is its own column, so the regression can
    discount one that also moves clean predictions (the median filter does here)."""
    squeezers = [median, lambda x: torch.round(x * 15) / 15]
    if images.ndim == 4 and images.shape[1] in (1, 3):
        squeezers.append(jpeg)
    with torch.no_grad():
        return [probs.amax(1).numpy(), *((victim(squeeze(images)).softmax(1) - probs).abs().sum(1).numpy()
                                         for squeeze in squeezers)]


def detector_scores(victim: TaskAdapter, reference: list[torch.Tensor], reference_labels: torch.Tensor,
                    bandwidth: float, images: torch.Tensor, k: int = 20) -> tuple[np.ndarray, torch.Tensor]:
    """([LID per layer..., KD, confidence, squeezing distances...], predicted class) for each of
    ``images``, relative to the clean ``reference`` activations (:func:`layer_activations`)."""
    queries = layer_activations(victim, images)
    with torch.no_grad():
        probs = victim(images).softmax(1)
    predicted = probs.argmax(1)
    columns = [lid_scores(q, r, k) for q, r in zip(queries, reference)]
    columns.append(kd_scores(queries[-1], predicted, reference[-1], reference_labels, bandwidth))
    columns += squeeze_scores(victim, images, probs)
    return np.stack(columns, axis=1), predicted


def detection_auc(victim: TaskAdapter, reference_images: torch.Tensor, reference_labels: torch.Tensor,
                  clean: torch.Tensor, adversarial: torch.Tensor, labels: torch.Tensor,
                  k: int = 20, folds: int = 5, seed: int = 0) -> dict[str, float | int]:
    """Cross-validated ROC AUC of telling adversarial from clean images (a class-balanced fold keeps
    an image and its adversarial example together). ``auc``: correctly classified clean images
    against their successful adversarial examples; ``auc_all``: every image; ``pairs``: how many
    images the first counts."""
    reference = layer_activations(victim, reference_images)
    bandwidth = float(torch.cdist(reference[-1], reference[-1]).median()) or 1.0
    x_clean, clean_pred = detector_scores(victim, reference, reference_labels, bandwidth, clean, k)
    x_adv, adv_pred = detector_scores(victim, reference, reference_labels, bandwidth, adversarial, k)
    fooled = ((clean_pred == labels) & (adv_pred != labels)).numpy()

    def auc(keep: np.ndarray) -> float:
        n = int(keep.sum())
        if n < 2 * folds:
            return float("nan")
        x = np.concatenate([x_clean[keep], x_adv[keep]])
        y = np.concatenate([np.zeros(n), np.ones(n)])
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
        return float(roc_auc_score(y, cross_val_predict(model, x, y, cv=folds, method="predict_proba")[:, 1]))

    return {"auc": auc(fooled), "auc_all": auc(np.ones(len(clean), dtype=bool)), "pairs": int(fooled.sum())}
