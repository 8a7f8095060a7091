"""Metrics on hand-computed slice counts, empty rules, scaling, merging, and masks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ichseg.errors import ConfigError
from ichseg.eval import metrics as m
from ichseg.eval.postprocess import PAPER, THRESHOLD_ONLY, postprocess_thresholds

nan = math.nan


def hand_counts() -> m.SliceCounts:
    """Four patients, counts chosen to be checked on paper (thresholds 0.5 and 0.9).

    patient 1 (voxel 0.001 mL): (G, P, I) = (100, 100, 50), (50, 0, 0), (0, 500, 0)
    patient 2 (voxel 0.002 mL): (200, 300, 200), (0, 60, 0), (0, 0, 0)
    patient 3 (no ICH):         (0, 0, 0), (0, 10, 0)
    patient 4 (no ICH):         (0, 0, 0)
    At 0.9 every predicted count is halved-ish (second column).
    """
    return m.SliceCounts(
        patient=[1, 1, 1, 2, 2, 2, 3, 3, 4],
        slice_index=[0, 1, 2, 0, 1, 2, 0, 1, 0],
        thresholds=[0.5, 0.9],
        gt_pixels=[100, 50, 0, 200, 0, 0, 0, 0, 0],
        pred_pixels=[
            [100, 40],
            [0, 0],
            [500, 30],
            [300, 100],
            [60, 0],
            [0, 0],
            [0, 0],
            [10, 0],
            [0, 0],
        ],
        intersection=[[50, 40], [0, 0], [0, 0], [200, 100], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0]],
        voxel_ml=[0.001] * 3 + [0.002] * 3 + [0.001] * 3,
    )


def test_slice_dice_and_jaccard_only_on_positive_slices() -> None:
    counts = hand_counts()
    dice = m.slice_dice(counts)
    assert dice[:2].tolist() == [0.5, 0.0] and dice[3] == 0.8
    assert np.isnan(dice[[2, 4, 5, 6, 7, 8]]).all()
    jaccard = m.slice_jaccard(counts)
    assert (
        jaccard[0] == pytest.approx(1 / 3)
        and jaccard[1] == 0
        and jaccard[3] == pytest.approx(2 / 3)
    )
    assert m.slice_dice(counts, 0.9)[:2].tolist() == [2 * 40 / 140, 0.0]
    with pytest.raises(ConfigError):
        m.slice_dice(counts, 0.7)


def test_patient_metrics_by_hand() -> None:
    metrics = m.patient_metrics(hand_counts(), threshold=0.5, min_area=60)
    assert metrics.patient.tolist() == [1, 2, 3, 4]
    assert metrics.n_slices.tolist() == [3, 3, 2, 1]
    assert metrics.n_positive_slices.tolist() == [2, 1, 0, 0]
    np.testing.assert_allclose(metrics.dice, [0.25, 0.8, nan, nan])
    np.testing.assert_allclose(metrics.jaccard, [1 / 6, 2 / 3, nan, nan])
    # 3D Dice: 2*50/(150+600), 2*200/(200+360); GT empty & prediction not -> 0; both empty -> NaN
    np.testing.assert_allclose(metrics.dice_3d, [100 / 750, 400 / 560, 0.0, nan])
    # detection with P > 60: p1 (TP, FN, FP), p2 (TP, TN: 60 is not > 60, TN), p3 (TN, TN), p4 (TN)
    np.testing.assert_allclose(metrics.sensitivity, [0.5, 1.0, nan, nan])
    np.testing.assert_allclose(metrics.specificity, [0.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(metrics.true_ml, [0.15, 0.4, 0.0, 0.0])
    np.testing.assert_allclose(metrics.predicted_ml, [0.6, 0.72, 0.01, 0.0])
    np.testing.assert_allclose(metrics.abs_error_ml, [0.45, 0.32, nan, nan])
    np.testing.assert_allclose(metrics.false_positive_ml, [nan, nan, 0.01, 0.0])
    # outside the bleed, every patient: (100-50)+500 = 550 x 0.001; (300-200)+60 = 160 x 0.002; 10
    np.testing.assert_allclose(metrics.outside_ml, [0.55, 0.32, 0.01, 0.0])


def test_paper_tables_by_hand() -> None:
    table = m.segmentation_table(hand_counts(), threshold=0.5, min_area=60)
    # Dice over patients with ICH: [0.25, 0.8]; population std
    assert table.dice == m.Summary(mean=0.525, std=pytest.approx(0.275), min=0.25, max=0.8, n=2)
    assert table.jaccard.mean == pytest.approx(5 / 12) and table.jaccard.std == pytest.approx(0.25)
    assert table.sensitivity.mean == pytest.approx(0.75) and table.sensitivity.n == 2
    assert table.specificity.mean == pytest.approx(0.75) and table.specificity.std == pytest.approx(
        math.sqrt(0.1875)
    )
    pooled = table.pooled
    assert (pooled.tp, pooled.fp, pooled.tn, pooled.fn) == (2, 1, 5, 1)
    assert pooled.sensitivity == pytest.approx(2 / 3)
    assert pooled.specificity == pytest.approx(5 / 6)
    assert pooled.accuracy == pytest.approx(7 / 9)


def test_detection_table_over_thresholds() -> None:
    rows = m.detection_table(hand_counts(), min_area=35)
    assert [row.threshold for row in rows] == [0.5, 0.9]
    # at 0.9, P > 35: slices 0 (40, TP), 3 (100, TP); slice 1 FN; nothing else predicted
    high = rows[1]
    assert (high.tp, high.fp, high.tn, high.fn) == (2, 0, 6, 1)
    assert high.specificity == 1.0 and high.sensitivity == pytest.approx(2 / 3)
    # at 0.5, P > 35: TP 0 and 3; FP slices 2 (500) and 4 (60); FN 1; TN 5, 6, 7, 8
    low = rows[0]
    assert (low.tp, low.fp, low.tn, low.fn) == (2, 2, 4, 1)


def test_exceeds_is_strict_and_min_area_scales_with_area() -> None:
    counts = m.SliceCounts(
        patient=[1, 1, 1, 1],
        slice_index=[0, 1, 2, 3],
        thresholds=[0.5],
        gt_pixels=[10, 10, 10, 10],
        pred_pixels=[[400], [401], [256], [257]],
        intersection=[[0], [0], [0], [0]],
        area_scale=[1.0, 1.0, m.area_scale_of((512, 512)), m.area_scale_of((512, 512))],
    )
    assert m.area_scale_of((512, 512)) == pytest.approx(0.64)  # 400 -> 256 pixels at 512x512
    assert m.area_scale_of((650, 650), mode="crop") == 1.0
    assert m.predicted_positive(counts, 0.5, 400).tolist() == [False, True, False, True]
    assert m.predicted_positive(counts, 0.5, 0).tolist() == [True, True, True, True]


def test_perfect_prediction_scores_one() -> None:
    rng = np.random.default_rng(0)
    gt = np.zeros((8, 32, 32), bool)
    gt[:3] = rng.random((3, 32, 32)) < 0.05  # 3 positive slices, one with a single pixel
    gt[2] = False
    gt[2, 5, 5] = True
    counts = m.count_slices(gt, gt, patient=[1, 1, 1, 1, 2, 2, 2, 2], voxel_ml=0.5)
    tables = m.evaluation_tables(counts, threshold=0.5, min_area=0)
    assert tables.segmentation.dice.mean == 1.0 and tables.segmentation.jaccard.min == 1.0
    pooled = tables.segmentation.pooled
    assert (pooled.sensitivity, pooled.specificity, pooled.accuracy) == (1.0, 1.0, 1.0)
    assert tables.volume.dice_3d.mean == 1.0 and tables.volume.abs_error_ml.max == 0.0
    assert tables.volume.false_positive_ml.max == 0.0 and tables.volume.outside_ml.max == 0.0
    # with the paper's 400-pixel minimum (scaled to 32x32) the single-pixel slice is missed
    missed = m.detection_scores(counts, 0.5, min_area=400)
    assert missed.fn >= 1 and missed.sensitivity < 1


def test_empty_prediction_scores_zero_dice_and_full_specificity() -> None:
    gt = np.zeros((4, 16, 16), bool)
    gt[0, 2:6, 2:6] = True
    gt[1, 8:9, 8:12] = True
    counts = m.count_slices(gt, np.zeros_like(gt), patient=7)
    table = m.segmentation_table(counts, min_area=0)
    assert table.dice.mean == 0.0 and table.jaccard.mean == 0.0
    assert table.pooled.specificity == 1.0 and table.pooled.sensitivity == 0.0
    assert m.patient_metrics(counts).dice_3d.tolist() == [0.0]


@pytest.mark.filterwarnings("ignore:dice_score metric currently defaults")
def test_torchmetrics_agrees_and_needs_integer_masks() -> None:
    from torchmetrics.functional.segmentation import dice_score

    rng = np.random.default_rng(1)
    gt = rng.random((5, 24, 24)) < 0.2
    predicted = rng.random((5, 24, 24)) < 0.2
    counts = m.count_slices(gt, predicted, patient=1)
    theirs = dice_score(
        torch.from_numpy(predicted).long(),
        torch.from_numpy(gt).long(),
        num_classes=2,
        include_background=False,
        average="micro",
        input_format="index",
        aggregation_level="samplewise",
    )
    np.testing.assert_allclose(m.slice_dice(counts), theirs.numpy().reshape(-1), rtol=1e-6)
    perfect = dice_score(
        torch.from_numpy(gt).long(),
        torch.from_numpy(gt).long(),
        num_classes=2,
        include_background=False,
        average="micro",
        input_format="index",
    )
    assert torch.allclose(perfect, torch.ones_like(perfect))


def test_count_slices_numpy_and_torch_and_from_probabilities() -> None:
    rng = np.random.default_rng(2)
    noise = rng.random((4, 40, 40)).astype(np.float32)
    probabilities = (noise + np.roll(noise, 1, 1) + np.roll(noise, 1, 2)) / 3
    gt = rng.random((4, 40, 40)) < 0.3
    thresholds = (0.5, 0.6, 0.7)
    from_numpy = m.score_probabilities(
        probabilities, gt, patient=3, thresholds=thresholds, scale=0.8, voxel_ml=0.1
    )
    from_torch = m.score_probabilities(
        torch.from_numpy(probabilities),
        torch.from_numpy(gt),
        patient=3,
        thresholds=thresholds,
        scale=0.8,
        voxel_ml=0.1,
    )
    for name in ("gt_pixels", "pred_pixels", "intersection", "area_scale"):
        assert np.array_equal(getattr(from_numpy, name), getattr(from_torch, name))
    assert from_numpy.area_scale[0] == pytest.approx(0.64)
    masks = postprocess_thresholds(probabilities, thresholds, PAPER, 0.8)
    assert from_numpy.pred_pixels.tolist() == [
        [int(masks[t, i].sum()) for t in range(3)] for i in range(4)
    ]
    assert from_numpy.intersection[:, 1].tolist() == [
        int((masks[1, i] & gt[i]).sum()) for i in range(4)
    ]
    plain = m.score_probabilities(
        probabilities, gt, patient=3, thresholds=thresholds, config=THRESHOLD_ONLY
    )
    assert plain.pred_pixels[:, 0].tolist() == (probabilities > 0.5).sum(axis=(1, 2)).tolist()


# --------------------------------------------------------------------------- groups


def test_subtype_and_age_groups() -> None:
    groups = m.subtype_groups({1: ["SDH", "EDH"], 2: np.array([0, 0, 0, 1, 0]), 3: []})
    assert groups == {"IVH": [], "IPH": [], "SAH": [], "EDH": [1, 2], "SDH": [1]}
    with pytest.raises(ConfigError):
        m.subtype_groups({1: ["XYZ"]})
    assert m.age_groups({1: 17.9, 2: 18.0, 3: None, 4: 0.5, 5: float("nan")}) == {
        "<18": [1, 4],
        ">=18": [2],
    }
    derived = m.patient_subtypes_from_slices(
        np.array([1, 1, 2]), np.array([[0, 0, 0, 1, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
    )
    assert derived == {1: ["EDH", "SDH"], 2: []}

    metrics = m.patient_metrics(hand_counts())  # Dice: patient 1 0.25, patient 2 0.8
    by_subtype = m.group_summaries(metrics, {"EDH": [1, 2], "SDH": [1], "IVH": [], "SAH": [3, 99]})
    assert by_subtype["EDH"].mean == pytest.approx(0.525) and by_subtype["EDH"].n == 2
    assert by_subtype["SDH"].mean == 0.25 and by_subtype["SDH"].n == 1
    assert by_subtype["IVH"].n == 0 and math.isnan(by_subtype["IVH"].mean)
    assert by_subtype["SAH"].n == 0  # patient 3 has no ICH (drops out), 99 is absent
    tables = m.evaluation_tables(
        hand_counts(), patient_subtypes={1: ["SDH", "EDH"], 2: ["EDH"]}, ages={1: 10, 2: 40}
    )
    assert tables.subtype_dice["SDH"].mean == 0.25 and tables.subtype_dice["EDH"].n == 2
    assert tables.age_dice["<18"].mean == 0.25 and tables.age_dice[">=18"].mean == 0.8


def test_summary_uses_population_std_and_drops_nan() -> None:
    summary = m.Summary.of([1.0, nan, 3.0])
    assert summary == m.Summary(mean=2.0, std=1.0, min=1.0, max=3.0, n=2)
    empty = m.Summary.of([nan])
    assert empty.n == 0 and math.isnan(empty.mean)


# --------------------------------------------------------------------------- merging


def test_merge_folds_deduplicate_and_round_trip(tmp_path) -> None:
    counts = hand_counts()
    first, second = counts.select(np.arange(4)), counts.select(np.arange(4, 9))
    merged = m.SliceCounts.concatenate([first, second])
    assert m.segmentation_table(merged, min_area=60) == m.segmentation_table(counts, min_area=60)
    # DDP padding repeats samples: duplicates are dropped, first occurrence kept, order preserved
    padded = m.SliceCounts.concatenate([counts, counts.select([0, 5])])
    deduplicated = padded.deduplicate()
    assert len(deduplicated) == 9 and deduplicated.patient.tolist() == counts.patient.tolist()
    conflicting = counts.select([0])
    conflicting.pred_pixels[0, 0] += 1
    with pytest.raises(ConfigError):
        m.SliceCounts.concatenate([counts, conflicting]).deduplicate()
    with pytest.raises(ConfigError):
        m.SliceCounts.concatenate([counts, m.SliceCounts.empty((0.5,))])
    # persistence
    restored = m.SliceCounts.from_dict(json.loads(json.dumps(counts.to_dict())))
    path = tmp_path / "counts.npz"
    counts.save(path)
    for other in (restored, m.SliceCounts.load(path)):
        for name in (
            "patient",
            "slice_index",
            "thresholds",
            "gt_pixels",
            "pred_pixels",
            "intersection",
            "voxel_ml",
        ):
            assert np.array_equal(getattr(other, name), getattr(counts, name))
    json.dumps(m.evaluation_tables(counts).to_dict())  # the report's input serialises


def test_invalid_counts_and_volumes() -> None:
    with pytest.raises(ConfigError):
        m.SliceCounts([1], [0], [0.5], [10], [[5]], [[6]])  # intersection > predicted
    with pytest.raises(ConfigError):
        m.SliceCounts([1], [0], [0.5, 0.5], [10], [[5, 5]], [[1, 1]])  # repeated threshold
    assert m.voxel_volume_ml([0.5, 0.5, 5.0]) == pytest.approx(0.00125)
    with pytest.raises(ConfigError):
        m.voxel_volume_ml([0.5, 0.0, 5.0])
    unknown = m.patient_metrics(
        m.count_slices(np.ones((1, 4, 4), bool), np.ones((1, 4, 4), bool), patient=1)
    )
    assert math.isnan(unknown.true_ml[0])  # no spacing known: volume undefined, not assumed


def test_one_voxel_volume_owner() -> None:
    """The evaluation's voxel volume is the spacing-based one of ichseg.io.nifti, which the header
    one uses (NaN there instead of an error)."""
    from ichseg.eval import volumes
    from ichseg.io import nifti

    assert m.voxel_volume_ml is volumes.voxel_volume_ml is nifti.spacing_volume_ml
    assert nifti.spacing_volume_ml((0.5, 0.5, 5.0, 1.0)) == pytest.approx(0.00125)
    with pytest.raises(ConfigError, match="voxel spacing"):
        nifti.spacing_volume_ml((1.0, 1.0))


def test_earlier_metric_and_report_names_stay() -> None:
    """Names that moved to counts / volumes / tables / markdown / cv import from the old modules."""
    from ichseg.eval import counts, cv, markdown, report, tables

    assert (
        m.SliceCounts is counts.SliceCounts and m.volume_table.__module__ == "ichseg.eval.volumes"
    )
    assert m.evaluation_tables is tables.evaluation_tables
    assert report.tables_markdown is markdown.tables_markdown
    assert report.merge_folds is cv.merge_folds and report.CV_REPORT_JSON == "cv_report.json"
