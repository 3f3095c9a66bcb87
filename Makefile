# edge-agent: `make demo` and `make test` work from a clean clone on Debian / Raspberry Pi OS.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= dev

.PHONY: all venv tflite-venv mosquitto demo test test-all bench lint format clean models

all: test

$(STAMP): pyproject.toml
	@PYTHON=$(PYTHON) VENV=$(VENV) EXTRAS=$(EXTRAS) tools/bootstrap.sh
	@touch $(STAMP)

venv: $(STAMP)

# A second venv with NumPy < 2 and tflite-runtime: the fallback backend is tested for real.
TFLITE_VENV ?= .venv-tflite
$(TFLITE_VENV)/.stamp: pyproject.toml
	@tools/make-tflite-venv.sh $(PYTHON) $(TFLITE_VENV)
	@touch $@

tflite-venv: $(TFLITE_VENV)/.stamp

mosquitto:
	@tools/ensure-mosquitto.sh

demo: venv mosquitto
	@BIN=$(BIN) tools/demo.sh

test: venv mosquitto tflite-venv
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

# Everything, including the long soak/fuzz runs that `make test` bounds.
test-all: venv mosquitto tflite-venv
	SLOW=1 $(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

bench: venv
	$(BIN)/python bench/run.py $(BENCH_ARGS)

lint: venv
	$(BIN)/ruff check .

format: venv
	$(BIN)/ruff format .

# Rebuild the sample models (needs TensorFlow: a separate, dev-only venv).
models:
	$(PYTHON) -m venv .venv-build
	.venv-build/bin/pip install -q -r tools/requirements-build.txt -e .
	.venv-build/bin/python tools/build_sample_models.py

clean:
	rm -rf $(VENV) $(TFLITE_VENV) .venv-build .pytest_cache build *.egg-info
