"""Privacy audits: membership inference against a trained model, and the differential-privacy
epsilon its success proves."""
from medsec.analysis.privacy.membership import (
    EpsilonBound,
    dp_tpr_bound,
    empirical_epsilon,
    lira_scores,
    logit_confidence,
    loss_threshold_scores,
    roc,
    tpr_at_fpr,
)

__all__ = ["EpsilonBound", "dp_tpr_bound", "empirical_epsilon", "lira_scores", "logit_confidence",
           "loss_threshold_scores", "roc", "tpr_at_fpr"]
