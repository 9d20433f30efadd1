"""What ``medsec predict`` does with a trained run and new inputs: read them through the training
run's own evaluation transforms, run the model, and write per problem:

- classification: ``predictions.csv``, one row per input: ``id``, ``prob_<class>`` under the
  checkpoint's class names, ``predicted`` (multi-label: the ``|``-joined classes at p >= 0.5);
- segmentation: ``labels/<input>.nii.gz``, the label map on the input's grid with its affine (a
  reoriented or resampled pipeline is undone), plus ``labels/<input>.seg.dcm`` (DICOM SEG) for
  DICOM inputs;
- denoising: ``denoised/<input>`` in the input's format (PNG/JPEG, NIfTI with its affine, DICOM
  as a derived instance; series and stored records as NIfTI).

Everything goes through the run's writer, so ``protect=[aes]`` seals it.
"""
from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import Dataset, MetaTensor, list_data_collate
from monai.transforms import Compose, ResampleToMatch, Resize

from medsec.data.inputs import CheckInputd, Input, find_inputs, input_reader, is_store, store_inputs
from medsec.data.intensity import intensity_modality
from medsec.errors import ConfigError, DataError, user_error_message
from medsec.utils.outputs import OutputWriter

_SUFFIX = re.compile(r"\.(nii\.gz|nii|png|jpe?g|bmp|dcm|dicom)$", re.IGNORECASE)


def problem_of(task: Any) -> str:
    """``classification``, ``segmentation``, ``denoising`` or ``detection``: what ``task`` predicts."""
    from medsec.tasks import ClassificationTask
    from medsec.tasks.denoising import DenoisingTask
    from medsec.tasks.detection import DetectionTask
    from medsec.tasks.segmentation import SegmentationTask

    for kind, cls in (("classification", ClassificationTask), ("segmentation", SegmentationTask),
                      ("denoising", DenoisingTask), ("detection", DetectionTask)):
        if isinstance(task, cls):
            return kind
    raise ConfigError(f"predict: a {type(task).__name__} checkpoint has no predictions to write "
                      "(classification, segmentation, denoising and detection have)")


def open_inputs(run: Any, location: str, column: str = "image", split: str | None = None) -> tuple[list[Input], Compose]:
    """The inputs at ``location`` and the reader that loads and checks one (see :mod:`medsec.data.inputs`);
    an encrypted store is opened with the run's AES key."""
    hp = run.task.hparams
    modality = intensity_modality(run.datamodule.intensity)
    path = Path(location).expanduser()
    if not is_store(path):
        return find_inputs(path, hp.spatial_dims, column), input_reader(hp.spatial_dims, modality)
    from medsec.protections.store import DecryptRecordd, RecordStore

    key = getattr(run.protections.sealer, "key", None)
    if key is None:
        raise ConfigError(f"input {path} is an encrypted store: add protect=[aes] with the key it was written with")
    store = RecordStore(path, key)
    return store_inputs(store, split), Compose([DecryptRecordd(store), CheckInputd(hp.spatial_dims, modality)])


def _named(item: Input, err: Exception) -> Exception:
    """``err`` as a :class:`DataError` naming the input's file, if it is a user error."""
    message = user_error_message(err)
    if message is None:
        return err
    where = str(item.path.parent if item.series else item.path) if item.path is not None else item.id
    return DataError(message if where in message else f"{where}: {message}")


def batches(inputs: Sequence[Input], transform: Compose, batch_size: int) -> Iterator[tuple[list[Input], dict[str, Any]]]:
    """The transformed inputs, collated in batches of up to ``batch_size`` consecutive inputs of
    one shape; a failure names the input's file."""
    dataset = Dataset([item.payload() for item in inputs], transform)
    pending: list[tuple[Input, dict[str, Any]]] = []
    for index, item in enumerate(inputs):
        try:
            sample = dataset[index]
        except Exception as err:  # user errors get the file's name, bugs pass unchanged
            raise _named(item, err) from err
        if pending and (len(pending) == batch_size or pending[0][1]["image"].shape != sample["image"].shape):
            yield [i for i, _ in pending], list_data_collate([s for _, s in pending])
            pending = []
        pending.append((item, sample))
    if pending:
        yield [i for i, _ in pending], list_data_collate([s for _, s in pending])


def output_names(inputs: Sequence[Input]) -> dict[str, str]:
    """A file name (``/`` kept for folders, nothing else but ``[A-Za-z0-9._-]``) for every input id,
    without the image suffix unless that makes two names equal."""
    def safe(name: str) -> str:
        parts = [re.sub(r"[^A-Za-z0-9._-]+", "_", p) for p in name.split("/") if p not in ("", ".", "..")]
        return "/".join(parts) or "input"

    for names in ({item.id: safe(_SUFFIX.sub("", item.id)) for item in inputs}, {item.id: safe(item.id) for item in inputs}):
        if len(set(names.values())) == len(names):
            return names
    seen: dict[str, str] = {}
    clash = next(f"{seen[n]!r} and {i!r}" for i, n in names.items() if seen.setdefault(n, i) != i)
    raise DataError(f"inputs {clash} would be written under one name; rename one of them")


