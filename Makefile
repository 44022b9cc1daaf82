# The two commands a new user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
TORCH_SPEC := $(VENV)/.torch-spec

.PHONY: setup demo test test-long lint bench bench-accuracy bench-isbi bench-thick mlflow-ui clean distclean FORCE

setup: $(INSTALLED)

# Rewritten only when TORCH changes, so a different spec (a CUDA build) triggers a reinstall.
$(TORCH_SPEC): FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH)' | cmp -s - $@ || echo '$(TORCH)' > $@

$(INSTALLED): pyproject.toml $(TORCH_SPEC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/python data/prepare_mni_brain.py
	$(BIN)/medseg demo

test: setup
	$(BIN)/python -m pytest -q -m "not long"

# The reliability tests that take minutes: real processes killed at random, memory over 50 cases.
test-long: setup
	$(BIN)/python -m pytest -q -m long

# Speed per bundle on this machine; never part of `make test`.
bench: setup
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Held-out Dice per bundle, planned against its defaults, 10 minutes a training (hours); never in `make test`.
bench-accuracy: setup
	$(BIN)/python -m bench.accuracy $(BENCH_ACCURACY_ARGS)

bench-isbi: setup
	$(BIN)/python -m bench.isbi $(BENCH_ISBI_ARGS)

# 2D (slice-wise) against 3D unet3d on the hippocampus cases resampled to 5 mm slices.
bench-thick: setup
	$(BIN)/python -m bench.thick_slices $(BENCH_THICK_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

mlflow-ui: setup
	@mkdir -p mlflow
	@echo "MLflow UI: http://$(MLFLOW_HOST):$(MLFLOW_PORT)  (Ctrl-C to stop)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlruns.db \
		--default-artifact-root $(CURDIR)/mlflow/mlruns --host $(MLFLOW_HOST) --port $(MLFLOW_PORT)

clean:
	rm -rf outputs mlflow data/mni_brain data/cache .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
