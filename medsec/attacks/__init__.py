"""Adversarial attacks, their evaluation, and defences, for any medsec task."""
from medsec.attacks.adapters import TaskAdapter, adapter_for
from medsec.attacks.registry import ATTACKS, build_attack

__all__ = ["ATTACKS", "TaskAdapter", "adapter_for", "build_attack"]
