"""Synthetic head-CT phantom written in the exact on-disk layouts of the PhysioNet CT-ICH releases.

The phantom lets every reader, experiment and test run without the real download. It writes either
release, files, names, CSV formats and known quirks included:

* ``nifti`` (CT-ICH 1.3.x): ``ct_scans/<NNN>.nii`` (int16 HU, slices on axis 2),
  ``masks/<NNN>.nii`` (uint8 0/1), ``hemorrhage_diagnosis_raw_ct.csv``,
  ``Patient_demographics.csv``; patients 049-058 and 066-130 (059-065 missing, as in the real data).
* ``jpg`` (CT-ICH 1.0-1.2): ``Patients_CT/<NNN>/brain/<K>.jpg`` (brain window 40/120),
  ``brain/<K>_HGE_Seg.jpg`` (mask, only on slices with ICH), ``bone/<K>.jpg`` (bone window
  700/3200), ``hemorrhage_diagnosis.csv`` (UTF-8 BOM, CRLF), ``patient_demographics.csv``; one bone
  JPG missing.

Each scan is built from analytic shapes in millimetres: air, scalp, a skull of varying thickness,
grey/white matter with sulci, the interhemispheric fissure and falx, lateral ventricles, skull-base
bone, and optional calcifications, a head rest and a skull fracture. Patients with ICH get 3D
lesions of the five subtypes (EDH lens, SDH crescent, IPH blob with oedema, IVH in a ventricle, SAH
along the surface and in sulci). Noise and a small blur give CT texture and partial-volume rims at
the skull. Masks and labels are consistent by construction, and every patient is seeded from
``(seed, patient_id)``: the same arguments give byte-identical files, and a smaller phantom holds
the same first patients as a larger one.

Modules: ``plan`` (what to generate), ``anatomy`` (the head), ``structures`` (fissure,
ventricles, skull base), ``lesions`` (ICH by subtype), ``render`` (HU volumes), ``images`` (NIfTI
and JPG files), ``write`` (the release on disk, atomically). The command line is
:mod:`ichseg.cli.phantom`::

    python -m ichseg.data.phantom OUT --release nifti --patients 6 --slices 10 --size 128 --seed 0

See docs/phantom.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from ichseg.data.ctich import LABEL_COLUMNS, SUBTYPE_COLUMNS, SUBTYPES
from ichseg.data.phantom.anatomy import Tissue
from ichseg.data.phantom.images import BONE_WINDOW, BRAIN_WINDOW, JPEG_QUALITY, _window_u8
from ichseg.data.phantom.plan import (
    DEFAULT_PATIENTS,
    DEFAULT_SIZE,
    DEFAULT_SLICES,
    MAX_PATIENTS,
    MAX_SIZE,
    MAX_SLICES,
    MIN_SIZE,
    MISSING_BONE_PATIENT,
    MISSING_BONE_SLICE,
    NIFTI_PATIENT_IDS,
    RELEASES,
    _missing_bone,
    _plan_patient,
    parse_slices,
    patient_ids,
)
from ichseg.data.phantom.render import MIN_LESION_PIXELS, make_head_volume
from ichseg.data.phantom.write import (
    PhantomManifest,
    PhantomPatient,
    _write_label_csv,
    generate_phantom,
)

__all__ = [
    "BONE_WINDOW",
    "BRAIN_WINDOW",
    "DEFAULT_PATIENTS",
    "DEFAULT_SIZE",
    "DEFAULT_SLICES",
    "JPEG_QUALITY",
    "LABEL_COLUMNS",
    "MAX_PATIENTS",
    "MAX_SIZE",
    "MAX_SLICES",
    "MIN_LESION_PIXELS",
    "MIN_SIZE",
    "MISSING_BONE_PATIENT",
    "MISSING_BONE_SLICE",
    "NIFTI_PATIENT_IDS",
    "RELEASES",
    "SUBTYPES",
    "SUBTYPE_COLUMNS",
    "PhantomManifest",
    "PhantomPatient",
    "Tissue",
    "_missing_bone",
    "_plan_patient",
    "_window_u8",
    "_write_label_csv",
    "generate_phantom",
    "main",
    "make_head_volume",
    "parse_slices",
    "patient_ids",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (the same as :func:`ichseg.cli.phantom.main`)."""
    from ichseg.cli.phantom import main as cli_main

    return cli_main(argv)
