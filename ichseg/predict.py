"""Segment ICH in CT scans with a trained checkpoint: ``python -m ichseg.predict``.

The public face of prediction: the library functions of :mod:`ichseg.inference.scans`
(:func:`load_predictor`, :func:`predict_files`, ...), the checkpoint reader of
:mod:`ichseg.checkpoint` and the command line of :mod:`ichseg.cli.predict`, importable from here.
See docs/predict.md.
"""

from __future__ import annotations

from ichseg.checkpoint import (
    ALLOWED_NETS,
    CHECKPOINT_FORMAT,
    SUPPORTED_VERSIONS,
    CheckpointError,
    build_net,
    network_weights,
    read_checkpoint,
)
from ichseg.cli.predict import (
    OPTION_HELP,
    PROG,
    RENAMED,
    InferenceOverrides,
    PredictConfig,
    compose_predict_config,
    main,
    run,
    usage,
)
from ichseg.inference.ensemble import Ensemble, EnsemblePrediction
from ichseg.inference.scans import (
    MASK_SUFFIX,
    PROBABILITY_SUFFIX,
    PROVENANCE_FILE,
    QA_FOLDER,
    UNCERTAINTY_SUFFIX,
    VOLUME_COLUMNS,
    VOLUMES_FILE,
    OutputOptions,
    PredictionFailures,
    ScanInput,
    ScanResult,
    VolumeStats,
    find_inputs,
    load_ensemble,
    load_predictor,
    operating_point_line,
    predict_file,
    predict_files,
    prepare_output,
    read_volumes,
    resolve_checkpoints,
    resolve_device,
    volume_stats,
    write_provenance,
    write_qa_index,
    write_volumes,
)
from ichseg.io.nifti import (
    NIFTI_SUFFIXES,
    UNIT_MM,
    as_hu,
    nifti_stem,
    save_like,
    voxel_spacing_mm,
    voxel_volume_ml,
)
from ichseg.io.nifti import read_ct as load_nifti

__all__ = [
    "ALLOWED_NETS", "CHECKPOINT_FORMAT", "MASK_SUFFIX", "NIFTI_SUFFIXES", "OPTION_HELP", "PROG",
    "PROBABILITY_SUFFIX", "PROVENANCE_FILE", "QA_FOLDER", "RENAMED", "SUPPORTED_VERSIONS",
    "UNCERTAINTY_SUFFIX", "UNIT_MM", "VOLUMES_FILE", "VOLUME_COLUMNS", "CheckpointError",
    "Ensemble", "EnsemblePrediction", "InferenceOverrides", "OutputOptions", "PredictConfig",
    "PredictionFailures", "ScanInput", "ScanResult", "VolumeStats", "as_hu", "build_net",
    "compose_predict_config", "find_inputs", "load_ensemble", "load_nifti", "load_predictor",
    "main", "network_weights", "nifti_stem", "operating_point_line", "predict_file",
    "predict_files", "prepare_output", "read_checkpoint", "read_volumes", "resolve_checkpoints",
    "resolve_device", "run", "save_like", "usage", "voxel_spacing_mm", "voxel_volume_ml",
    "volume_stats", "write_provenance", "write_qa_index", "write_volumes",
]  # fmt: skip

if __name__ == "__main__":
    raise SystemExit(main())
