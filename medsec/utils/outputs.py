"""Where verbs write per-run results: plainly, or sealed by a security stage; and which run a file
belongs to (``run.json``, whose run id sealed files are bound to)."""
from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsec.errors import SecurityError

RUN_FILE = "run.json"
MAX_RUN_DEPTH = 8
"""How many directories above a file :func:`find_run` looks for ``run.json``."""


def ensure_run_id(run_dir: str | Path) -> str:
    """The run id of ``run_dir``, created (random, in ``run.json``) by the first caller; DDP ranks
    and later verbs writing into the same directory read the same id."""
    path = Path(run_dir) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        return read_run_id(path)
    run_id = uuid.uuid4().hex
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps({"run_id": run_id}) + "\n")
    return run_id


def read_run_id(path: Path) -> str:
    try:
        run_id = json.loads(path.read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SecurityError(f"{path} is damaged ({type(err).__name__}); it names the run sealed files belong to") from None
    if not isinstance(run_id, str) or not run_id:
        raise SecurityError(f"{path} is damaged (field 'run_id')")
    return run_id


def find_run(path: str | Path) -> tuple[str, str]:
    """(``path`` relative to its run directory, that run's id): the nearest directory above
    ``path`` holding ``run.json``."""
    path = Path(path).absolute()
    for root in list(path.parents)[:MAX_RUN_DEPTH]:
        if (root / RUN_FILE).is_file():
            return path.relative_to(root).as_posix(), read_run_id(root / RUN_FILE)
    raise SecurityError(f"{path} is not inside a medsec run directory (no {RUN_FILE} above it): sealed files are "
                        "bound to their place in their run; copy or move the run directory whole")


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` (never through a symlink), then
    rename it over ``path``: an interrupted write never leaves a half-written file under the name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class OutputWriter:
    """Writes per-run result files under a run directory, each atomically (temporary file, then
    rename), so an interrupted run never leaves a half-written file under the final name.

    Security stages subclass it to encrypt what is written (``crypto.encrypt_outputs``).
    """

    suffix = ""
    sealed = False

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def encode(self, data: bytes, path: Path) -> bytes:
        """The bytes stored at ``path`` for ``data`` (identity here; encryption in sealed writers)."""
        return data

    def write(self, name: str, data: bytes) -> Path:
        """Store ``data`` as ``root/name`` (plus :attr:`suffix`); returns the path written."""
        path = self.root / (name + self.suffix)
        return atomic_write(path, self.encode(data, path))

    def write_json(self, name: str, payload: Mapping[str, Any]) -> Path:
        """Store ``payload`` as pretty, sorted JSON under ``name``."""
        return self.write(name, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())

    # Typed artifacts: a task hands over what it made, the writer picks the file format (and
    # every one goes through :meth:`write`, so a sealing writer seals them all).
    def write_table(self, name: str, header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> Path:
        """Store a table as ``name.csv`` (one header row, then ``rows``)."""
        buffer = io.StringIO()
        out = csv.writer(buffer)
        out.writerow(header)
        out.writerows(rows)
        return self.write(f"{name}.csv", buffer.getvalue().encode())

    def write_label_map(self, name: str, labels: np.ndarray, affine: np.ndarray) -> Path:
        """Store a label map (a predicted segmentation) with its voxel-to-world ``affine`` as
        ``name.nii.gz`` (NIfTI-1, what medical viewers open)."""
        from medsec.data.segmentation import nifti_bytes

        return self.write(f"{name}.nii.gz", nifti_bytes(labels, affine))
