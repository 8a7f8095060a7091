"""Check a CT-ICH release on disk; the command is :mod:`ichseg.cli.check`
(``python -m ichseg.data.check ROOT``).

Decodes every scan once (one at a time) and prints a summary: release, patients, slices, ICH
slices per subtype, image size and spacing, patients with ICH, demographics. Every problem found is
listed, one line each naming the file and what is wrong, and the exit status is then 2.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ichseg.data.ctich import SUBTYPES, CTICHDataset, Scan, index_dataset
from ichseg.errors import DatasetError, DatasetWarning


@dataclass
class CheckReport:
    """What the dataset check found: summary facts, problems (errors) and warnings."""

    root: Path
    release: str | None = None
    n_patients: int = 0
    n_slices: int = 0
    n_ich_slices: int = 0
    ich_slices_by_subtype: dict[str, int] = field(default_factory=dict)
    patients_with_ich: int = 0
    image_sizes: Counter = field(default_factory=Counter)
    spacings: list[tuple[float, float, float]] = field(default_factory=list)
    ages: list[float] = field(default_factory=list)
    genders: Counter = field(default_factory=Counter)
    problems: list[DatasetError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        """The human-readable report printed by the command."""
        release_name = {"nifti": "NIfTI release 1.3.x", "jpg": "JPG release 1.0-1.2"}.get(
            self.release or "", "unknown"
        )
        lines = [f"CT-ICH dataset check: {self.root} ({release_name})"]
        if self.release is not None:
            lines.append(
                f"  patients            {self.n_patients} ({self.patients_with_ich} with ICH)"
            )
            lines.append(f"  slices              {self.n_slices} ({self.n_ich_slices} with ICH)")
            by_type = ", ".join(
                f"{name} {self.ich_slices_by_subtype.get(name, 0)}" for name in SUBTYPES
            )
            lines.append(f"  ICH slices by type  {by_type}")
            sizes = ", ".join(f"{w}x{h} ({n})" for (h, w), n in self.image_sizes.most_common())
            lines.append(f"  image size          {sizes or '-'}")
            lines.append(f"  spacing (mm)        {_spacing_range(self.spacings)}")
            lines.append(f"  demographics        {_demographics_line(self.ages, self.genders)}")
        for warning in self.warnings:
            lines.append(f"warning: {warning}")
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s) found:")
            lines.extend(str(problem) for problem in self.problems)
        else:
            lines.append("OK: no problems found")
        return "\n".join(lines)


def check_dataset(root: str | Path, progress: bool = False) -> CheckReport:
    """Index and decode every scan under ``root``, collecting all problems
    (never raises on data).
    """
    report = CheckReport(root=Path(root))
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always", DatasetWarning)
        dataset, report.problems = index_dataset(root)
    for warning in skipped:
        if issubclass(warning.category, DatasetWarning):
            report.warnings.append(str(warning.message))
        else:  # not ours: shown as usual
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    if dataset is None:
        return report
    report.root, report.release = dataset.root, dataset.release
    _summarise_labels(dataset, report)
    patients = dataset.patient_ids
    iterator = patients
    if progress:
        from tqdm import tqdm

        iterator = tqdm(patients, desc="checking scans", unit="scan", file=sys.stderr)
    sizes: dict[Path, tuple[int, int]] = {}
    for patient in iterator:
        try:
            scan = dataset.load(patient)
        except DatasetError as err:
            report.problems.append(err)
            continue
        _check_scan(scan, report)
        sizes[scan.paths["image"]] = scan.shape[:2]
    _check_sizes(report, sizes)
    return report


def _summarise_labels(dataset: CTICHDataset, report: CheckReport) -> None:
    report.n_patients = len(dataset)
    subtype_counts = np.zeros(len(SUBTYPES), dtype=np.int64)
    for patient in dataset.patient_ids:
        labels = dataset.labels[patient]
        report.n_slices += labels.n_slices
        report.n_ich_slices += int(labels.has_ich.sum())
        report.patients_with_ich += int(labels.has_ich.any())
        subtype_counts += labels.subtypes.sum(axis=0)
        demographics = dataset.demographics.get(patient)
        if demographics is not None:
            if demographics.age is not None:
                report.ages.append(demographics.age)
            if demographics.gender:
                report.genders[demographics.gender] += 1
    report.ich_slices_by_subtype = {
        name: int(n) for name, n in zip(SUBTYPES, subtype_counts, strict=True)
    }


def _check_scan(scan: Scan, report: CheckReport) -> None:
    height, width, _ = scan.shape
    report.image_sizes[(height, width)] += 1
    if scan.spacing is not None:
        report.spacings.append(scan.spacing)
    has_mask = scan.mask.any(axis=(0, 1))
    labelled = scan.labels.has_ich
    source = scan.paths["mask"]
    unlabelled = np.flatnonzero(has_mask & ~labelled) + 1
    empty = np.flatnonzero(labelled & ~has_mask) + 1
    if unlabelled.size:
        report.warnings.append(
            f"{source}: mask pixels on slice(s) {_numbers(unlabelled)} labelled No_Hemorrhage"
        )
    if empty.size:
        report.warnings.append(
            f"{source}: empty mask on slice(s) {_numbers(empty)} labelled with ICH"
        )
    if scan.missing_bone_slices:
        report.warnings.append(
            f"{scan.paths['bone']}: no bone image for slice(s) "
            f"{_numbers(scan.missing_bone_slices)} (zero-filled)"
        )


def _check_sizes(report: CheckReport, sizes: dict[Path, tuple[int, int]]) -> None:
    """Flag JPG patients whose slice size differs from the size most patients have."""
    if report.release != "jpg" or len(report.image_sizes) < 2:
        return
    (usual_h, usual_w), _ = report.image_sizes.most_common(1)[0]
    for folder, (height, width) in sizes.items():
        if (height, width) != (usual_h, usual_w):
            report.problems.append(
                DatasetError(
                    f"{folder}: slice images are {width}x{height} pixels, "
                    f"expected {usual_w}x{usual_h}",
                    folder,
                )
            )


def _numbers(values) -> str:
    values = [int(v) for v in values]
    shown = ", ".join(str(v) for v in values[:10])
    return shown + (f", ... ({len(values)} in all)" if len(values) > 10 else "")


def _spacing_range(spacings: list[tuple[float, float, float]]) -> str:
    if not spacings:
        return "not recorded (JPG release)"
    table = np.asarray(spacings)
    parts = []
    for axis in range(3):
        low, high = table[:, axis].min(), table[:, axis].max()
        parts.append(f"{low:.2f}" if np.isclose(low, high) else f"{low:.2f}-{high:.2f}")
    return " x ".join(parts)


def _demographics_line(ages: list[float], genders: Counter) -> str:
    if not ages and not genders:
        return "no demographics file"
    parts = []
    if ages:
        values = np.asarray(ages)
        parts.append(
            f"age {values.mean():.1f} +- {values.std(ddof=1) if len(values) > 1 else 0:.1f} "
            f"({values.min():g}-{values.max():g}, {len(values)} patients)"
        )
    if genders:
        parts.append(", ".join(f"{n} {g}" for g, n in sorted(genders.items())))
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (the same as :func:`ichseg.cli.check.main`)."""
    from ichseg.cli.check import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
