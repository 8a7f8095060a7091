"""Benchmark: the paper's windowed U-Net against the improved recipes, on the same phantom folds.

Every recipe is a real ``python -m ichseg.train`` run (composed from ``conf/`` with Hydra's compose
API and run through :func:`ichseg.train.train`): fit on the training patients, best-validation
checkpoint, stitched evaluation of the test patients on their original grid. All recipes share

* one generated phantom NIfTI release (default 20 patients x 12 slices of 128x128, seed 0),
* one ``splits.json`` (5 patient-grouped folds, round 0: 12 training, 4 validation, 4 test
  patients) and one slice cache,
* the phantom geometry of the paper's grid (windows of a quarter of the slice, stride an eighth:
  the 7x7 grid of 160/80 on 640), batch 16 windows (2 whole slices in full-slice mode),
* a narrow network (``--width`` base filters, default 8; the paper's 24-layer U-Net otherwise),
* the same number of epochs (``--epochs``, default 20), seed 42, one CPU process.

Rows (``--recipes``, default ``paper,paper_lr,windowed_plus,full_slice_plus``; ``--all`` adds one
row per switch on top of ``paper_lr``):

===================  ==============================================================================
``paper``            ``experiment=windowed``: BCE, no normalisation, Adam 1e-5 with Keras decay,
                     brain window, positives + one ICH-free slice per patient, plain averaging,
                     0.5 + closing/opening. At 1e-5 it learns next to nothing in a CPU budget.
``paper_lr``         the same at the demo's learning rate, 1e-3: isolates the other changes.
``+dice_bce``        ``paper_lr`` + Dice + BCE loss.
``+bce_pos_weight``  ``paper_lr`` + BCE with ICH pixels weighted 10x (``pos_weight``).
``+batch_norm``      ``paper_lr`` + batch normalisation.
``+conv1x1_head``    ``paper_lr`` + a 1x1 output convolution instead of the 2-filter ReLU one.
``+windows``         ``paper_lr`` + brain, subdural and bone windows as channels.
``+context``         ``paper_lr`` + 2.5D input (one neighbouring slice on each side).
``+oversample``      ``paper_lr`` + foreground oversampling (a third of every batch).
``+tuned``           ``paper_lr`` + Gaussian stitching, threshold / post-processing tuned on val.
``windowed_plus``    ``experiment=windowed_plus``: the switches above but the weighted BCE,
                     Adam 1e-3 with cosine decay.
``full_slice_plus``  ``experiment=full_slice_plus``: whole slices, the same improvements.
``plus-<switch>``    ``--ablations``: ``windowed_plus`` with one switch turned back to the paper's.
===================  ==============================================================================

It prints one table: the paper's Dice (mean over test patients with ICH of their mean ICH-slice
Dice), the per-patient 3D Dice, the false-positive volume (mean predicted mL on the ICH-free test
patients), the volume outside the bleed (mean predicted mL on pixels without ICH over all test
patients), slice-detection sensitivity / specificity at probability 0.5, optimiser steps and
seconds, with the Dice and false-positive differences against the ``paper`` row; then whether
``windowed_plus`` beats ``paper`` on Dice and on both false-positive volumes. ``compare.json`` and
``compare.md`` go into ``--out`` (default ``outputs/compare/<time>``), each run into its own folder.

    python bench/compare_recipes.py                 # about 5 minutes on 2 CPU cores
    python bench/compare_recipes.py --all           # one row per switch as well (about 15 minutes)
    python bench/compare_recipes.py --ablations     # windowed_plus without each switch (+20 min)
    python bench/compare_recipes.py --size 256 --epochs 12 --out outputs/compare/big

Exit status: 0 when ``windowed_plus`` beats ``paper`` on all three (or when either row was not run),
1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXPERIMENTS = Path(__file__).resolve().parents[1] / "conf" / "experiment"
#: the improvements, each one config file pair in conf/experiment/compare/: ``with_<name>`` adds it
#: to the paper recipe (at the demo learning rate, ``paper_lr``), ``without_<name>`` turns it back
#: to the paper's within ``experiment=windowed_plus``
SWITCHES: tuple[str, ...] = (
    "dice_bce", "batch_norm", "conv1x1_head", "windows", "context", "oversample", "tuned",
)  # fmt: skip
#: row name -> the experiment config (conf/experiment/<name>.yaml) it trains
ROWS: dict[str, str] = {
    "paper": "windowed",
    "paper_lr": "compare/paper_lr",
    **{f"+{name}": f"compare/with_{name}" for name in SWITCHES},
    # the other loss of the list; not part of windowed_plus
    "+bce_pos_weight": "compare/with_bce_pos_weight",
    "windowed_plus": "windowed_plus",
    "full_slice_plus": "compare/full_slice_plus",
    # leave-one-out ablation: windowed_plus with one switch turned back to the paper's
    **{f"plus-{name}": f"compare/without_{name}" for name in SWITCHES},
}


def row_description(experiment: str) -> str:
    """What a row is: the second line of a ``compare/`` file, else ``experiment=<name>``."""
    if not experiment.startswith("compare/"):
        return f"experiment={experiment}"
    lines = (EXPERIMENTS / f"{experiment}.yaml").read_text().splitlines()
    return lines[1].lstrip("# ").strip()


#: name -> (what it is, the Hydra override that selects its config file)
RECIPES: dict[str, tuple[str, list[str]]] = {
    name: (row_description(experiment), [f"experiment={experiment}"])
    for name, experiment in ROWS.items()
}
ADDED = ("+dice_bce", "+bce_pos_weight", *(f"+{name}" for name in SWITCHES if name != "dice_bce"))
WITHOUT = tuple(f"plus-{name}" for name in SWITCHES)
DEFAULT_RECIPES = ("paper", "paper_lr", "windowed_plus", "full_slice_plus")
BASELINE, IMPROVED = "paper", "windowed_plus"
FIRST_SEED = 42


@dataclass
class RecipeResult:
    """The test metrics of one recipe's run."""

    name: str
    description: str
    dice: float
    dice_3d: float
    fp_ml: float
    outside_ml: float
    sensitivity: float
    specificity: float
    steps: int
    seconds: float
    run_dir: str
    tuned: dict | None = None
    seeds: list[int] = field(default_factory=lambda: [FIRST_SEED])
    dice_sd: float = math.nan  # over seeds, with more than one
    points: list[str] = field(default_factory=list)  # the operating point of each seed's run


def operating_point(tuned: dict | None) -> str:
    """The threshold and post-processing a run was scored at."""
    if not tuned:
        return "0.5, closing/opening"
    post = "closing/opening" if tuned.get("postprocess") else "no morphology"
    return f"{tuned.get('threshold'):g}, {post} (val)"


def mean_over_seeds(runs: Sequence[RecipeResult]) -> RecipeResult:
    """One row from the runs of one recipe with different seeds: means, the Dice's sample standard
    deviation, the total seconds, and each run's operating point."""
    if len(runs) == 1:
        return replace(runs[0], points=[operating_point(runs[0].tuned)])

    def mean(name: str) -> float:
        return float(np.nanmean([getattr(r, name) for r in runs]))

    dice = np.array([r.dice for r in runs], dtype=float)
    first = runs[0]
    return replace(
        first,
        dice=mean("dice"), dice_3d=mean("dice_3d"), fp_ml=mean("fp_ml"),
        outside_ml=mean("outside_ml"), sensitivity=mean("sensitivity"),
        specificity=mean("specificity"), seconds=float(sum(r.seconds for r in runs)),
        run_dir=str(Path(first.run_dir).parent), tuned=None,
        seeds=[s for r in runs for s in r.seeds], dice_sd=float(np.nanstd(dice, ddof=1)),
        points=[operating_point(r.tuned) for r in runs],
    )  # fmt: skip


def shared_overrides(
    root: Path,
    out: Path,
    size: int,
    epochs: int,
    width: int,
    patients: int,
    slices: int,
    seed: int = 42,
) -> list[str]:
    """The settings every recipe shares (phantom, folds, geometry, budget, outputs)."""
    return [
        "data=phantom",
        f"data.root={root}",
        f"data.phantom.patients={patients}",
        f"data.phantom.slices={slices}",
        f"data.phantom.size={size}",
        "data.exclude=[]",
        "data.k=5",
        "data.fold=0",
        f"data.splits_file={out / 'splits.json'}",
        f"data.cache_dir={out / 'cache'}",
        f"data.working_size={size}",
        f"data.tile_size={size // 4}",
        f"data.tile_stride={size // 8}",
        "data.batch_size=16",
        "data.num_workers=0",
        f"model.net.base_filters={width}",
        "model.image_log_every_n_epochs=0",
        "trainer=cpu",
        f"trainer.max_epochs={epochs}",
        "trainer.log_every_n_steps=5",
        "+trainer.enable_model_summary=false",
        "callbacks.progress_bar.refresh_rate=0",
        "callbacks.stitched_eval.n_overlays=0",
        "logger=csv",
        f"paths.log_dir={out}",
        f"seed={seed}",
    ]


def run_recipe(name: str, common: list[str], out: Path, seed: int | None = None) -> RecipeResult:
    """Train and test one recipe; its outputs go into ``out/<name>`` (``out/<name>/seed<seed>``
    when ``seed`` is given; ``common`` holds the matching ``seed=`` override)."""
    import torch

    from ichseg.train import compose_config, train

    description, overrides = RECIPES[name]
    run_dir = out / name.lstrip("+")
    if seed is not None:
        run_dir = run_dir / f"seed{seed}"
    cfg = compose_config([*common, *overrides], run_dir)  # the recipe's own settings win
    start = time.perf_counter()
    metrics = train(cfg)
    seconds = time.perf_counter() - start
    last = run_dir / "checkpoints" / "last.ckpt"
    steps = int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])
    report = json.loads((run_dir / "report.json").read_text())

    def value(key: str) -> float:
        number = metrics.get(key, math.nan)
        return float(number) if number is not None else math.nan

    return RecipeResult(
        name=name,
        description=description,
        dice=value("test/stitched_dice"),
        dice_3d=value("test/stitched_dice_3d"),
        fp_ml=value("test/stitched_fp_ml"),
        outside_ml=value("test/stitched_outside_ml"),
        sensitivity=value("test/stitched_sensitivity@0.5"),
        specificity=value("test/stitched_specificity@0.5"),
        steps=steps,
        seconds=seconds,
        run_dir=str(run_dir),
        tuned=report["settings"].get("tuned_on_val"),
        seeds=[FIRST_SEED if seed is None else seed],
    )


def _cell(value: float, digits: int = 3, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _lower(new: float, old: float) -> bool:
    """``new`` mL is lower than ``old`` mL, or both are 0 (nothing to remove)."""
    if not math.isfinite(new):
        return False
    return not math.isfinite(old) or new < old or new == old == 0


def format_table(results: Sequence[RecipeResult]) -> str:
    """The comparison as a markdown table, with differences against the ``paper`` row."""
    baseline = next((r for r in results if r.name == BASELINE), None)
    header = ["recipe", "Dice", "Δ Dice", "3D Dice", "FP mL", "Δ FP mL", "outside mL",
              "Δ outside mL", "sens@0.5", "spec@0.5", "steps", "s", "operating point"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|:---|" + "---:|" * (len(header) - 2) + ":---|"]
    for r in results:
        d_dice = r.dice - baseline.dice if baseline else math.nan
        d_fp = r.fp_ml - baseline.fp_ml if baseline else math.nan
        d_outside = r.outside_ml - baseline.outside_ml if baseline else math.nan
        points = r.points or [operating_point(r.tuned)]
        point = points[0] if len(set(points)) == 1 else " / ".join(points)
        dice = _cell(r.dice) if len(r.seeds) == 1 else f"{_cell(r.dice)} ± {_cell(r.dice_sd)}"
        cells = [r.name, dice, _cell(d_dice, signed=True), _cell(r.dice_3d),
                 _cell(r.fp_ml, 2), _cell(d_fp, 2, signed=True), _cell(r.outside_ml, 2),
                 _cell(d_outside, 2, signed=True), _cell(r.sensitivity), _cell(r.specificity),
                 str(r.steps), f"{r.seconds:.0f}", point]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(results: Sequence[RecipeResult]) -> tuple[bool | None, str]:
    """Does ``windowed_plus`` beat ``paper`` on Dice (higher) and on false positives (lower mL on
    the ICH-free test patients AND lower mL outside the bleed over all test patients)?

    None when either row is missing. A volume counts as beaten when it is lower, or equal at 0 mL
    (nothing to remove).
    """
    by_name = {r.name: r for r in results}
    if BASELINE not in by_name or IMPROVED not in by_name:
        return None, f"{IMPROVED} vs {BASELINE}: not compared (both rows are needed)"
    paper, plus = by_name[BASELINE], by_name[IMPROVED]
    dice_ok = math.isfinite(plus.dice) and (not math.isfinite(paper.dice) or plus.dice > paper.dice)
    fp_ok = _lower(plus.fp_ml, paper.fp_ml)
    outside_ok = _lower(plus.outside_ml, paper.outside_ml)
    holds = dice_ok and fp_ok and outside_ok
    line = (
        f"{IMPROVED} beats {BASELINE} at the same budget: {'YES' if holds else 'NO'} "
        f"(Dice {_cell(plus.dice)} vs {_cell(paper.dice)}: "
        f"{'better' if dice_ok else 'NOT better'}; "
        f"false-positive volume {_cell(plus.fp_ml, 2)} vs {_cell(paper.fp_ml, 2)} mL: "
        f"{'lower' if fp_ok else 'NOT lower'}; "
        f"volume outside the bleed {_cell(plus.outside_ml, 2)} vs {_cell(paper.outside_ml, 2)} mL: "
        f"{'lower' if outside_ok else 'NOT lower'})"
    )
    return holds, line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                        help=f"comma-separated rows among {', '.join(RECIPES)}")  # fmt: skip
    parser.add_argument(
        "--all",
        action="store_true",
        help="the default rows and one row per switch added to paper_lr",
    )
    parser.add_argument("--ablations", action="store_true",
                        help="also windowed_plus without each switch (leave-one-out)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=20, help="epochs of every recipe")
    parser.add_argument("--size", type=int, default=128, help="phantom slice size (128 or 256)")
    parser.add_argument("--width", type=int, default=8, help="U-Net base filters")
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--seeds", type=int, default=1,
                        help=f"runs per recipe, seeds {FIRST_SEED}, {FIRST_SEED + 1}, ...; the "
                        "table shows their means (and the Dice's standard deviation)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")

    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    if args.all:
        names = ["paper", "paper_lr", *ADDED, "windowed_plus", "full_slice_plus"]
    if args.ablations:
        names += [n for n in ("paper", "windowed_plus", *WITHOUT) if n not in names]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose among {', '.join(RECIPES)}")
    if args.size % 64:
        parser.error("--size must be a multiple of 64 (windows of size/4 through a depth-4 U-Net)")
    out = args.out or Path("outputs/compare") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from ichseg.data.phantom import generate_phantom
    from ichseg.utils.atomic import atomic_write_text

    root = out / "phantom"
    if not (root.exists() and any(root.iterdir())):
        generate_phantom(root, "nifti", n_patients=args.patients, n_slices=args.slices,
                         size=args.size, seed=0)  # fmt: skip
    seeds = [FIRST_SEED + i for i in range(args.seeds)]
    print(
        f"phantom: {args.patients} patients x {args.slices} slices of {args.size}x{args.size}, "
        f"fold 0 of 5; {args.epochs} epochs per recipe; U-Net base {args.width}; "
        f"seeds {', '.join(map(str, seeds))}; outputs in {out}",
        flush=True,
    )
    results, all_runs = [], []
    for name in names:
        print(f"[{name}] {RECIPES[name][0]} ...", flush=True)
        runs = []
        for seed in seeds:
            common = shared_overrides(root, out, args.size, args.epochs, args.width,
                                      args.patients, args.slices, seed)  # fmt: skip
            run = run_recipe(name, common, out, seed if len(seeds) > 1 else None)
            print(f"[{name}] seed {seed}: Dice {_cell(run.dice)}, FP {_cell(run.fp_ml, 2)} mL, "
                  f"outside {_cell(run.outside_ml, 2)} mL, {run.steps} steps, "
                  f"{run.seconds:.0f} s", flush=True)  # fmt: skip
            runs.append(run)
        results.append(mean_over_seeds(runs))
        all_runs += runs

    table = format_table(results)
    holds, line = verdict(results)
    settings = (
        f"Phantom {args.patients} patients x {args.slices} slices of {args.size}x{args.size} "
        f"(seed 0), CV round 0 of 5 (the same split for every row), {args.epochs} epochs, U-Net "
        f"base {args.width}, windows {args.size // 4}/{args.size // 8}, batch 16 windows "
        f"(full_slice_plus: 2 slices), seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(map(str, seeds))}"
        f"{' (means over the seeds; Dice ± its standard deviation)' if len(seeds) > 1 else ''}"
        ", CPU. Dice: the paper's (test patients with ICH); "
        "FP mL: mean predicted volume on the ICH-free test patients; outside mL: mean predicted "
        "volume outside the true bleed over all test patients; sens/spec: pooled slice "
        "detection at 0.5; Δ: against the paper row."
    )
    print("\n" + table + "\n\n" + settings + "\n\n" + line)
    document = {
        "settings": vars(args) | {"out": str(out)},
        "results": [asdict(r) for r in results],
        "runs": [asdict(r) for r in all_runs],
        "improved_beats_paper": holds,
        "verdict": line,
    }
    atomic_write_text(out / "compare.json", json.dumps(document, indent=1, default=str) + "\n")
    atomic_write_text(out / "compare.md", table + "\n\n" + settings + "\n\n" + line + "\n")
    return 0 if holds in (None, True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
