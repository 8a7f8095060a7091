"""Segment ICH in CT scans without masks with a trained checkpoint: ``python -m ichseg.predict``.

::

    python -m ichseg.predict ckpt=best.ckpt input=scan.nii.gz output=predictions/
    ichseg-predict ckpt=best.ckpt input=/data/ct-ich output=predictions/ save_probabilities=true
    python -m ichseg.predict ckpt=best.ckpt input=scans/ output=out/ inference.threshold=0.6

``input`` is a ``.nii`` / ``.nii.gz`` file, a folder of them, or a CT-ICH NIfTI release root (its
``ct_scans/``). The checkpoint carries its input spec and inference spec
(:mod:`ichseg.checkpoint`), including the operating point that the evaluation used (tuned on
validation where the run did so), and every scan goes through the one predictor of the evaluation
(:class:`ichseg.inference.Predictor`): the masks are those the report scored. An ``inference.*``
option on the command line overrides what the checkpoint stores; the run prints the operating
point it used and where it came from. Outputs, written atomically into ``output``:

* ``<name>_ich.nii.gz``: the uint8 mask with the input's affine and header (orientation, qform and
  sform codes, zooms); ``<name>_prob.nii.gz`` (float32 probabilities) on request;
* ``volumes.csv``: one row per scan (ICH volume in mL = voxel count x voxel volume from the header
  zooms and units, slices with ICH, the largest 3D connected component in mL, seconds taken).

The command line is composed by Hydra from ``conf/predict.yaml`` (schema :class:`PredictConfig`),
with the same override grammar as training; every user-facing problem is one sentence and exit
status 2. The library functions (:func:`load_predictor`, :func:`predict_files`, ...) carry the
logic; :func:`main` only composes, calls and prints.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from scipy import ndimage

from ichseg.checkpoint import (
    ALLOWED_NETS,
    CHECKPOINT_FORMAT,
    SUPPORTED_VERSIONS,
    CheckpointError,
    TrainedModel,
    build_net,
    load_model,
    network_weights,
    read_checkpoint,
)
from ichseg.data.ctich import find_release
from ichseg.errors import ConfigError, DatasetError, IchsegError
from ichseg.inference import Predictor
from ichseg.io.nifti import (
    NIFTI_SUFFIXES,
    UNIT_MM,
    as_hu,
    nifti_stem,
    read_ct,
    save_like,
    voxel_volume_ml,
)
from ichseg.specs import InferenceSpec
from ichseg.utils.atomic import atomic_write_text
from ichseg.utils.cli import hydra_error_line, run_command

__all__ = [
    "ALLOWED_NETS", "CHECKPOINT_FORMAT", "NIFTI_SUFFIXES", "SUPPORTED_VERSIONS", "UNIT_MM",
    "CheckpointError", "PredictConfig", "PredictionFailures", "ScanInput", "ScanResult",
    "VolumeStats", "as_hu", "build_net", "compose_predict_config", "find_inputs", "load_nifti",
    "load_predictor", "main", "network_weights", "nifti_stem", "operating_point_line",
    "predict_file", "predict_files", "read_checkpoint", "run", "save_like", "voxel_volume_ml",
    "volume_stats",
]  # fmt: skip

PROG = "python -m ichseg.predict"
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
#: ``load_nifti(path, header_only)``: :func:`ichseg.io.nifti.read_ct` under its earlier name.
load_nifti = read_ct


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
    probabilities, mask = predictor.predict_hu(hu, progress)
    mask_path = output / f"{scan.name}{MASK_SUFFIX}.nii.gz"
    probability_path = (
        output / f"{scan.name}{PROBABILITY_SUFFIX}.nii.gz" if save_probabilities else None
    )
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
    stats = volume_stats(mask, voxel_volume_ml(image.header))
    return ScanResult(scan.path, mask_path, probability_path, stats, time.perf_counter() - start)


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


def prepare_output(output: str | os.PathLike[str]) -> Path:
    """Create the output folder if needed and check that files can be written into it."""
    output = Path(output)
    if nifti_stem(output) is not None:
        raise ConfigError(
            f"{output}: output is the folder for the masks and volumes.csv, not a NIfTI file name"
        )
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


def write_volumes(results: Sequence[ScanResult], target: Path) -> None:
    """Write ``volumes.csv`` (one row per scan, :data:`VOLUME_COLUMNS`) atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=VOLUME_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.row() for result in results)
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
    interrupted run leaves only complete files. A scan that fails (unreadable, NaN, not 3D, ...)
    is skipped and the others go on; then :class:`PredictionFailures` is raised, listing them.
    ``progress`` shows tqdm bars over scans and over the windows of the current scan (on a
    terminal only).
    """
    from tqdm.auto import tqdm

    output = prepare_output(output)
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
            write_volumes(results, output / VOLUMES_FILE)
            if on_result is not None:
                on_result(result)
    if failures:
        if len(failures) == 1 and not results:
            raise failures[0]
        raise PredictionFailures(results, failures)
    return results


# --------------------------------------------------------------------------- command line


def _inference_overrides() -> type:
    """A dataclass with every :class:`~ichseg.specs.InferenceSpec` field as ``Optional`` (None:
    as the checkpoint stores it), built from the spec so the two never drift apart."""
    hints = typing.get_type_hints(InferenceSpec)
    return make_dataclass(
        "InferenceOverrides",
        [(f.name, Optional[hints[f.name]], field(default=None)) for f in fields(InferenceSpec)],  # noqa: UP045
    )


InferenceOverrides = _inference_overrides()


@dataclass
class PredictConfig:
    """The schema of ``conf/predict.yaml``: a wrong type or an unknown key fails at compose time."""

    ckpt: str = "???"
    input: str = "???"
    output: str = "???"
    device: str = "auto"
    save_probabilities: bool = False
    progress: bool = True
    inference: Any = field(default_factory=InferenceOverrides)


OPTION_HELP: dict[str, str] = {
    "ckpt": "checkpoint written by ichseg.train (required)",
    "input": "a .nii/.nii.gz scan, a folder of them, or a CT-ICH NIfTI release root (required)",
    "output": "folder for <name>_ich.nii.gz, <name>_prob.nii.gz and volumes.csv (required)",
    "device": "auto (CUDA when available), cpu or cuda (default auto)",
    "save_probabilities": "also write <name>_prob.nii.gz, float32 (default false)",
    "progress": "progress bars on a terminal (default true)",
    "inference.threshold": "probability threshold (default: the checkpoint's operating point)",
    "inference.postprocess": "closing then opening after the threshold (default: the checkpoint's)",
    "inference.closing_size": "closing square in pixels of reference_size slices",
    "inference.opening_size": "opening square in pixels of reference_size slices",
    "inference.blend": "overlapping tiles: constant (the paper's average) or gaussian",
    "inference.tile_batch_size": "tiles per forward pass (whole slices in full-slice mode)",
    "inference.autocast": "auto (bf16 on CUDA), none, bf16 or fp16; never on the CPU",
    "inference.*": "any other field of the inference spec (docs/predict.md); null: the stored one",
}
#: Options of earlier releases, now fields of the inference spec.
RENAMED: dict[str, str] = {
    "threshold": "inference.threshold", "postprocess": "inference.postprocess",
    "closing": "inference.closing_size", "opening": "inference.opening_size",
    "blend_mode": "inference.blend", "window_batch_size": "inference.tile_batch_size",
    "amp": "inference.autocast",
}  # fmt: skip


def usage() -> str:
    """The command's help text."""
    width = max(len(name) for name in OPTION_HELP)
    lines = [
        f"usage: {_prog()} ckpt=PATH input=PATH output=DIR [key=value ...]",
        "",
        "Segment ICH in head CT scans with a trained ichseg checkpoint, exactly as its evaluation",
        "applied it. Options are Hydra overrides of conf/predict.yaml.",
        "",
        "options:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, text in OPTION_HELP.items()]
    return "\n".join(lines)


def compose_predict_config(arguments: Sequence[str]) -> Any:
    """``conf/predict.yaml`` composed with ``arguments`` (Hydra overrides), checked against
    :class:`PredictConfig`; every problem is one :class:`~ichseg.errors.ConfigError` line."""
    from hydra import compose, initialize_config_module
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    for argument in arguments:
        key = argument.split("=", 1)[0].lstrip("+~")
        if "=" not in argument:
            raise ConfigError(
                f"expected key=value arguments such as input=scan.nii.gz, got {argument!r}"
            )
        if key in RENAMED:
            raise ConfigError(f"option {key} is now {RENAMED[key]} (e.g. {RENAMED[key]}=...)")
    ConfigStore.instance().store(name="predict_schema", node=PredictConfig)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("ichseg.conf", version_base="1.3"):
            cfg = compose("predict", overrides=list(arguments))
    except Exception as err:  # Hydra and OmegaConf raise many types, all with a clear message
        raise ConfigError(hydra_error_line(err)) from None
    finally:
        GlobalHydra.instance().clear()
    missing = [name for name in ("ckpt", "input", "output") if OmegaConf.is_missing(cfg, name)]
    if missing:
        needed = " ".join(f"{name}=..." for name in missing)
        raise ConfigError(
            f"missing {needed}; usage: {_prog()} ckpt=PATH input=PATH output=DIR [key=value ...]"
        )
    for name in ("ckpt", "input", "output"):
        if not str(cfg[name]).strip():
            raise ConfigError(f"option {name} needs a path")
    return cfg


def run(cfg: Any) -> list[ScanResult]:
    """Predict as the composed options say; print the operating point and a line per scan."""
    from omegaconf import OmegaConf
    from tqdm.auto import tqdm

    scans = find_inputs(Path(str(cfg.input)).expanduser())
    for scan in scans:  # fail before the model loads on a scan that is not a readable 3D volume
        read_ct(scan.path, header_only=True)
    output = prepare_output(Path(str(cfg.output)).expanduser())
    model = load_model(Path(str(cfg.ckpt)).expanduser())
    given = OmegaConf.to_container(cfg.inference, resolve=True)
    predictor = load_predictor(model, cfg.device, **given)
    print(operating_point_line(model, predictor, given), flush=True)

    def report(result: ScanResult) -> None:
        stats = result.stats
        line = (
            f"{result.input.name}: {stats.ich_volume_ml:.2f} mL ICH in {stats.ich_slices} of "
            f"{stats.slices} slices (largest component {stats.largest_component_ml:.2f} mL), "
            f"{result.seconds:.1f} s -> {result.mask_path}"
        )
        tqdm.write(line, file=sys.stdout)  # above the progress bars, which stay intact
        sys.stdout.flush()

    results = predict_files(
        predictor, scans, output, bool(cfg.save_probabilities), bool(cfg.progress),
        on_result=report,
    )  # fmt: skip
    print(f"volumes: {output / VOLUMES_FILE}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point (``ichseg-predict``)."""
    return run_command(
        None if argv is None else list(argv),
        usage,
        lambda arguments: run(compose_predict_config(arguments)),
        _prog(),
    )


def _prog() -> str:
    return "ichseg-predict" if Path(sys.argv[0]).name == "ichseg-predict" else PROG


if __name__ == "__main__":
    raise SystemExit(main())
