# ichseg: `make demo` runs the pipeline on a generated phantom, `make test` runs the fast tests.
# Both create the virtual environment (.venv) and install ichseg into it first when needed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ichseg-installed
# The torch requirement installed before ichseg when the environment has no torch yet. The default
# takes what pip's configured sources offer (on a GPU machine: the CUDA build). To choose, e.g.
#   make install TORCH_SPEC="torch==2.5.1" PIP_EXTRA="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch
PIP_EXTRA ?=
DEMO_DIR ?= outputs/demo
PYTEST_ARGS ?=

.PHONY: help install test test-all demo cv compare bench lint clean

help:
	@echo "make demo      generate a phantom CT-ICH dataset and run the pipeline on it"
	@echo "make test      run the fast tests (installs into $(VENV) first when needed)"
	@echo "make cv        5-fold cross-validation (demo settings on the phantom by default) and its report"
	@echo "make compare   the paper recipe against the improved ones on one phantom split (CPU, ~5 min)"
	@echo "make test-all  run every test, the slow ones included"
	@echo "make bench     run the benchmarks under bench/"
	@echo "make install   create $(VENV) and install ichseg with its test tools"
	@echo "make clean     remove build files, caches and outputs/"

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(PIP_EXTRA) "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIP_EXTRA) -e ".[dev]"
	@touch $@

test: install
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The demo: a phantom CT-ICH release (NIfTI layout), its check, then one CV round of the windowed
# pipeline with CPU settings (conf/experiment/demo.yaml). Outputs under $(DEMO_DIR)/.
demo: install
	$(PY) -m ichseg.data.phantom $(DEMO_DIR)/phantom --release nifti --patients 40 --slices 10 --size 256 --seed 0 --overwrite --no-progress
	$(PY) -m ichseg.data.check $(DEMO_DIR)/phantom --no-progress
	$(PY) -m ichseg.train experiment=demo data.root=$(DEMO_DIR)/phantom paths.log_dir=$(DEMO_DIR)

# The whole study: the 5 CV rounds as one Hydra multirun sharing one split, then the CV report.
# On the real data:  make cv CV_ARGS="experiment=windowed data.root=/data/ct-ich trainer=gpu"
CV_ARGS ?= experiment=demo data.root=$(DEMO_DIR)/phantom
CV_DIR ?= outputs/cv

cv: install
	$(PY) -m ichseg.train -m $(CV_ARGS) paths.log_dir=$(CV_DIR) data.fold=0,1,2,3,4
	$(PY) -m ichseg.report "$$(ls -d $(CV_DIR)/train/multiruns/*/ | tail -n 1)"

# The paper recipe against the improved recipes (docs/recipes.md): every row a real training run on
# the same phantom split at the same small CPU budget; one table, exit 1 when windowed_plus does not
# beat the paper recipe on Dice and false-positive mL. More rows: make compare COMPARE_ARGS="--all"
# (one per switch) or COMPARE_ARGS="--ablations" (windowed_plus without each switch).
# Outputs in outputs/compare/<time>/ (compare.md, compare.json, one folder a recipe).
COMPARE_ARGS ?=

compare: install
	$(PY) bench/compare_recipes.py $(COMPARE_ARGS)

# The benchmarks share one full-size phantom NIfTI release (75 patients, 512x512), made once.
BENCH_PHANTOM ?= outputs/bench/phantom-nifti

$(BENCH_PHANTOM):
	$(PY) -m ichseg.data.phantom $@ --release nifti --seed 0

bench: install $(BENCH_PHANTOM)
	$(PY) bench/load.py --root $(BENCH_PHANTOM)
	$(PY) bench/data_throughput.py --root $(BENCH_PHANTOM)
	$(PY) bench/stitch.py
	$(PY) bench/threshold.py --root $(BENCH_PHANTOM)
	$(PY) bench/predict.py
	$(PY) bench/train_loop.py
	$(PY) bench/evaluate.py

lint: install
	$(PY) -m ruff check ichseg tests bench

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache outputs
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
