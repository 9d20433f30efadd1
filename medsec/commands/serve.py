"""`medsec serve ckpt_path=...`: serve the checkpoint's he_cnn to CKKS clients over HTTP(S).

What the service accepts and how it is bounded: :mod:`medsec.he.service`.
"""
from __future__ import annotations

import logging

import uvicorn
from omegaconf import DictConfig

from medsec.core.app import hydra_app
from medsec.core.run import Run
from medsec.errors import ConfigError
from medsec.he import HEProgram
from medsec.he.schemes import get_scheme
from medsec.he.service import build_app, serve_settings

log = logging.getLogger("medsec.serve")


def load_program(cfg: DictConfig) -> HEProgram:
    """The checkpoint's model compiled for CKKS, calibrated on its training images."""
    if cfg.scheme != "ckks":
        raise ConfigError(f"scheme: `medsec serve` speaks CKKS; scheme={cfg.scheme} runs with `medsec he` in one process")
    run = Run.open(cfg)
    calibration, _ = run.images("train", cfg.calibration_images)
    return get_scheme(cfg.scheme).compile(run.task.net.eval(), calibration)


def serve(cfg: DictConfig) -> None:
    """Check the settings, compile the model and serve until stopped."""
    settings = serve_settings(cfg)
    app = build_app(load_program(cfg), **settings["app"])
    scheme = "https" if settings["uvicorn"]["ssl_certfile"] else "http"
    log.info("serving %s on %s://%s:%d (%s; at most %d jobs at once)", cfg.ckpt_path, scheme, cfg.host, cfg.port,
             f"{len(settings['app']['tokens'])} bearer token(s)" if settings["app"]["tokens"] else "no authentication",
             settings["app"]["max_jobs"])
    uvicorn.run(app, log_level="info", access_log=False, **settings["uvicorn"])


main = hydra_app("serve", serve)

if __name__ == "__main__":
    main()
