# The two set-up commands: `make demo` (offline main job) and `make test` (the test suite).
# Each creates .venv and installs what it needs on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch for this project's development machines (CPU, Python 3.11); override for CUDA builds.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= -n 2 -q

.PHONY: demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[tests,benchmarks]"
	touch $@

demo: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m hf_freeze.demo

test: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check $(wildcard hf_freeze tests examples benchmarks)

clean:
	rm -rf $(VENV) outputs .pytest_cache
