# Two commands do all set-up on a fresh machine:
#   make repro   - the pipeline end to end on the defaults (dvc repro)
#   make test    - the test suite
# Each creates the virtual environment .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export MLFLOW_DISABLE_TELEMETRY := 1
export DVC_NO_ANALYTICS := 1
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: venv repro push pull test test-unit test-fast lint format typecheck deps ablation schedules schedules-parallel schedules-report clean mutations

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

repro: $(STAMP)
	test -d .dvc || $(BIN)/dvc init -q
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# Share what `make repro` built (data/prepared, data/token_stats, data/schedule, models/final) through the
# default DVC remote: once, `.venv/bin/dvc remote add -d storage DIR-OR-URL` and commit .dvc/config. Commit
# dvc.lock and outputs/ (metrics and plots are small and go to git), then `make push`; on another
# machine, `git clone` + `make pull` leaves `dvc repro` nothing to do.
push: $(STAMP)
	@git ls-files --error-unmatch dvc.lock >/dev/null 2>&1 || echo "note: dvc.lock is not committed: a clone cannot pull what it does not know"
	$(BIN)/dvc push

pull: $(STAMP)
	$(BIN)/dvc pull
	$(BIN)/dvc status

# PAPER §8 at this scale (experiments/ablation.yaml), one budget per row (~100 min alone on 2 cores with AMX, hours
# without); rows and report also land in reports/ablation/ (commit them: a fresh checkout reuses them)
ablation: $(STAMP)
	test -d .dvc || $(BIN)/dvc init -q
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro token_stats
	$(BIN)/dbert ablation --experiment experiments/ablation.yaml

# The schedule experiment (experiments/schedules.yaml: linear, spindle, power, the MDLM recipe, 3 training
# seeds each, + LTE/PTE once). Resumable row by row and from checkpoints in outputs/schedules/; each
# finished row and the report so far are copied to reports/schedules/ (commit them: a fresh checkout
# reuses them). ~3 h per row on 2 slow fp32 CPU cores, minutes of training on a GPU.
SCHEDULE_SET := --experiment experiments/schedules.yaml
schedules: $(STAMP)
	test -d .dvc || $(BIN)/dvc init -q
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro token_stats
	DBERT_PROGRESS=log $(BIN)/dbert ablation $(SCHEDULE_SET)

# The same experiment as two halves at once, one thread each, then one run that reuses all 14 published
# rows (one MLflow parent, the final report); progress lines go to stderr (DBERT_PROGRESS=log). On this
# 2-core VM two 1-thread rows trained 0.98-1.67x the steps per hour of one 2-thread row, never worse
# than the noise and far better when one core is contended (benchmarks/bench_parallel_rows.py, README).
SCHEDULE_HALF_A := --row dbert_linear_tad --row dbert_power_tad --row dbert_linear_lte
SCHEDULE_HALF_B := --row dbert_spindle_tad --row mdlm_loglinear_tad --row dbert_linear_pte
# The schedule experiment's report from the rows finished so far (here or in reports/schedules): trains nothing.
schedules-report: $(STAMP)
	$(BIN)/dbert ablation $(SCHEDULE_SET) --report-only

schedules-parallel: $(STAMP)
	test -d .dvc || $(BIN)/dvc init -q
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro token_stats
	OMP_NUM_THREADS=1 DBERT_RAY_DASHBOARD=0 DBERT_PROGRESS=log $(BIN)/dbert ablation $(SCHEDULE_SET) $(SCHEDULE_HALF_A) & a=$$!; \
	OMP_NUM_THREADS=1 DBERT_RAY_DASHBOARD=0 DBERT_PROGRESS=log $(BIN)/dbert ablation $(SCHEDULE_SET) \
		--set ablation.out=outputs/schedules_b $(SCHEDULE_HALF_B); b=$$?; wait $$a && test $$b -eq 0
	DBERT_PROGRESS=log $(BIN)/dbert ablation $(SCHEDULE_SET)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Bugs put back by hand, one at a time, each must turn a named test red (tests/support/mutations.py).
mutations: $(STAMP)
	$(BIN)/python tests/support/mutations.py

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration" tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# ruff (lint + format check), mypy (strict on the maths), dvc.yaml code deps up to date.
# .ci/run runs it before the tests; `make format` applies ruff's fixes and formatting.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python tools/sync_dvc_deps.py --check

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: $(STAMP)
	$(BIN)/mypy

# Rewrite dvc.yaml's code deps as each stage's import closure (after moving code).
deps: $(STAMP)
	$(BIN)/python tools/sync_dvc_deps.py

# Everything the pipeline and the tests write into the checkout (not the venv, not DVC's cache).
clean:
	rm -rf outputs models data/prepared data/token_stats mlflow.db mlartifacts .pytest_cache .mypy_cache .ruff_cache
