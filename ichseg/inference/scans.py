"""Apply a trained checkpoint to CT files: find the scans, predict each, write masks and volumes.

The library half of ``python -m ichseg.predict`` (its command line is :mod:`ichseg.cli.predict`):
:func:`load_predictor` rebuilds the evaluated predictor from a checkpoint (:func:`load_ensemble`
several of them as one :class:`~ichseg.inference.ensemble.Ensemble`), :func:`predict_files` writes
``<name>_ich_seg.nii.gz`` (and the optional files of :class:`OutputOptions`) and ``volumes.csv``
atomically, one scan after another; each scan is brought to the model's orientation first
(:mod:`ichseg.io.orientation`) and its outputs written in its own space. The output names and
tables are :mod:`ichseg.inference.results`, the checkpoints and ``predict.json``
:mod:`ichseg.inference.provenance`; their names are importable from here too. See docs/predict.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ichseg.checkpoint import TrainedModel, load_model
from ichseg.data.ctich import find_release
from ichseg.errors import ConfigError, DatasetError, IchsegError
from ichseg.inference.ensemble import Ensemble
from ichseg.inference.predictor import Predictor
from ichseg.inference.provenance import (  # noqa: F401  (the public names of prediction)
    BEST_PATTERN,
    PROVENANCE_FILE,
    PROVENANCE_FORMAT,
    check_provenance,
    file_sha256,
    resolve_checkpoints,
    write_provenance,
)
from ichseg.inference.results import (  # noqa: F401
    LEGACY_VOLUME_COLUMNS,
    MASK_SUFFIX,
    OUTPUT_SUFFIXES,
    PROBABILITY_SUFFIX,
    QA_FOLDER,
    QA_INDEX,
    UNCERTAINTY_SUFFIX,
    VOLUME_COLUMNS,
    VOLUMES_FILE,
    OutputOptions,
    ScanInput,
    ScanResult,
    VolumeStats,
    check_output,
    check_replaceable,
    check_replaceable_seg,
    prepare_output,
    read_volumes,
    volume_stats,
    write_qa_index,
    write_volumes,
)
from ichseg.io.nifti import nifti_stem, read_ct, save_like, spacing_volume_ml, voxel_spacing_mm
from ichseg.io.orientation import CTICH_ORIENTATION, Reorientation, reorientation


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


# --------------------------------------------------------------------------- files


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


def scan_shape(scan: ScanInput, predictor: Predictor | Ensemble) -> tuple[int, int, int]:
    """A scan's shape in the model's orientation, from its header alone (slices last; a DICOM
    series: its files are taken as the slices)."""
    if scan.series is not None:
        return 0, 0, len(scan.series.files)
    _, image = read_ct(scan.path, header_only=True)
    return scan_reorientation(image, predictor, scan.path).shape(image.shape)
