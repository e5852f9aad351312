# moe-ray: `make run` and `make test` set up .venv first when it is missing or stale.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU torch that lies on local disk; a machine with an NVIDIA GPU keeps (or gets) its CUDA build.
TORCH_CPU := torch==2.13.0
NOT_COMPILED := /tests?/|/transformers/models/(?!(auto|glm4_moe|encoder_decoder)/)[^/]+/|/ray/(rllib|serve|llm)/|/databricks/sdk/

.PHONY: run test test-fast test-gpu bench bench-full study study-best lint setup clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if $(BIN)/python -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 9))" 2>/dev/null; then \
		echo "keeping installed torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the CUDA build of torch"; \
		$(BIN)/python -m pip install --quiet --no-compile "torch>=2.9,<2.15"; \
	else \
		echo "no NVIDIA GPU: installing the CPU build $(TORCH_CPU)"; \
		$(BIN)/python -m pip install --quiet --no-compile $(TORCH_CPU); \
	fi
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev,tokenizers]"
	@# Byte-compiled on every core: pip compiles one file at a time, half of the setup time on 2
	@# cores. Like pip, it passes over the few files written for another Python (torch's py312 tests).
	@# Not compiled (3 files in 10; ~25 s of the setup here): the packages' own test suites, and
	@# the parts of the dependencies that nothing of moe-ray or its tests imports (transformers'
	@# other model folders, Ray's RLlib, Serve and LLM, the Databricks SDK). Imported after all,
	@# they still work.
	$(BIN)/python -m compileall -qq -j 0 -x '$(NOT_COMPILED)' $(VENV)/lib || true
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/moe-ray run jobs/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest tests -v --timeout=900 --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow" --timeout=600

# On a machine with an NVIDIA GPU: the CUDA tests, then the GPU benchmarks (JSON lines).
test-gpu: $(STAMP)
	@$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: no CUDA GPU here (torch.cuda.is_available() is False); run it on a machine with one')"
	$(BIN)/python -m pytest tests -m gpu -v --timeout=900
	$(BIN)/python bench/moe_layer.py --quick
	$(BIN)/python bench/gpu.py --quick

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

bench-full: $(STAMP)
	$(BIN)/python bench/run_all.py --full

# The load-balance study (about 50 minutes here): figures into bench/results, plots into
# bench/results/balance_study/.
study: $(STAMP)
	$(BIN)/python bench/balance_study.py

# After `make study`: the other seeds of each controller at its sweep's best gamma (4 runs).
study-best: $(STAMP)
	$(BIN)/python bench/balance_study.py --resume --confirm-best

lint: $(STAMP)
	$(BIN)/ruff check moe_ray tests bench
	$(BIN)/ruff format --check moe_ray tests bench

clean:
	rm -rf $(VENV) mlruns .pytest_cache
