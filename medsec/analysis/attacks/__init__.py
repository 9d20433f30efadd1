"""Adversarial attacks, their evaluation, and defences, for any medsec task."""
from medsec.analysis.attacks.adapters import TaskAdapter, adapter_for
from medsec.analysis.attacks.registry import ATTACKS, AttackSpec, build_attack, register_attack

__all__ = ["ATTACKS", "AttackSpec", "TaskAdapter", "adapter_for", "build_attack", "register_attack"]
