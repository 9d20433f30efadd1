"""Where configs and data live, and composing configs outside the command line."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = Path(os.environ.get("MEDSEC_CONFIG_DIR", REPO_ROOT / "conf"))
DATA_DIR_ENV = "MEDSEC_DATA_DIR"


def default_data_dir() -> str:
    """``$MEDSEC_DATA_DIR``, else ``../shared/data`` beside the repository when it exists, else ``data/``."""
    if os.environ.get(DATA_DIR_ENV):
        return str(Path(os.environ[DATA_DIR_ENV]).expanduser().resolve())
    shared = REPO_ROOT.parent / "shared" / "data"
    return str(shared if shared.is_dir() else REPO_ROOT / "data")


def register_resolvers() -> None:
    """``${medsec_data_dir:}`` in configs resolves to :func:`default_data_dir`."""
    if not OmegaConf.has_resolver("medsec_data_dir"):
        OmegaConf.register_new_resolver("medsec_data_dir", default_data_dir)


def compose_config(verb: str, overrides: Sequence[str] = (), output_dir: str | Path | None = None) -> DictConfig:
    """Compose ``conf/<verb>.yaml`` with overrides, as the command line would, for use from Python
    (tests, notebooks). ``output_dir`` becomes the run directory."""
    register_resolvers()
    GlobalHydra.instance().clear()
    overrides = list(overrides)
    if output_dir is not None:
        overrides.append(f"hydra.run.dir={Path(output_dir).resolve()}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name=verb):
        cfg = compose(config_name=verb, overrides=overrides, return_hydra_config=True)
    run_dir = Path(cfg.hydra.run.dir).resolve()
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.name = verb
    HydraConfig.instance().set_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg
