"""Adversarial attacks, their evaluation, and defences, for any medsec task."""
from medsec.analysis.attacks.adapters import TaskAdapter, adapter_for
from medsec.analysis.attacks.registry import ATTACKS, build_attack

__all__ = ["ATTACKS", "TaskAdapter", "adapter_for", "build_attack"]