def on_input_grid(values: torch.Tensor, sample: dict[str, Any], index: int, labels: bool) -> np.ndarray:
    """Channel-first ``values`` computed from input ``index`` of ``sample``, on that input's grid:
    resampled to its affine when the pipeline stored another one (a reoriented or resampled
    segmentation pipeline), resized when it only changed the size (``data.image_size``); label
    maps with nearest neighbours."""
    shape = tuple(int(s) for s in sample["input_shape"][index])
    target = sample["input_affine"][index]
    affine = sample["affine"][index].double() if "affine" in sample else target
    values = values.float().cpu()
    if not torch.allclose(affine, target, atol=1e-4):
        moved = ResampleToMatch(mode="nearest" if labels else "bilinear")(
            MetaTensor(values, affine=affine), img_dst=MetaTensor(torch.zeros(1, *shape), affine=target))
        return np.asarray(moved)
    if tuple(values.shape[1:]) != shape:
        mode = "nearest" if labels else ("bilinear" if len(shape) == 2 else "trilinear")
        return np.asarray(Resize(shape, mode=mode)(values))
    return values.numpy()


class Predictor:
    """Runs ``task`` on batches and writes what its problem produces through ``writer``."""

    def __init__(self, task: Any, writer: OutputWriter, inputs: Sequence[Input], device: str = "cpu") -> None:
        self.task = task.to(device).eval()
        self.kind = problem_of(task)
        self.writer, self.device = writer, torch.device(device)
        self.names = output_names(inputs)
        self.rows: list[list[Any]] = []
        self.written: list[Path] = []

    def __call__(self, items: list[Input], batch: dict[str, Any], index: int) -> None:
        batch = {**batch, "image": batch["image"].to(self.device)}
        with torch.inference_mode():
            output = self.task.predict_step(batch, index)
        output = output.cpu() if isinstance(output, torch.Tensor) else output  # detection: boxes per image
        write: Callable[[list[Input], dict[str, Any], torch.Tensor], None] = getattr(self, f"_{self.kind}")
        write(items, batch, output)

    def _classification(self, items: list[Input], batch: dict[str, Any], probs: torch.Tensor) -> None:
        names = self.task.class_names
        for item, row in zip(items, probs.float().tolist()):
            if self.task.hparams.multilabel:
                predicted = "|".join(n for n, p in zip(names, row) if p >= 0.5)
            else:
                predicted = names[int(np.argmax(row))]
            self.rows.append([item.id, *(f"{p:.6f}" for p in row), predicted])

    def _segmentation(self, items: list[Input], batch: dict[str, Any], labels: torch.Tensor) -> None:
        from medsec.data.dicom import seg_bytes

        for i, item in enumerate(items):
            grid = on_input_grid(labels[i], batch, i, labels=True)[0].astype(np.uint8)
            name = f"labels/{self.names[item.id]}"
            self.written.append(self.writer.write_label_map(name, grid, batch["input_affine"][i].numpy()))
            if item.from_dicom:
                files = list(item.image) if item.series else [item.image]
                model = type(self.task).__name__
                self.written.append(self.writer.write(f"{name}.seg.dcm", seg_bytes(files, grid, self.task.class_names,
                                                                                    model)))

    def _denoising(self, items: list[Input], batch: dict[str, Any], images: torch.Tensor) -> None:
        from medsec.data.segmentation import nifti_bytes

        for i, item in enumerate(items):
            affine = batch["input_affine"][i]
            values = np.clip(on_input_grid(images[i], batch, i, labels=False), 0.0, 1.0)
            name = f"denoised/{self.names[item.id]}"
            suffix = _SUFFIX.search(item.path.name) if item.path is not None and not item.series else None
            kind = suffix.group(1).lower() if suffix else "dcm" if item.from_dicom and not item.series else "nii.gz"
            if kind in ("png", "jpg", "jpeg", "bmp"):
                data = _picture_bytes(values, kind)
            elif kind in ("dcm", "dicom"):
                from medsec.data.dicom import derived_image_bytes

                data = derived_image_bytes(item.path, values[0])
            else:
                kind, data = "nii.gz", nifti_bytes(values[0] if len(values) == 1 else np.moveaxis(values, 0, -1),
                                                   affine.numpy())
            self.written.append(self.writer.write(f"{name}.{kind}", data))

    def _detection(self, items: list[Input], batch: dict[str, Any], detections: list[dict[str, torch.Tensor]]) -> None:
        """Boxes on each input's own grid (scaled back when the pipeline resized it)."""
        from medsec.tasks.detection import box_columns

        for i, (item, found) in enumerate(zip(items, detections)):
            scale = np.tile(np.asarray(batch["input_shape"][i], dtype=float) / np.asarray(batch["image"].shape[2:]), 2)
            for box, score, label in zip(found["boxes"].cpu().numpy(), found["scores"].tolist(), found["labels"].tolist()):
                columns = box_columns(box * scale)
                self.rows.append([item.id, self.task.class_names[int(label)], f"{score:.6f}", *columns.values()])

    def finish(self) -> list[Path]:
        """Write ``predictions.csv`` (classification) or ``detections.csv`` (detection: one row per
        box); returns every file written."""
        if self.kind == "classification":
            header = ["id", *(f"prob_{c}" for c in self.task.class_names), "predicted"]
            self.written.append(self.writer.write_table("predictions", header, self.rows))
        if self.kind == "detection":
            from medsec.tasks.detection import box_columns

            boxes = box_columns(np.zeros(2 * self.task.hparams.spatial_dims))
            self.written.append(self.writer.write_table("detections", ["id", "class", "score", *boxes], self.rows))
        return self.written


def _picture_bytes(values: np.ndarray, kind: str) -> bytes:
    """An 8-bit grey or RGB picture of channel-first ``values`` in [0, 1] (rows, columns)."""
    from PIL import Image

    pixels = np.rint(values * 255).astype(np.uint8)
    image = Image.fromarray(pixels[0] if len(pixels) == 1 else np.moveaxis(pixels[:3], 0, -1))
    buffer = io.BytesIO()
    image.save(buffer, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(kind, kind.upper()))
    return buffer.getvalue()
