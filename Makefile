# Two commands do all set-up on a fresh clone (see README):
#   make run    environment + data (dvc pull, offline) + the whole pipeline (dvc repro) + summary
#   make test   environment + data + the test suite
#   make towers the ScalingNote pipeline (scalingnote/dvc.yaml) after the default one
#   make measure re-measure the serving and training costs into costs/ (versioned in git: commit it)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# The suite runs in this many pytest-xdist workers, a test file each (its module fixtures: one Ray
# cluster, one MLflow server); run serially, the suite kept the 2 cores only ~55% busy (BENCHMARKS.md).
TEST_WORKERS ?= 2

.PHONY: setup data run towers measure exps test clean

setup: $(VENV)/.installed $(VENV)/triton-stub-env/.installed

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

# The Triton tokenizer models' Python environment (numpy 1 + tokenizers; see drscaling.serving.stub_env)
$(VENV)/triton-stub-env/.installed: requirements-triton-stub.txt $(VENV)/.installed
	$(BIN)/python -m drscaling.serving.stub_env
	touch $@

# The embedded snapshot lives in the repository's own DVC store (dvc-store/): no network needed.
data: setup
	dvc pull -q data.dvc

run: data
	dvc repro
	drscaling summary

towers: data
	dvc repro scalingnote/dvc.yaml
	drscaling summary

# Measured costs are versioned data (costs/), not a DVC stage: Triton timings differ on every run.
# Re-measure on demand; `dvc repro export` trains and exports the model sweep first if it is not
# up to date. The budget stage then sees the new costs/costs.json (git diff shows what moved).
COSTS ?= costs/costs.json
measure: data
	dvc repro export
	drscaling measure --repo artifacts/serving/repo --out $(COSTS)

# `dvc exp show`, compact: the experiment, the fitted exponents and R^2 (metrics named in
# artifacts/laws/metrics.json) and the parameters experiments vary; `dvc exp show` alone lists all.
EXP_COLUMNS := Experiment|^(N|D|ND)\.(alpha|beta|r2)$$|^sweep\.(preset|train\..*)$$|^train\.seed$$
exps:
	dvc exp show --no-pager --drop '.*' --keep '$(EXP_COLUMNS)'

test: data
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=25

clean:
	rm -rf artifacts mlflow.db mlruns
