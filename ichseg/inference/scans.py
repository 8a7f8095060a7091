"""Apply a trained checkpoint to CT files: find the scans, predict each, write masks and volumes.

The library half of ``python -m ichseg.predict`` (its command line is :mod:`ichseg.cli.predict`):
:func:`load_predictor` rebuilds the evaluated predictor from a checkpoint, :func:`predict_files`
writes ``<name>_ich.nii.gz`` (and ``<name>_prob.nii.gz``) and ``volumes.csv`` atomically, one scan
after another. See docs/predict.md.
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
from ichseg.inference.predictor import Predictor
from ichseg.io.nifti import nifti_stem, read_ct, save_like, spacing_volume_ml, voxel_spacing_mm
from ichseg.utils.atomic import atomic_write_text

MASK_SUFFIX = "_ich"
PROBABILITY_SUFFIX = "_prob"
VOLUMES_FILE = "volumes.csv"
VOLUME_COLUMNS: tuple[str, ...] = (
    "file",
    "mask",
    "slices",
    "ich_slices",
    "ich_voxels",
    "voxel_volume_ml",
    "ich_volume_ml",
    "largest_component_ml",
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


def operating_point_line(
    model: TrainedModel, predictor: Predictor, given: Mapping[str, Any]
) -> str:
    """One line: the threshold and post-processing applied, and where they came from."""
    spec = predictor.inference_spec
    post = (
        f"closing {spec.closing_size} / opening {spec.opening_size} at {spec.reference_size}"
        if spec.postprocess
        else "no closing / opening"
    )
    chosen = {k for k in ("threshold", "postprocess") if given.get(k) is not None}
    point = model.operating_point
    if chosen == {"threshold", "postprocess"}:
        source = "from the command line"
    else:
        source = f"stored in {model.path.name}: {point.get('source', 'configured')}"
        if point.get("val_dice") is not None:
            source += f", validation Dice {point['val_dice']:.3f}"
        if chosen:
            source += f"; {' and '.join(sorted(chosen))} from the command line"
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


# --------------------------------------------------------------------------- volumes


@dataclass(frozen=True)
class VolumeStats:
    """ICH volume of one binary mask: counts, and volumes in mL from the voxel volume."""

    slices: int
    ich_slices: int
    ich_voxels: int
    largest_component_voxels: int
    voxel_volume_ml: float

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
    )


# --------------------------------------------------------------------------- files


def predict_file(
    predictor: Predictor,
    scan: ScanInput,
    output: Path,
    save_probabilities: bool = False,
    progress: Any = None,
) -> ScanResult:
    """Predict one NIfTI scan and write ``<name>_ich.nii.gz`` (and ``<name>_prob.nii.gz``)."""
    start = time.perf_counter()
    hu, image = read_ct(scan.path)
    assert hu is not None
    voxel_ml = spacing_volume_ml(voxel_spacing_mm(scan.path, image))  # the raw header's sizes
    mask_path = output / f"{scan.name}{MASK_SUFFIX}.nii.gz"
    probability_path = (
        output / f"{scan.name}{PROBABILITY_SUFFIX}.nii.gz" if save_probabilities else None
    )
    for target in (mask_path, probability_path):
        if target is not None:
            check_replaceable(target)
    probabilities, mask = predictor.predict_hu(hu, progress)
    try:
        save_like(image, mask.astype(np.uint8), mask_path, "ichseg ICH mask")
        if probability_path is not None:
            save_like(
                image,
                probabilities.astype(np.float32, copy=False),
                probability_path,
                "ichseg ICH probability",
            )
    except OSError as err:
        raise DatasetError(
            f"{output}: cannot write the prediction of {scan.path.name} ({err.strerror or err})",
            output,
        ) from None
    stats = volume_stats(mask, voxel_ml)
    return ScanResult(scan.path, mask_path, probability_path, stats, time.perf_counter() - start)


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


@dataclass(frozen=True)
class ScanInput:
    """One input scan: its file and the name its outputs are given (``<name>_ich.nii.gz``)."""

    path: Path
    name: str


@dataclass(frozen=True)
class ScanResult:
    """What prediction wrote for one scan and the volume figures of its mask."""

    input: Path
    mask_path: Path
    probability_path: Path | None
    stats: VolumeStats
    seconds: float

    def row(self) -> dict[str, str]:
        """The scan's ``volumes.csv`` row."""
        stats = self.stats
        return {
            "file": str(self.input),
            "mask": self.mask_path.name,
            "slices": str(stats.slices),
            "ich_slices": str(stats.ich_slices),
            "ich_voxels": str(stats.ich_voxels),
            "voxel_volume_ml": f"{stats.voxel_volume_ml:.6g}",
            "ich_volume_ml": f"{stats.ich_volume_ml:.6f}",
            "largest_component_ml": f"{stats.largest_component_ml:.6f}",
            "seconds": f"{self.seconds:.2f}",
        }


