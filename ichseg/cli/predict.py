"""``python -m ichseg.predict`` (``ichseg-predict``): segment ICH in CT scans with a checkpoint.

::

    python -m ichseg.predict ckpt=best.ckpt input=scan.nii.gz output=predictions/
    ichseg-predict ckpt=best.ckpt input=/data/ct-ich output=predictions/ save_probabilities=true
    python -m ichseg.predict ckpt=best.ckpt input=scans/ output=out/ inference.threshold=0.6
    python -m ichseg.predict ckpt=outputs/train/multiruns/<time>/ input=scans/ output=out/

The command line is composed by Hydra from ``conf/predict.yaml`` (schema :class:`PredictConfig`),
with the same override grammar as training; every user-facing problem is one sentence and exit
status 2. The work is done by :mod:`ichseg.inference.scans`; this module composes, calls and
prints. See docs/predict.md.
"""

from __future__ import annotations

import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Optional

from ichseg.checkpoint import load_model
from ichseg.errors import ConfigError, IchsegError
from ichseg.inference.scans import (
    PROVENANCE_FILE,
    QA_FOLDER,
    QA_INDEX,
    VOLUMES_FILE,
    OutputOptions,
    PredictionFailures,
    ScanResult,
    check_output,
    check_provenance,
    find_inputs,
    load_ensemble,
    operating_point_line,
    predict_files,
    prepare_output,
    read_volumes,
    resolve_checkpoints,
    write_provenance,
)
from ichseg.io.nifti import read_ct
from ichseg.specs import InferenceSpec
from ichseg.utils.cli import hydra_error_line, run_command

PROG = "python -m ichseg.predict"


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

    ckpt: Any = "???"
    input: str = "???"
    output: str = "???"
    device: str = "auto"
    save_probabilities: bool = False
    save_uncertainty: bool = True
    flip: bool = False
    dicom_seg: bool = False
    qa: bool = True
    progress: bool = True
    inference: Any = field(default_factory=InferenceOverrides)


OPTION_HELP: dict[str, str] = {
    "ckpt": "checkpoint written by ichseg.train, a list [a.ckpt,b.ckpt] or a folder of training "
    "runs (e.g. the multirun of the 5 CV rounds): several are averaged as one ensemble (required)",
    "input": "a .nii/.nii.gz scan, a folder of them or of DICOM series (ichseg[dicom]), or a "
    "CT-ICH NIfTI release root (required)",
    "output": "folder for <name>_ich_seg.nii.gz, volumes.csv and predict.json (required)",
    "device": "auto (CUDA when available), cpu or cuda (default auto)",
    "save_probabilities": "also write <name>_prob.nii.gz, float32 (default false)",
    "save_uncertainty": "with several models, <name>_uncertainty.nii.gz (default true)",
    "flip": "also average each model over the left-right flipped scan (default false)",
    "dicom_seg": "DICOM inputs: also <name>_ich_seg.dcm, a DICOM SEG (default false)",
    "qa": "qa/index.html and a PNG sheet per scan of its ICH slices (default true)",
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
    ckpt = cfg.ckpt
    if not isinstance(ckpt, str) and not (
        OmegaConf.is_list(ckpt) and all(isinstance(item, str) and item.strip() for item in ckpt)
    ):
        raise ConfigError("option ckpt must be a path or a list of paths ([a.ckpt,b.ckpt])")
    return cfg


def run(cfg: Any) -> list[ScanResult]:
    """Predict as the composed options say; print the operating point and a line per scan."""
    from omegaconf import OmegaConf
    from tqdm.auto import tqdm

    scans = find_inputs(Path(str(cfg.input)).expanduser())
    unreadable: list[IchsegError] = []
    for scan in scans:  # a scan that is not a readable 3D volume fails alone (predict_files)...
        if scan.series is not None:
            continue  # a DICOM series' headers were read when it was found
        try:
            read_ct(scan.path, header_only=True)
        except IchsegError as err:
            unreadable.append(err)
    if len(unreadable) == len(scans):  # ...but with none readable, fail before the model loads
        raise unreadable[0] if len(unreadable) == 1 else PredictionFailures([], unreadable)
    output = check_output(Path(str(cfg.output)).expanduser())
    read_volumes(output / VOLUMES_FILE)  # an unreadable or foreign volumes.csv: before the model
    check_provenance(output)  # and a predict.json of someone else's
    ckpt = cfg.ckpt if isinstance(cfg.ckpt, str) else list(cfg.ckpt)
    models = [load_model(path) for path in resolve_checkpoints(ckpt)]
    given = OmegaConf.to_container(cfg.inference, resolve=True)
    assert isinstance(given, dict)
    predictor = load_ensemble(models, cfg.device, bool(cfg.flip), **given)
    created = not output.exists()  # the folder is made only once the model and options are good
    output = prepare_output(output)
    point = operating_point_line(models, predictor, given)
    print(point, flush=True)
    if predictor.input_spec.orientation is None:
        print(
            "orientation: the checkpoint does not record its training scans' orientation; "
            "CT-ICH's L,A,S is assumed",
            flush=True,
        )
    options = OutputOptions(
        probabilities=bool(cfg.save_probabilities),
        uncertainty=bool(cfg.save_uncertainty),
        dicom_seg=bool(cfg.dicom_seg),
        qa=bool(cfg.qa),
    )
    if options.dicom_seg and not any(scan.series is not None for scan in scans):
        print("dicom_seg: no DICOM input, so no DICOM SEG is written", flush=True)

    def report(result: ScanResult) -> None:
        stats = result.stats
        name = result.label or result.input.name
        line = (
            f"{name}: {stats.ich_volume_ml:.2f} mL ICH in {stats.ich_slices} of "
            f"{stats.slices} slices (largest component {stats.largest_component_ml:.2f} mL), "
            f"{result.seconds:.1f} s -> {result.mask_path}"
        )
        interval = result.interval_ml
        if interval is not None:
            line += f" [models {interval[0]:.2f}-{interval[1]:.2f} mL]"
        if result.reoriented:
            line += f" (scan oriented {','.join(result.orientation)}: reoriented for the model)"
        tqdm.write(line, file=sys.stdout)  # above the progress bars, which stay intact
        sys.stdout.flush()

    settings = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(settings, dict)
    try:
        results = predict_files(
            predictor, scans, output, progress=bool(cfg.progress), on_result=report,
            options=options,
        )  # fmt: skip
    except PredictionFailures as failed:
        write_provenance(
            output, models, predictor, settings, point, failed.results, failed.failures
        )
        raise
    except BaseException:
        if created and not any(output.iterdir()):  # no scan succeeded: leave no empty folder
            output.rmdir()
        raise
    write_provenance(output, models, predictor, settings, point, results)
    print(f"volumes: {output / VOLUMES_FILE}; provenance: {output / PROVENANCE_FILE}", flush=True)
    if options.qa:
        print(f"QA report: {output / QA_FOLDER / QA_INDEX}", flush=True)
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
