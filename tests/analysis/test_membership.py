"""Membership-inference scores, ROC summaries and epsilon bounds on synthetic numbers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta

from medsec.analysis.privacy.membership import (
    dp_tpr_bound,
    empirical_epsilon,
    lira_scores,
    logit_confidence,
    loss_threshold_scores,
    roc,
    tpr_at_fpr,
)
from medsec.analysis.privacy.shadows import shadow_membership

N = 1000
MEMBER = np.arange(2 * N) < N
DELTA = 1e-5


def test_perfectly_separated_scores() -> None:
    scores = np.where(MEMBER, 1.0, 0.0) + np.random.default_rng(0).random(2 * N) * 0.5
    fpr, tpr, auc = roc(scores, MEMBER)
    assert auc == 1.0
    assert tpr_at_fpr(fpr, tpr, 0.001) == 1.0 and tpr_at_fpr(fpr, tpr, 0.0) == 1.0


def test_identical_distributions_give_chance() -> None:
    """10,000 scores from one distribution: the AUC's standard deviation is 0.006, the tolerance 5 of them."""
    scores = np.random.default_rng(1).normal(size=10_000)
    fpr, tpr, auc = roc(scores, np.arange(10_000) < 5000)
    assert auc == pytest.approx(0.5, abs=0.03)
    assert tpr_at_fpr(fpr, tpr, 0.01) < 0.03


def test_loss_attack_scores_low_losses_high() -> None:
    np.testing.assert_array_equal(loss_threshold_scores(np.array([0.1, 2.0])), [-0.1, -2.0])


def test_epsilon_of_a_perfect_attack_is_the_clopper_pearson_limit() -> None:
    """All 1000 members above all 1000 non-members: the TPR's one-sided 97.5% lower bound is
    0.025^(1/1000) and the FPR's upper bound 1 - 0.025^(1/1000) (both hold together with 95%)."""
    scores = np.where(MEMBER, 1.0, 0.0)
    bound = empirical_epsilon(scores, MEMBER, DELTA, confidence=0.95)
    tpr_low = 0.025 ** (1 / N)
    assert tpr_low == pytest.approx(beta.ppf(0.025, N, 1))
    expected = math.log((tpr_low - DELTA) / (1 - tpr_low))
    assert bound.lower == pytest.approx(expected, rel=1e-9) and 5.5 < bound.lower < 5.7
    assert bound.point == math.inf and bound.threshold == 1.0
    assert (bound.true_positives, bound.false_positives, bound.members, bound.non_members) == (N, 0, N, N)


def test_epsilon_from_the_complementary_test() -> None:
    """Members all high, half the non-members too: the proof comes from the low scores, all
    non-members (TNR 0.5 against FNR 0)."""
    scores = np.where(MEMBER | (np.arange(2 * N) >= 1.5 * N), 1.0, 0.0)
    bound = empirical_epsilon(scores, MEMBER, DELTA)
    tpr_low, fpr_high = beta.ppf(0.025, N, 1), beta.ppf(0.975, N // 2 + 1, N // 2)
    assert bound.lower == pytest.approx(math.log((1 - fpr_high - DELTA) / (1 - tpr_low)))
    assert (bound.true_positives, bound.false_positives) == (N, N // 2)


def test_epsilon_of_a_random_attack_is_zero() -> None:
    bound = empirical_epsilon(np.random.default_rng(2).random(2 * N), MEMBER, DELTA)
    assert bound.lower == 0.0 and bound.threshold is None


def synthetic_lira(k: int, n: int = 2000, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each example has its own level (spread 3); training on it raises its statistic by 2 (noise 1)."""
    rng = np.random.default_rng(seed)
    level = rng.normal(0, 3, n)
    member = rng.random(n) < 0.5
    in_shadow = shadow_membership(k, n, seed)
    shadow_stats = level + 2 * in_shadow + rng.normal(0, 1, (k, n))
    return level + 2 * member + rng.normal(0, 1, n), shadow_stats, in_shadow, member


@pytest.mark.parametrize("online", [False, True])
def test_lira_separates_shifted_gaussians(online: bool) -> None:
    """With 16 shadows the per-example calibration removes the examples' own levels: the AUC is
    close to that of a 2-sigma shift (0.92); the statistic alone reaches 0.67."""
    target, shadows, in_shadow, member = synthetic_lira(16)
    assert roc(target, member)[2] < 0.7
    assert roc(lira_scores(target, shadows, in_shadow, online=online), member)[2] > 0.85


@pytest.mark.parametrize("k", [2, 4])
def test_lira_with_few_shadows_pools_the_variance(k: int) -> None:
    target, shadows, in_shadow, member = synthetic_lira(k)
    for online in (False, True):
        scores = lira_scores(target, shadows, in_shadow, online=online)
        assert np.isfinite(scores).all() and roc(scores, member)[2] > 0.75


def test_lira_falls_back_to_all_shadows_for_an_example_never_out() -> None:
    target, shadows, in_shadow, _ = synthetic_lira(4, n=50)
    in_shadow[:, 0] = True  # example 0 in every shadow: no OUT statistic of its own
    scores = lira_scores(target, shadows, in_shadow)
    assert np.isfinite(scores).all()
    out = shadows[~in_shadow]
    expected = -np.log(1 - 0.5 * math.erfc(-(target[0] - out.mean()) / (out.std() * math.sqrt(2))))
    assert scores[0] == pytest.approx(expected, rel=1e-6)


def test_shadow_membership_puts_every_example_in_half_the_shadows() -> None:
    in_shadow = shadow_membership(6, 40, seed=0)
    assert (in_shadow.sum(0) == 3).all() and 10 < in_shadow.sum(1).min()
    np.testing.assert_array_equal(in_shadow, shadow_membership(6, 40, seed=0))


def test_dp_tpr_bound() -> None:
    """TPR <= e^eps FPR + delta, and (the complementary test) 1 - FPR <= e^eps (1 - TPR) + delta."""
    e = math.e
    np.testing.assert_allclose(dp_tpr_bound([0.001, 0.01, 0.5, 1.0], epsilon=1.0, delta=DELTA),
                               [e * 0.001 + DELTA, e * 0.01 + DELTA, 1 - (0.5 - DELTA) / e, 1.0])
    np.testing.assert_allclose(dp_tpr_bound([0.0, 0.2], epsilon=0.0, delta=0.0), [0.0, 0.2])
    assert dp_tpr_bound(0.5, epsilon=10.0, delta=DELTA) == pytest.approx(1 - (0.5 - DELTA) * math.exp(-10))
    assert dp_tpr_bound(0.2, epsilon=0.0, delta=0.5) == pytest.approx(0.7)


def test_logit_confidence_is_the_logit_of_the_true_class_probability() -> None:
    logits = torch.randn(64, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    labels = torch.arange(64) % 5
    p = torch.softmax(logits, 1)[torch.arange(64), labels]
    torch.testing.assert_close(logit_confidence(logits, labels), torch.log(p / (1 - p)))
    # where p rounds to 1 the naive form is infinite; the statistic is not
    extreme = logit_confidence(torch.tensor([[100.0, 0.0, 0.0]]), torch.tensor([0]))
    assert extreme.item() == pytest.approx(100 - math.log(2))
