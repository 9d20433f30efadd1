"""`medsec <verb> [hydra overrides]`: one console command, one small Hydra app per verb.

A verb's module is imported only when its job runs (:func:`medsec.core.app.lazy_command`), so that
`medsec <verb> --help` and config errors come back without loading torch.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from medsec.core.app import hydra_app, lazy_command

VERBS: dict[str, tuple[str, str]] = {
    "train": ("medsec.commands.train", "train a task (default: the synthetic demo) and test its best checkpoint"),
    "eval": ("medsec.commands.evaluate", "evaluate a checkpoint on the test split: eval ckpt_path=PATH"),
    "predict": ("medsec.commands.predict", "predict new, unlabelled images or DICOM series: predict ckpt_path=PATH input=PATH"),
    "attack": ("medsec.commands.attack", "attack a checkpoint and measure robustness: attack ckpt_path=PATH attack=pgd"),
    "audit": ("medsec.commands.audit", "membership inference audit and empirical DP epsilon of a checkpoint: audit ckpt_path=PATH"),
    "federate": ("medsec.commands.federate", "federated training across sites with Flower: federate federation.num_sites=3 federation.strategy=fedavg"),
    "encrypt": ("medsec.commands.encrypt", "encrypted record stores and keys: encrypt [action=store|rotate|verify|keygen|decrypt]"),
    "he": ("medsec.commands.he", "homomorphic (CKKS) inference on a checkpoint's test split: he ckpt_path=PATH [mode=latency] [--remote URL]"),
    "serve": ("medsec.commands.serve", "HTTP service classifying CKKS ciphertexts: serve ckpt_path=PATH [port=8000]"),
    "report": ("medsec.commands.report", "cryptographic security report of an image cipher: report cipher=aes_ctr data=chestxray14"),
}

FLAG_ALIASES = {"--rotate": "action=rotate", "--verify": "action=verify"}
"""Flags some verbs accept as a shorthand for a Hydra override."""
VALUE_FLAGS = {"--remote": "remote"}
"""Flags followed by a value that some verbs accept as a shorthand for ``key=value``."""

USAGE = """usage: medsec <verb> [hydra overrides ...]

verbs:
{verbs}

Each verb is a Hydra app: `medsec <verb> --help` shows its config groups and options,
`medsec <verb> -m key=a,b` runs a sweep. Examples:
  medsec train
  medsec train experiment=pneumoniamnist_resnet18 trainer.max_epochs=3
  medsec eval ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt
  medsec encrypt action=keygen && medsec encrypt data=medmnist && medsec train data=medmnist crypto=aes
"""


def usage() -> str:
    width = max(map(len, VERBS))
    return USAGE.format(verbs="\n".join(f"  {v:<{width}}  {help_}" for v, (_, help_) in VERBS.items()))


def value_flags(args: Sequence[str]) -> list[str]:
    """``--remote URL`` (or ``--remote=URL``) as the override ``remote=URL``."""
    out, rest = [], list(args)
    while rest:
        arg = rest.pop(0)
        flag, eq, value = arg.partition("=")
        if flag in VALUE_FLAGS and (eq or rest):
            out.append(f"{VALUE_FLAGS[flag]}={value if eq else rest.pop(0)}")
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, overrides = args[0], args[1:]
    if verb not in VERBS:
        print(f"medsec: unknown verb '{verb}'\n\n{usage()}", file=sys.stderr)
        return 2
    overrides = [FLAG_ALIASES.get(arg, arg) for arg in value_flags(overrides)]
    sys.argv = [f"medsec {verb}", *overrides]  # Hydra reads its overrides from sys.argv
    hydra_app(verb, lazy_command(VERBS[verb][0]))()  # conf/<verb>.yaml
    return 0