def find_inputs(source: str | os.PathLike[str]) -> list[ScanInput]:
    """The scans of ``source``: a NIfTI file, a folder of them, or a CT-ICH NIfTI release root.

    A folder's own ``.nii`` / ``.nii.gz`` files are taken (not its subfolders), except earlier
    outputs (``*_ich`` / ``*_prob``); a release root contributes ``ct_scans/``. The JPG release is
    refused: its 8-bit images carry neither Hounsfield units nor voxel sizes.
    """
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"{source}: input not found", source)
    if source.is_file():
        name = nifti_stem(source)
        if name is None:
            raise DatasetError(f"{source}: not a NIfTI file (expected .nii or .nii.gz)", source)
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
        if folder == source and name.endswith((MASK_SUFFIX, PROBABILITY_SUFFIX)):
            continue  # an earlier prediction written into the input folder
        scans.append(ScanInput(path, name))
    if not scans:
        raise DatasetError(f"{folder}: no NIfTI scans (.nii or .nii.gz) in this folder", folder)
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
    if columns != VOLUME_COLUMNS or any(None in row or not row.get("mask") for row in rows):
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
    rows = [new.pop(row["mask"], dict(row)) for row in earlier]
    rows += list(new.values())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=VOLUME_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(target, buffer.getvalue())


def predict_files(
    predictor: Predictor,
    scans: Sequence[ScanInput],
    output: str | os.PathLike[str],
    save_probabilities: bool = False,
    progress: bool = True,
    on_result: Callable[[ScanResult], None] | None = None,
) -> list[ScanResult]:
    """Predict every scan into ``output`` and keep ``output/volumes.csv`` up to date.

    Each scan's files, and ``volumes.csv`` after each scan, are written atomically, so an
    interrupted run leaves only complete files; rows of an earlier run's ``volumes.csv`` are
    kept, those of the scans predicted again replaced. A scan that fails (unreadable header or
    data, no usable voxel sizes, NaN, not 3D, an output file of that name ichseg did not write,
    ...) is skipped and the others go on; then :class:`PredictionFailures` is raised, listing them.
    ``progress`` shows tqdm bars over scans and over the windows of the current scan (on a
    terminal only).
    """
    from tqdm.auto import tqdm

    output = prepare_output(output)
    earlier = read_volumes(output / VOLUMES_FILE)
    results: list[ScanResult] = []
    failures: list[IchsegError] = []
    per_slice = predictor.input_spec.tiles_per_slice
    unit = "tile" if predictor.input_spec.mode == "windowed" else "slice"
    disable = None if progress else True  # None: only on a terminal
    with tqdm(scans, desc="scans", unit="scan", disable=disable, position=0) as bar:
        for scan in bar:
            bar.set_postfix_str(scan.name)
            try:
                _, header_image = read_ct(scan.path, header_only=True)
                total = int(header_image.shape[2]) * per_slice
                with tqdm(
                    total=total, desc=scan.name, unit=unit, leave=False, disable=disable, position=1
                ) as inner:
                    result = predict_file(predictor, scan, output, save_probabilities, inner)
            except IchsegError as err:
                failures.append(err)
                continue
            except torch.cuda.OutOfMemoryError:
                failures.append(
                    ConfigError(
                        f"{scan.path}: out of {predictor.device.type.upper()} memory; "
                        "lower inference.tile_batch_size"
                    )
                )
                continue
            results.append(result)
            write_volumes(results, output / VOLUMES_FILE, earlier)
            if on_result is not None:
                on_result(result)
    if failures:
        if len(failures) == 1 and not results:
            raise failures[0]
        raise PredictionFailures(results, failures)
    return results
