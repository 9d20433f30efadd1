"""Membership inference: attack scores, ROC summaries and what they imply about differential privacy.

Scores are "higher = more likely a member". The loss attack is Yeom et al. (2018); LiRA is Carlini
et al. (2022), "Membership Inference Attacks From First Principles"; the epsilon lower bound follows
Jagielski et al. (2020), "Auditing Differentially Private Machine Learning"; the DP bound on an
attack's TPR is the hypothesis-testing view of DP (Kairouz et al. 2015).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import beta, norm
from sklearn.metrics import auc, roc_curve

MIN_OWN_VARIANCE = 8
"""LiRA: fewer IN (or OUT) shadows than this for an example, and its variance is the pooled one."""
VARIANCE_FLOOR = 1e-12


def loss_threshold_scores(losses: np.ndarray) -> np.ndarray:
    """The loss attack's scores: ``-loss`` (a low loss suggests a member)."""
    return -np.asarray(losses, dtype=np.float64)


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LiRA's statistic for a multi-class model, ``z_y - logsumexp(z_j, j != y)``: the logit of the
    true class's softmax probability, ``log(p / (1 - p))``, without rounding ``p`` to 1."""
    index = labels.long()[:, None]
    others = logits.scatter(1, index, float("-inf"))
    return logits.gather(1, index)[:, 0] - torch.logsumexp(others, dim=1)


def _gaussian_fit(stats: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per example (column): mean and standard deviation of ``stats`` where ``mask``.

    An example with at least :data:`MIN_OWN_VARIANCE` values gets its own variance; one with fewer
    the pooled within-example variance (the variance of all values when no example has two); one
    with none the mean and variance of all values."""
    count = mask.sum(0)
    if not count.any():
        raise ValueError("no shadow statistic to fit: every example is on the other side in every shadow")
    values = stats[mask]
    total_mean, total_var = values.mean(), values.var()
    mean = np.where(count > 0, np.where(mask, stats, 0).sum(0) / np.maximum(count, 1), total_mean)
    squares = np.where(mask, (stats - mean) ** 2, 0).sum(0)
    freedom = int((count - (count > 0)).sum())
    pooled = squares.sum() / freedom if freedom else total_var
    own = squares / np.maximum(count - 1, 1)
    var = np.where(count >= MIN_OWN_VARIANCE, own, np.where(count > 0, pooled, total_var))
    return mean, np.sqrt(np.maximum(var, VARIANCE_FLOOR))


def lira_scores(target_stat: np.ndarray, shadow_stats: np.ndarray, in_shadow: np.ndarray,
                online: bool = False) -> np.ndarray:
    """LiRA scores of ``n`` examples from the target model's statistic ``(n,)``, ``k`` shadow
    models' statistics ``(k, n)`` and ``in_shadow[k, i]``: was example ``i`` in shadow ``k``'s
    training set.

    Offline: ``-log P(X >= x)`` under a Gaussian fitted to the OUT shadows (one-sided: a member's
    statistic is larger). Online: ``log N(x; IN) - log N(x; OUT)``.
    """
    x = np.asarray(target_stat, dtype=np.float64)
    stats, members = np.asarray(shadow_stats, dtype=np.float64), np.asarray(in_shadow, dtype=bool)
    mean_out, std_out = _gaussian_fit(stats, ~members)
    if not online:
        return -norm.logsf(x, mean_out, std_out)
    mean_in, std_in = _gaussian_fit(stats, members)
    return norm.logpdf(x, mean_in, std_in) - norm.logpdf(x, mean_out, std_out)


def roc(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The attack's ROC curve and its area: (FPR, TPR, AUC)."""
    fpr, tpr, _ = roc_curve(np.asarray(is_member, dtype=bool), scores)
    return fpr, tpr, float(auc(fpr, tpr))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target_fpr: float) -> float:
    """The largest TPR of a threshold whose FPR is at most ``target_fpr``."""
    return float(np.max(tpr[fpr <= target_fpr], initial=0.0))


def clopper_pearson(successes: np.ndarray, trials: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Clopper-Pearson bounds on a rate, each holding with probability ``1 - alpha``: (lower, upper)."""
    k = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        lower = np.where(k > 0, beta.ppf(alpha, k, trials - k + 1), 0.0)
        upper = np.where(k < trials, beta.ppf(1 - alpha, k + 1, trials - k), 1.0)
    return lower, upper


def _epsilon(tpr: np.ndarray, fpr: np.ndarray, delta: float) -> np.ndarray:
    """The epsilon an attack with these rates proves, both ways round (TPR <= e^eps FPR + delta,
    and the same for the complementary test: TNR <= e^eps FNR + delta); 0 where it proves nothing."""
    with np.errstate(divide="ignore", invalid="ignore"):
        direct = np.log((tpr - delta) / fpr)
        complementary = np.log((1 - fpr - delta) / (1 - tpr))
    return np.maximum(np.nan_to_num(np.maximum(direct, complementary), nan=0.0, posinf=np.inf, neginf=0.0), 0.0)


@dataclass(frozen=True)
class EpsilonBound:
    """What an attack proves about epsilon at its best threshold."""

    lower: float
    """Epsilon lower bound holding with probability ``confidence`` (0: nothing proven)."""
    point: float
    """The same threshold's estimate from the observed rates, without intervals (inf: no error of one kind)."""
    threshold: float | None
    """The score threshold (predict "member" at or above it); ``None`` when nothing is proven."""
    true_positives: int
    false_positives: int
    members: int
    non_members: int
    delta: float
    confidence: float


def empirical_epsilon(scores: np.ndarray, is_member: np.ndarray, delta: float,
                      confidence: float = 0.95) -> EpsilonBound:
    """The largest epsilon lower bound over the attack's thresholds.

    At each threshold the TPR gets a lower and the FPR an upper Clopper-Pearson bound, each at
    ``(1 - confidence) / 2`` so that both hold together with probability ``confidence`` (Jagielski et
    al. 2020). Picking the best threshold on the same scores makes the bound somewhat optimistic.
    """
    is_member = np.asarray(is_member, dtype=bool)
    members, non_members = int(is_member.sum()), int((~is_member).sum())
    fpr, tpr, thresholds = roc_curve(is_member, scores, drop_intermediate=False)
    tp, fp = np.rint(tpr * members), np.rint(fpr * non_members)
    alpha = (1 - confidence) / 2
    tpr_low, _ = clopper_pearson(tp, members, alpha)
    _, fpr_high = clopper_pearson(fp, non_members, alpha)
    bounds = _epsilon(tpr_low, fpr_high, delta)
    best = int(np.argmax(bounds))
    lower = float(bounds[best])
    point = float(_epsilon(tpr[best:best + 1], fpr[best:best + 1], delta)[0])
    return EpsilonBound(lower, point, float(thresholds[best]) if lower else None, int(tp[best]), int(fp[best]),
                        members, non_members, delta, confidence)


def dp_tpr_bound(fpr: np.ndarray | float, epsilon: float, delta: float) -> np.ndarray:
    """The largest TPR an (epsilon, delta)-DP training allows a membership test at ``fpr``:
    ``min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR))``."""
    fpr = np.asarray(fpr, dtype=np.float64)
    bound = np.minimum(np.exp(epsilon) * fpr + delta, 1 - np.exp(-epsilon) * (1 - delta - fpr))
    return np.clip(bound, 0.0, 1.0)
