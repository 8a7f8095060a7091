"""Which models made a prediction run, and the record of it: the checkpoints ``ckpt=`` names
(:func:`resolve_checkpoints`: files, or each training run's tested checkpoint in a folder) and
``predict.json`` (:func:`write_provenance`: checkpoints with their SHA-256, every option, the
operating point, versions, the files written per scan). See docs/predict.md, "predict.json".
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ichseg.checkpoint import TrainedModel
from ichseg.errors import ConfigError, IchsegError
from ichseg.inference.ensemble import Ensemble
from ichseg.inference.predictor import Predictor
from ichseg.inference.results import ScanResult
from ichseg.io.orientation import CTICH_ORIENTATION
from ichseg.utils.atomic import atomic_write_text

#: The provenance of a prediction run (:func:`write_provenance`).
PROVENANCE_FILE = "predict.json"
PROVENANCE_FORMAT = "ichseg-predict"
#: How deep below ``ckpt=<folder>`` run folders are looked for: the run folder itself, the runs of
#: a multirun folder, and those of a folder of multiruns.
RUN_DEPTHS: tuple[int, ...] = (0, 1, 2)
#: The checkpoint of a training run folder that ``ckpt=<folder>`` takes: its tested (best) one.
BEST_PATTERN = "best*.ckpt"


def resolve_checkpoints(ckpt: str | os.PathLike[str] | Sequence[Any]) -> list[Path]:
    """The checkpoint files ``ckpt`` names: a file, a list of files, or a folder of training runs
    (a multirun folder of CV rounds, or one run folder), of which each run's tested checkpoint:
    the one its report names (``settings.operating_point_file``), else its only ``best*.ckpt``.

    Raises :class:`~ichseg.errors.ConfigError` (one line naming the path) when a file is missing
    or a folder holds no run, or a run several best checkpoints and no report naming one.
    """
    if isinstance(ckpt, (str, os.PathLike)):
        items: list[Any] = [ckpt]
    else:
        items = list(ckpt)
    if not items:
        raise ConfigError("ckpt names no checkpoint")
    found: list[Path] = []
    for item in items:
        path = Path(str(item)).expanduser()
        if path.is_dir():
            found += _run_checkpoints(path)
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"{path}: checkpoint not found")
    resolved = [p.resolve() for p in found]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise ConfigError(f"{path}: named twice in ckpt")
    return found


def _run_checkpoints(folder: Path) -> list[Path]:
    """Each training run's tested checkpoint under ``folder`` (natural order of run folders)."""
    import json
    import re

    def natural(path: Path) -> list[Any]:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]

    runs = sorted(
        {
            p.parent.parent
            for depth in RUN_DEPTHS
            for p in folder.glob(f"{'*/' * depth}checkpoints/{BEST_PATTERN}")
        },
        key=natural,
    )
    if not runs:
        raise ConfigError(
            f"{folder}: no training run with a checkpoints/{BEST_PATTERN} in this folder; name "
            "the checkpoint files (ckpt=[a.ckpt,b.ckpt])"
        )
    chosen = []
    for run in runs:
        named = None
        for report in sorted(run.rglob("report.json")):
            try:
                settings = json.loads(report.read_text(encoding="utf-8")).get("settings", {})
                named = Path(settings["operating_point_file"])
            except (OSError, ValueError, AttributeError, KeyError, TypeError):
                continue
            if named.is_file():
                break
            named = None
        best = sorted((run / "checkpoints").glob(BEST_PATTERN))
        if named is None and len(best) > 1:
            raise ConfigError(
                f"{run}: {len(best)} best checkpoints and no report naming the tested one; name "
                "the files (ckpt=[...])"
            )
        chosen.append(named or best[0])
    return chosen


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, in hex."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_provenance(output: Path) -> None:
    """Refuse an output folder whose ``predict.json`` was not written by ichseg.predict."""
    import json

    target = output / PROVENANCE_FILE
    if not target.exists():
        return
    try:
        ours = json.loads(target.read_text(encoding="utf-8")).get("format") == PROVENANCE_FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ConfigError(
            f"{target}: exists and was not written by ichseg.predict, so it is not replaced; "
            "move it or choose another output folder"
        )


def write_provenance(
    output: Path,
    models: Sequence[TrainedModel],
    predictor: Predictor | Ensemble,
    options: Mapping[str, Any],
    operating_point: str,
    results: Sequence[ScanResult],
    failures: Sequence[IchsegError] = (),
) -> Path:
    """Write ``predict.json`` atomically: what made the masks of this run (checkpoint files and
    their SHA-256, every option, the operating point and where it came from, the versions) and
    what was written for each scan."""
    import datetime
    import platform

    from ichseg import __version__
    from ichseg.eval.report import dumps_json

    ensemble = predictor if isinstance(predictor, Ensemble) else Ensemble([predictor])
    document = {
        "format": PROVENANCE_FORMAT,
        "version": 1,
        "ichseg_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(ensemble.device),
        "options": dict(options),
        "checkpoints": [
            {
                "path": str(model.path.resolve()),
                "sha256": file_sha256(model.path),
                "ichseg_version": model.meta.get("ichseg_version"),
                "operating_point": model.operating_point,
                "input": model.input_spec.to_dict(),
                "inference": model.inference_spec.to_dict(),
                "train_overrides": model.meta.get("train_overrides", []),
            }
            for model in models
        ],
        "ensemble": {
            "members": len(ensemble.members),
            "flip": ensemble.flip,
            "input": ensemble.input_spec.to_dict(),
            "orientation": list(ensemble.input_spec.orientation or CTICH_ORIENTATION),
        },
        "inference": ensemble.inference_spec.to_dict(),
        "operating_point": operating_point,
        "scans": [_scan_record(result) for result in results],
        "failures": [str(failure) for failure in failures],
    }
    target = output / PROVENANCE_FILE
    atomic_write_text(target, dumps_json(document))
    return target


def _scan_record(result: ScanResult) -> dict[str, Any]:
    """What ``predict.json`` says about one scan: its input and every file written for it."""

    def name(path: Path | None) -> str | None:
        return None if path is None else str(path.relative_to(result.mask_path.parent))

    return {
        "input": str(result.input),
        "name": result.name,
        "source": result.label,
        "mask": result.mask_path.name,
        "probabilities": name(result.probability_path),
        "uncertainty": name(result.uncertainty_path),
        "dicom_seg": name(result.seg_path),
        "qa_sheet": name(result.sheet_path),
        "orientation": "".join(result.orientation),
        "reoriented": result.reoriented,
        "ich_volume_ml": result.stats.ich_volume_ml,
        "member_volumes_ml": list(result.member_volumes_ml),
    }
