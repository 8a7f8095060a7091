"""Apply a trained checkpoint to CT files: find the scans, predict each, write masks and volumes.

The library half of ``python -m ichseg.predict`` (its command line is :mod:`ichseg.cli.predict`):
:func:`load_predictor` rebuilds the evaluated predictor from a checkpoint (:func:`load_ensemble`
several of them as one :class:`~ichseg.inference.ensemble.Ensemble`), :func:`predict_files` writes
``<name>_ich_seg.nii.gz`` (and the optional files of :class:`OutputOptions`) and ``volumes.csv``
atomically, one scan after another; each scan is brought to the model's orientation first
(:mod:`ichseg.io.orientation`) and its outputs written in its own space. See docs/predict.md.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ichseg.checkpoint import TrainedModel, load_model
from ichseg.data.ctich import find_release
from ichseg.errors import ConfigError, DatasetError, IchsegError, first_line
from ichseg.inference.ensemble import Ensemble
from ichseg.inference.predictor import Predictor
from ichseg.io.nifti import nifti_stem, read_ct, save_like, spacing_volume_ml, voxel_spacing_mm
from ichseg.io.orientation import CTICH_ORIENTATION, Reorientation, reorientation
from ichseg.utils.atomic import atomic_write_text

#: ``<name>_ich_seg.nii.gz``: 3D Slicer loads a file named with ``_seg`` as a label map.
MASK_SUFFIX = "_ich_seg"
PROBABILITY_SUFFIX = "_prob"
UNCERTAINTY_SUFFIX = "_uncertainty"
#: The folder of the QA report (``qa/index.html`` and a ``<name>.png`` sheet per scan).
QA_FOLDER = "qa"
QA_INDEX = "index.html"
#: Name endings of files predictions write (this version's and earlier ones' ``_ich``): skipped
#: when such files are found in an input folder.
OUTPUT_SUFFIXES: tuple[str, ...] = ("_ich", MASK_SUFFIX, PROBABILITY_SUFFIX, UNCERTAINTY_SUFFIX)
VOLUMES_FILE = "volumes.csv"
#: The provenance of a prediction run (:func:`write_provenance`).
PROVENANCE_FILE = "predict.json"
PROVENANCE_FORMAT = "ichseg-predict"
#: The checkpoint of a training run folder that ``ckpt=<folder>`` takes: its tested (best) one.
BEST_PATTERN = "best*.ckpt"
#: The columns of ``volumes.csv`` written by earlier versions (still read and extended).
LEGACY_VOLUME_COLUMNS: tuple[str, ...] = (
    "file", "mask", "slices", "ich_slices", "ich_voxels", "voxel_volume_ml", "ich_volume_ml",
    "largest_component_ml", "seconds",
)  # fmt: skip
VOLUME_COLUMNS: tuple[str, ...] = (
    "file",
    "mask",
    "slices",
    "ich_slices",
    "ich_voxels",
    "voxel_volume_ml",
    "ich_volume_ml",
    "largest_component_ml",
    "components",
    "members",
    "member_min_ml",
    "member_max_ml",
    "orientation",
    "seconds",
)


class PredictionFailures(IchsegError):
    """Some scans failed; ``results`` holds the ones that succeeded, ``failures`` the errors."""

    def __init__(self, results: list[ScanResult], failures: list[IchsegError]) -> None:
        self.results = list(results)
        self.failures = list(failures)
        total = len(self.results) + len(self.failures)
        lines = "\n".join(str(failure) for failure in self.failures)
        super().__init__(f"{len(self.failures)} of {total} scan(s) failed:\n{lines}")


# --------------------------------------------------------------------------- the predictor


def load_predictor(
    ckpt: str | os.PathLike[str] | TrainedModel,
    device: str | torch.device = "auto",
    **inference: Any,
) -> Predictor:
    """The checkpoint's network and specs as a :class:`~ichseg.inference.Predictor` on
    ``device``; ``inference`` keyword arguments (fields of :class:`~ichseg.specs.InferenceSpec`,
    e.g. ``threshold=0.6``) override the stored spec, None meaning "as stored".

    Raises :class:`~ichseg.checkpoint.CheckpointError` for anything that is not a usable ichseg
    checkpoint and :class:`~ichseg.errors.ConfigError` for a bad override.
    """
    model = ckpt if isinstance(ckpt, TrainedModel) else load_model(ckpt)
    spec = model.inference_spec.updated(inference)
    run_device = resolve_device(device)
    return Predictor(model.net.to(run_device), model.input_spec, spec, run_device)


def load_ensemble(
    models: Sequence[TrainedModel],
    device: str | torch.device = "auto",
    flip: bool = False,
    **inference: Any,
) -> Ensemble:
    """The models as one :class:`~ichseg.inference.ensemble.Ensemble` on ``device``, each with
    ``inference`` overrides of its stored spec; the ensemble's operating point is the overrides'
    where given, else combined from the members' (median threshold, majority post-processing).

    Raises :class:`~ichseg.errors.ConfigError` naming a member whose specs differ.
    """
    members = [load_predictor(model, device, **inference) for model in models]
    names = [str(model.path) for model in models]
    return Ensemble(members, flip=flip, names=names)


def operating_point_line(
    model: TrainedModel | Sequence[TrainedModel],
    predictor: Predictor | Ensemble,
    given: Mapping[str, Any],
) -> str:
    """One line: the threshold and post-processing applied, and where they came from."""
    models = [model] if isinstance(model, TrainedModel) else list(model)
    spec = predictor.inference_spec
    post = (
        f"closing {spec.closing_size} / opening {spec.opening_size} at {spec.reference_size}"
        if spec.postprocess
        else "no closing / opening"
    )
    chosen = {k for k in ("threshold", "postprocess") if given.get(k) is not None}
    point = models[0].operating_point
    if chosen == {"threshold", "postprocess"}:
        source = "from the command line"
    elif len(models) > 1:
        thresholds = ", ".join(f"{m.inference_spec.threshold:g}" for m in models)
        source = (
            f"ensemble of {len(models)} models: median of their thresholds ({thresholds}), "
            f"post-processing as {sum(m.inference_spec.postprocess for m in models)} of them"
        )
        if chosen:
            source += f"; {' and '.join(sorted(chosen))} from the command line"
    else:
        model = models[0]
        source = f"stored in {model.path.name}: {point.get('source', 'configured')}"
        if point.get("val_dice") is not None:
            source += f", validation Dice {point['val_dice']:.3f}"
        if chosen:
            source += f"; {' and '.join(sorted(chosen))} from the command line"
    if isinstance(predictor, Ensemble) and predictor.flip:
        source += "; left-right flip averaged"
    return f"operating point: threshold {spec.threshold:g}, {post} ({source})"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise the named device, which must exist."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "device=cuda was asked for but no CUDA GPU is available; use device=auto or cpu"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA device(s))"
            )
    elif resolved.type != "cpu":
        raise ConfigError(f"unsupported device {device!r}; use auto, cpu or cuda")
    return resolved


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
        {p.parent.parent for p in folder.rglob(f"checkpoints/{BEST_PATTERN}")}, key=natural
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


# --------------------------------------------------------------------------- volumes


@dataclass(frozen=True)
class VolumeStats:
    """ICH volume of one binary mask: counts, and volumes in mL from the voxel volume."""

    slices: int
    ich_slices: int
    ich_voxels: int
    largest_component_voxels: int
    voxel_volume_ml: float
    components: int = 0

    @property
    def ich_volume_ml(self) -> float:
        """Voxel count x voxel volume."""
        return self.ich_voxels * self.voxel_volume_ml

    @property
    def largest_component_ml(self) -> float:
        """Volume of the largest face-connected 3D component."""
        return self.largest_component_voxels * self.voxel_volume_ml


def volume_stats(mask: np.ndarray, voxel_volume_ml: float) -> VolumeStats:
    """Volume figures of an ``(H, W, N)`` mask (slices on the third axis).

    Components are face-connected in 3D (6 neighbours; ``scipy.ndimage.label``'s default).
    """
    mask = np.asarray(mask, dtype=bool)
    components, count = ndimage.label(mask)
    largest = int(np.bincount(components.ravel())[1:].max()) if count else 0
    return VolumeStats(
        slices=int(mask.shape[2]),
        ich_slices=int(mask.any(axis=(0, 1)).sum()),
        ich_voxels=int(np.count_nonzero(mask)),
        largest_component_voxels=largest,
        voxel_volume_ml=float(voxel_volume_ml),
        components=int(count),
    )


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class OutputOptions:
    """Which files :func:`predict_files` writes besides ``<name>_ich_seg.nii.gz``.

    Attributes:
        probabilities: ``<name>_prob.nii.gz``, float32 probabilities before threshold and
            morphology (an ensemble's mean).
        uncertainty: ``<name>_uncertainty.nii.gz``, the per-voxel standard deviation across an
            ensemble's members (and flips); written only when there are several passes.
        dicom_seg: for a DICOM series, also ``<name>_ich_seg.dcm``, the mask as a DICOM SEG that
            references the series (``ichseg[dicom]``; NIfTI inputs have no series to reference).
        qa: the visual QA report: ``qa/<name>.png`` per scan (:func:`ichseg.inference.qa.qa_sheet`)
            and ``qa/index.html`` listing every scan of ``volumes.csv`` with its sheet.
    """

    probabilities: bool = False
    uncertainty: bool = True
    dicom_seg: bool = False
    qa: bool = False


def read_scan(scan: ScanInput) -> tuple[np.ndarray, Any, tuple[float, float, float]]:
    """An input's ``(X, Y, Z)`` int16 HU volume, the NIfTI image whose space outputs are written
    in, and its voxel sizes in mm (as stored in the file's header)."""
    if scan.series is not None:
        from ichseg.io.dicom import read_series

        image = read_series(scan.series)
        hu = np.asarray(image.dataobj, dtype=np.int16)
        zooms = image.header.get_zooms()
        return hu, image, (float(zooms[0]), float(zooms[1]), float(zooms[2]))
    hu, image = read_ct(scan.path)
    assert hu is not None
    spacing = voxel_spacing_mm(scan.path, image)  # the raw header's sizes
    return hu, image, (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def scan_reorientation(image: Any, predictor: Predictor | Ensemble, path: Path) -> Reorientation:
    """How a scan's array is brought to the orientation the model was trained on."""
    target = predictor.input_spec.orientation or CTICH_ORIENTATION
    try:
        return reorientation(image.affine, target)
    except ValueError as err:
        raise DatasetError(f"{path}: cannot tell the scan's orientation ({err})", path) from None


def predict_file(
    predictor: Predictor | Ensemble,
    scan: ScanInput,
    output: Path,
    save_probabilities: bool = False,
    progress: Any = None,
    options: OutputOptions | None = None,
) -> ScanResult:
    """Predict one scan and write ``<name>_ich_seg.nii.gz`` (and the files of ``options``) in the
    scan's own space; the network sees it in the model's orientation."""
    start = time.perf_counter()
    options = options or OutputOptions(probabilities=save_probabilities)
    ensemble = predictor if isinstance(predictor, Ensemble) else Ensemble([predictor])
    hu, image, spacing = read_scan(scan)
    voxel_ml = spacing_volume_ml(spacing)
    reorient = scan_reorientation(image, ensemble, scan.path)
    targets = {
        "mask": output / f"{scan.name}{MASK_SUFFIX}.nii.gz",
        "probabilities": output / f"{scan.name}{PROBABILITY_SUFFIX}.nii.gz"
        if options.probabilities else None,
        "uncertainty": output / f"{scan.name}{UNCERTAINTY_SUFFIX}.nii.gz"
        if options.uncertainty and not ensemble.single else None,
    }  # fmt: skip
    seg_path = (
        output / f"{scan.name}{MASK_SUFFIX}.dcm"
        if options.dicom_seg and scan.series is not None else None
    )  # fmt: skip
    sheet_path = output / QA_FOLDER / f"{scan.name}.png" if options.qa else None
    for target in targets.values():
        if target is not None:
            check_replaceable(target)
    if seg_path is not None:
        check_replaceable_seg(seg_path)
    network_hu = reorient.forward(hu)
    prediction = ensemble.predict_hu(network_hu, progress)
    images = {
        "mask": (prediction.mask.astype(np.uint8), "ichseg ICH mask"),
        "probabilities": (prediction.probabilities, "ichseg ICH probability"),
        "uncertainty": (prediction.spread, "ichseg ICH uncertainty (std across models)"),
    }
    try:
        for key, target in targets.items():
            data, description = images[key]
            if target is not None and data is not None:
                data = np.ascontiguousarray(reorient.backward(data))
                save_like(image, data, target, description)
        if seg_path is not None:
            from ichseg.io.dicom import write_seg

            write_seg(reorient.backward(prediction.mask), scan.series, seg_path)
        if sheet_path is not None:
            from ichseg.inference.qa import write_qa_sheet

            sheet_path.parent.mkdir(exist_ok=True)
            write_qa_sheet(
                network_hu, prediction.mask, reorient.spacing(spacing), scan.name, sheet_path,
                probabilities=prediction.probabilities,
            )  # fmt: skip
    except OSError as err:
        raise DatasetError(
            f"{output}: cannot write the prediction of {scan.path.name} ({err.strerror or err})",
            output,
        ) from None
    stats = volume_stats(prediction.mask, voxel_ml)
    return ScanResult(
        scan.path,
        targets["mask"],
        targets["probabilities"],
        stats,
        time.perf_counter() - start,
        uncertainty_path=targets["uncertainty"],
        member_volumes_ml=tuple(v * voxel_ml for v in prediction.member_voxels),
        orientation=reorient.source,
        reoriented=not reorient.identity,
        seg_path=seg_path,
        sheet_path=sheet_path,
        name=scan.name,
        label=scan.label,
    )


#: The start of the ``descrip`` field of every image ichseg.predict writes.
_OWN_DESCRIPTION = b"ichseg ICH"


def check_replaceable(target: Path) -> None:
    """Refuse to replace ``target`` unless it is missing or an image ichseg.predict wrote
    (its header's description starts with "ichseg ICH"): a user's own file of that name is kept.
    """
    if not target.exists() and not target.is_symlink():
        return
    import nibabel as nib

    try:
        description = bytes(nib.load(target).header["descrip"].item()) if target.is_file() else b""
    except Exception:  # not a NIfTI file at all: someone else's
        description = b""
    if not description.startswith(_OWN_DESCRIPTION):
        raise DatasetError(
            f"{target}: exists and was not written by ichseg.predict, so it is not replaced; "
            "move it or choose another output folder",
            target,
        )


def check_replaceable_seg(target: Path) -> None:
    """Refuse to replace a ``.dcm`` that is not a DICOM SEG ichseg.predict wrote."""
    if not target.exists() and not target.is_symlink():
        return
    try:
        import pydicom

        dataset = pydicom.dcmread(target, stop_before_pixels=True)
        ours = dataset.get("Modality") == "SEG" and dataset.get("Manufacturer") == "ichseg"
    except Exception:  # not DICOM, or no pydicom: not ours to replace
        ours = False
    if not ours:
        raise DatasetError(
            f"{target}: exists and was not written by ichseg.predict, so it is not replaced; "
            "move it or choose another output folder",
            target,
        )


@dataclass(frozen=True)
class ScanInput:
    """One input scan: its file (a DICOM series: its folder) and the name its outputs are given
    (``<name>_ich_seg.nii.gz``); ``series`` is the :class:`~ichseg.io.dicom.DicomSeries` of a
    DICOM input, None for a NIfTI file."""

    path: Path
    name: str
    series: Any = None

    @property
    def label(self) -> str:
        """How messages name the scan: the file name, or the series."""
        return self.path.name if self.series is None else self.series.description


@dataclass(frozen=True)
class ScanResult:
    """What prediction wrote for one scan and the volume figures of its mask."""

    input: Path
    mask_path: Path
    probability_path: Path | None
    stats: VolumeStats
    seconds: float
    uncertainty_path: Path | None = None
    #: Each ensemble member's own ICH volume (one value for a single model).
    member_volumes_ml: tuple[float, ...] = ()
    #: The scan's array orientation (axis codes) and whether it was reoriented for the network.
    orientation: tuple[str, ...] = CTICH_ORIENTATION
    reoriented: bool = False
    seg_path: Path | None = None
    sheet_path: Path | None = None
    #: The input's name (``<name>_ich_seg.nii.gz``) and how messages call it.
    name: str = ""
    label: str = ""

    @property
    def interval_ml(self) -> tuple[float, float] | None:
        """The members' smallest and largest volume, None for a single model."""
        if len(self.member_volumes_ml) < 2:
            return None
        return min(self.member_volumes_ml), max(self.member_volumes_ml)

    def row(self) -> dict[str, str]:
        """The scan's ``volumes.csv`` row."""
        stats = self.stats
        interval = self.interval_ml
        return {
            "file": str(self.input),
            "mask": self.mask_path.name,
            "slices": str(stats.slices),
            "ich_slices": str(stats.ich_slices),
            "ich_voxels": str(stats.ich_voxels),
            "voxel_volume_ml": f"{stats.voxel_volume_ml:.6g}",
            "ich_volume_ml": f"{stats.ich_volume_ml:.6f}",
            "largest_component_ml": f"{stats.largest_component_ml:.6f}",
            "components": str(stats.components),
            "members": str(max(1, len(self.member_volumes_ml))),
            "member_min_ml": "" if interval is None else f"{interval[0]:.6f}",
            "member_max_ml": "" if interval is None else f"{interval[1]:.6f}",
            "orientation": "".join(self.orientation),
            "seconds": f"{self.seconds:.2f}",
        }


def find_inputs(source: str | os.PathLike[str]) -> list[ScanInput]:
    """The scans of ``source``: a NIfTI file, a folder of them, or a CT-ICH NIfTI release root.

    A folder's own ``.nii`` / ``.nii.gz`` files are taken (not its subfolders), except earlier
    outputs (:data:`OUTPUT_SUFFIXES`); a release root contributes ``ct_scans/``. The JPG release is
    refused: its 8-bit images carry neither Hounsfield units nor voxel sizes.
    """
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"{source}: input not found", source)
    if source.is_file():
        name = nifti_stem(source)
        if name is None:
            raise DatasetError(
                f"{source}: not a NIfTI file (expected .nii or .nii.gz; for DICOM, give the "
                "folder of the series)",
                source,
            )
        return [ScanInput(source, name)]
    folder = source
    try:
        root, release = find_release(source)
    except DatasetError:
        root, release = None, None
    if release == "jpg":
        raise DatasetError(
            f"{root}: the CT-ICH JPG release (1.0-1.2) cannot be used for prediction: its 8-bit "
            "window images have no Hounsfield units and no voxel size; use the NIfTI release 1.3.x",
            root,
        )
    if release == "nifti" and root is not None:
        folder = root / "ct_scans"
        if not folder.is_dir():
            raise DatasetError(f"{folder}: the NIfTI release has no ct_scans/ folder", folder)
    scans = []
    for path in sorted(folder.iterdir()):
        name = nifti_stem(path)
        if name is None or not path.is_file():
            continue
        if folder == source and name.endswith(OUTPUT_SUFFIXES):
            continue  # an earlier prediction written into the input folder
        scans.append(ScanInput(path, name))
    if not scans and release is None:
        from ichseg.io.dicom import find_series, is_dicom_folder

        if is_dicom_folder(folder):
            series = find_series(folder)
            if not series:
                raise DatasetError(f"{folder}: no DICOM image series in this folder", folder)
            return [ScanInput(item.folder, item.name, item) for item in series]
    if not scans:
        raise DatasetError(
            f"{folder}: no NIfTI scans (.nii or .nii.gz) and no DICOM series in this folder", folder
        )
    names: dict[str, Path] = {}
    for scan in scans:
        if scan.name in names:
            raise DatasetError(
                f"{scan.path}: two scans named {scan.name!r} ({names[scan.name].name} and "
                f"{scan.path.name}) would write the same outputs",
                scan.path,
            )
        names[scan.name] = scan.path
    return scans


def check_output(output: str | os.PathLike[str]) -> Path:
    """Refuse an output that cannot become the output folder, without creating anything: a NIfTI
    file name, an existing file, or a path below a file or in a folder that is not writable."""
    output = Path(output)
    if nifti_stem(output) is not None:
        raise ConfigError(
            f"{output}: output is the folder for the masks and volumes.csv, not a NIfTI file name"
        )
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output}: the output exists and is not a folder")
    ancestor = output.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{output}: cannot create the output folder ({ancestor} is a file)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{output}: cannot create the output folder ({ancestor} is not writable)")
    return output


def prepare_output(output: str | os.PathLike[str]) -> Path:
    """Create the output folder if needed and check that files can be written into it."""
    output = check_output(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{output}: the output exists and is not a folder") from None
    except OSError as err:
        raise ConfigError(
            f"{output}: cannot create the output folder ({err.strerror or err})"
        ) from None
    if not output.is_dir():
        raise ConfigError(f"{output}: the output exists and is not a folder")
    try:
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as err:
        raise ConfigError(
            f"{output}: the output folder is not writable ({err.strerror or err})"
        ) from None
    return output


def read_volumes(target: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of an earlier ``volumes.csv`` (none when it does not exist).

    Raises :class:`~ichseg.errors.DatasetError` naming the file when it is unreadable or not a
    ``volumes.csv`` of ichseg.predict (other columns), so it is never overwritten.
    """
    target = Path(target)
    if not target.exists():
        return []
    try:
        with open(target, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = tuple(reader.fieldnames or ())
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        reason = getattr(err, "strerror", None) or first_line(err)
        raise DatasetError(
            f"{target}: cannot read the earlier volumes ({reason})", target
        ) from None
    known = columns in (VOLUME_COLUMNS, LEGACY_VOLUME_COLUMNS)
    if not known or any(None in row or not row.get("mask") for row in rows):
        raise DatasetError(
            f"{target}: not a {VOLUMES_FILE} written by ichseg.predict (expected the columns "
            f"{','.join(VOLUME_COLUMNS)}), so it is not replaced; move it or choose another "
            "output folder",
            target,
        )
    return rows


def write_volumes(
    results: Sequence[ScanResult], target: Path, earlier: Sequence[Mapping[str, str]] = ()
) -> None:
    """Write ``volumes.csv`` (one row per scan, :data:`VOLUME_COLUMNS`) atomically.

    ``earlier`` rows (:func:`read_volumes`, from an earlier run into the same folder) are kept, in
    their order, except those of a mask predicted again, which the new row replaces in place; rows
    of masks not there before follow.
    """
    new = {result.mask_path.name: result.row() for result in results}
    blank = dict.fromkeys(VOLUME_COLUMNS, "")
    rows = [new.pop(row["mask"], {**blank, **row}) for row in earlier]
    rows += list(new.values())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=VOLUME_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(target, buffer.getvalue())


def predict_files(
    predictor: Predictor | Ensemble,
    scans: Sequence[ScanInput],
    output: str | os.PathLike[str],
    save_probabilities: bool = False,
    progress: bool = True,
    on_result: Callable[[ScanResult], None] | None = None,
    options: OutputOptions | None = None,
) -> list[ScanResult]:
    """Predict every scan into ``output`` and keep ``output/volumes.csv`` up to date.

    ``predictor`` is one model's :class:`~ichseg.inference.Predictor` or an
    :class:`~ichseg.inference.ensemble.Ensemble`; ``options`` says which files are written besides
    the masks (default: the probabilities when ``save_probabilities``, an ensemble's uncertainty).
    Each scan's files, and ``volumes.csv`` after each scan, are written atomically, so an
    interrupted run leaves only complete files; rows of an earlier run's ``volumes.csv`` are
    kept, those of the scans predicted again replaced. A scan that fails (unreadable header or
    data, no usable voxel sizes, NaN, not 3D, an output file of that name ichseg did not write,
    ...) is skipped and the others go on; then :class:`PredictionFailures` is raised, listing them.
    ``progress`` shows tqdm bars over scans and over the windows of the current scan (on a
    terminal only).
    """
    from tqdm.auto import tqdm

    options = options or OutputOptions(probabilities=save_probabilities)
    ensemble = predictor if isinstance(predictor, Ensemble) else Ensemble([predictor])
    output = prepare_output(output)
    earlier = read_volumes(output / VOLUMES_FILE)
    results: list[ScanResult] = []
    failures: list[IchsegError] = []
    per_slice = ensemble.input_spec.tiles_per_slice * ensemble.passes
    unit = "tile" if ensemble.input_spec.mode == "windowed" else "slice"
    disable = None if progress else True  # None: only on a terminal
    with tqdm(scans, desc="scans", unit="scan", disable=disable, position=0) as bar:
        for scan in bar:
            bar.set_postfix_str(scan.name)
            try:
                shape = scan_shape(scan, ensemble)
                with tqdm(
                    total=shape[2] * per_slice, desc=scan.name, unit=unit, leave=False,
                    disable=disable, position=1,
                ) as inner:  # fmt: skip
                    result = predict_file(ensemble, scan, output, progress=inner, options=options)
            except IchsegError as err:
                failures.append(err)
                continue
            except torch.cuda.OutOfMemoryError:
                failures.append(
                    ConfigError(
                        f"{scan.path}: out of {ensemble.device.type.upper()} memory; "
                        "lower inference.tile_batch_size"
                    )
                )
                continue
            results.append(result)
            write_volumes(results, output / VOLUMES_FILE, earlier)
            if options.qa:
                write_qa_index(output)
            if on_result is not None:
                on_result(result)
    if failures:
        if len(failures) == 1 and not results:
            raise failures[0]
        raise PredictionFailures(results, failures)
    return results


def write_qa_index(output: Path, note: str | None = None) -> Path:
    """(Re)write ``qa/index.html``: every scan of ``volumes.csv`` that has a QA sheet in
    ``qa/``, with its volume, the members' interval, components and sheet, sorted by volume."""
    from ichseg.inference.qa import QARow
    from ichseg.inference.qa import write_qa_index as write_index

    def number(text: str, default: float = 0.0) -> float:
        try:
            return float(text)
        except (TypeError, ValueError):
            return default

    rows = []
    for row in read_volumes(output / VOLUMES_FILE):
        mask = row["mask"]
        name = next(
            (
                mask[: -len(end)]
                for end in (f"{MASK_SUFFIX}.nii.gz", "_ich.nii.gz")
                if mask.endswith(end)
            ),
            mask,
        )
        if not (output / QA_FOLDER / f"{name}.png").is_file():
            continue
        low, high = row.get("member_min_ml", ""), row.get("member_max_ml", "")
        rows.append(
            QARow(
                name=name,
                volume_ml=number(row["ich_volume_ml"]),
                interval_ml=(number(low), number(high)) if low and high else None,
                largest_component_ml=number(row["largest_component_ml"]),
                components=int(number(row.get("components", ""))),
                ich_slices=int(number(row["ich_slices"])),
                slices=int(number(row["slices"])),
                sheet=f"{name}.png",
                mask=f"../{mask}",
            )
        )
    target = output / QA_FOLDER / QA_INDEX
    target.parent.mkdir(exist_ok=True)
    write_index(rows, target, title=f"ichseg predictions: {output.name}", note=note)
    return target


def scan_shape(scan: ScanInput, predictor: Predictor | Ensemble) -> tuple[int, int, int]:
    """A scan's shape in the model's orientation, from its header alone (slices last; a DICOM
    series: its files are taken as the slices)."""
    if scan.series is not None:
        return 0, 0, len(scan.series.files)
    _, image = read_ct(scan.path, header_only=True)
    return scan_reorientation(image, predictor, scan.path).shape(image.shape)
