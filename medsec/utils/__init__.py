"""Helpers shared by the verbs: config composition, run directories, DDP under Hydra."""
