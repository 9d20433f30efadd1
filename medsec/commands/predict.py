"""`medsec predict ckpt_path=... input=...`: apply a trained run to new, unlabelled inputs.

``input``: an image file (PNG, JPEG, DICOM, NIfTI), a folder of them (for a 3D model, DICOM files
form one volume per series), a CSV listing files or series folders (column ``input_column``), or
an encrypted record store (with ``protect=[aes]``). The inputs go through the training run's own
evaluation transforms (stored in the checkpoint), so predictions equal ``medsec eval``'s on the
same images. What is written per problem: :mod:`medsec.utils.predict`.
"""
from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from medsec.core.app import hydra_app

log = logging.getLogger("medsec.predict")


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Predict every input of ``cfg.input``; returns the number of inputs and the files written."""
    from medsec.core.run import Run
    from medsec.utils.predict import Predictor, batches, open_inputs

    run = Run.open(cfg, read_data=False)
    sealer = run.protections.sealer
    if sealer is not None:
        sealer.encrypt_outputs = True  # predictions on patients' scans are as confidential as the scans
    inputs, reader = open_inputs(run, str(cfg.input), cfg.input_column, cfg.get("split"))
    hp = run.task.hparams
    transform = run.datamodule.transforms(reader, hp.spatial_dims, bool(hp.get("multilabel")), labelled=False)
    predictor = Predictor(run.task, run.writer, inputs, cfg.device)
    batch_size = cfg.batch_size or run.datamodule.eval_batch_size
    for index, (items, batch) in enumerate(batches(inputs, transform, batch_size)):
        predictor(items, batch, index)
    written = predictor.finish()
    log.info("%d input(s) predicted; results in %s", len(inputs), run.out_dir)
    return {"inputs": len(inputs), "problem": predictor.kind,
            "files": [p.relative_to(run.out_dir).as_posix() for p in written]}


main = hydra_app("predict", predict)

if __name__ == "__main__":
    main()
