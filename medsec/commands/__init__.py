"""One thin Hydra app per command (`medsec <command>`); commands use the library (``Run`` and the
packages by role) and never import each other."""
