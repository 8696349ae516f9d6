# make demo : train the tiny model on synthetic charts, evaluate it, merge, export GGUF, ask it a question
# make demo-qlora : the demo's model loaded in 4-bit learns a new question through a LoRA adapter (QLoRA on the CPU)
# make demo-ocr: train the tiny model to read numbers the kit draws, and report its CER against base and controls
# make demo-grpo: GRPO from the demo's SFT run (runs/demo; trained first if missing), aimed at "which label is
#   highest"; prints both runs' scores on the same 200 test questions and the paired comparison (McNemar)
# make board: the web app for the whole workflow (train, evaluate, export, chat) on http://127.0.0.1:7860
# make test : ruff, then the test suite (CPU, offline, a few minutes; the first run also builds llama.cpp, ~4 min)
# make test-fast: the suite without the tests marked slow (pytest.ini), for the edit-test loop
# make test-unsloth : the kit with Unsloth imported and its patches in place (CPU mode), in its own venv
# Both create .venv on first use. On a GPU machine use `python install.py` instead.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Built llama.cpp wheels live outside the repo, so a fresh clone on the same machine reuses them.
CACHE ?= $(HOME)/.cache/qwen2vl-kit
LLAMA_CPP_PYTHON := 0.3.36
# The demos' run folders, and the QLoRA run made on top of the demo's.
DEMO := runs/demo
DEMO_OCR := runs/demo-ocr
DEMO_QLORA := runs/demo-qlora

.PHONY: demo demo-grpo demo-ocr demo-qlora test test-fast test-unsloth venv llama-cpp clean board browser

venv: $(VENV)/.installed

$(VENV)/.installed: requirements-core.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU machine's torch (a CUDA build that runs on the CPU) must come before the rest pins nothing newer.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements-core.txt -r requirements-dev.txt
	touch $@

# llama-cpp-python runs the GGUF files in tests and infer.py; its source build takes minutes, so the wheel is
# kept in $(CACHE)/wheels and reused.
llama-cpp: $(VENV)/.llama-cpp

$(VENV)/.llama-cpp: $(VENV)/.installed
	mkdir -p $(CACHE)/wheels
	ls $(CACHE)/wheels/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(PY) -m pip wheel -q --no-deps --no-binary llama-cpp-python -w $(CACHE)/wheels llama-cpp-python==$(LLAMA_CPP_PYTHON)
	$(PY) -m pip install -q $(CACHE)/wheels/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl
	touch $@

# llama.cpp's converter (convert_hf_to_gguf.py + conversion/ + gguf-py), unpacked from the same sdist into the
# kit's cache on first use; fetched here so the tests and the demo find it before they need it.
CONVERTER := $(CACHE)/llama.cpp-src/llama-cpp-python-$(LLAMA_CPP_PYTHON)/convert_hf_to_gguf.py

$(CONVERTER): $(VENV)/.installed
	QWEN2VL_KIT_CACHE=$(CACHE) $(PY) -c "from kit.export.converter import find_converter; print(find_converter())"

# --durations: the slowest tests and their seconds, so the suite's cost is seen at every run.
test: $(VENV)/.installed $(VENV)/.llama-cpp $(CONVERTER)
	-@$(MAKE) --no-print-directory browser
	$(PY) -m ruff check .
	QWEN2VL_KIT_CACHE=$(CACHE) $(PY) -m pytest -q --durations=15 tests

# The edit-test loop: everything but the tests marked slow (subprocesses, several training runs, GGUF files,
# torchrun, the browser); a few minutes once the cache holds the tiny model.
test-fast: $(VENV)/.installed $(VENV)/.llama-cpp
	$(PY) -m ruff check .
	QWEN2VL_KIT_CACHE=$(CACHE) $(PY) -m pytest -q -m "not slow" --durations=15 tests

# The GPU install (install.py: requirements.txt around the installed torch) on this machine's torch, in its own
# venv: Unsloth patches transformers/trl/peft for the whole process, so it never shares the CPU lane's venv.
# It lives in the cache, named after what it is built from, so a fresh clone on the same machine reuses it: a cold
# build downloads the Unsloth stack (triton, xformers, ...) and takes minutes.
UNSLOTH_KEY := $(shell cat install.py requirements.txt requirements-core.txt requirements-dev.txt | sha1sum | cut -c1-12)
UNSLOTH_VENV ?= $(CACHE)/venv-unsloth-$(UNSLOTH_KEY)
UNSLOTH_PY := $(UNSLOTH_VENV)/bin/python

$(UNSLOTH_VENV)/.installed:
	mkdir -p $(CACHE)
	test -x $(UNSLOTH_PY) || $(PYTHON) -m venv $(UNSLOTH_VENV)
	$(UNSLOTH_PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(UNSLOTH_PY) install.py -q
	$(UNSLOTH_PY) -m pip install -q -r requirements-dev.txt
	touch $@

# UNSLOTH_ALLOW_CPU=1: Unsloth's CPU mode; the kit's switch lets --backend unsloth run here (tests/with_unsloth).
# Unsloth torch.compiles its patched create_causal_mask; on the CPU, inductor's own alloc_from_pool in that kernel
# trips torch's custom-op aliasing check, which torch makes a warning but an error wherever the CI variable is set.
test-unsloth: $(UNSLOTH_VENV)/.installed
	UNSLOTH_ALLOW_CPU=1 QWEN2VL_KIT_TEST_UNSLOTH_ON_CPU=1 QWEN2VL_KIT_CACHE=$(CACHE) \
	  TORCHINDUCTOR_ERROR_ON_CUSTOM_OP_ALIASING=0 $(UNSLOTH_PY) -m pytest -q tests/with_unsloth

demo: $(VENV)/.installed $(VENV)/.llama-cpp $(CONVERTER)
	$(PY) train.py --recipe demo --output $(DEMO) --force
	$(PY) eval.py $(DEMO) --data synthetic --compare base,finetuned --control shuffled --force
	$(PY) merge.py $(DEMO) --to merged,gguf --quant f16 --force
	$(PY) infer.py $(DEMO)-gguf --question "How many bars are in the chart?" \
	  --image "$$($(PY) -c 'import json; print(json.loads(open("$(DEMO)/eval/predictions.jsonl").readline())["image"])')"

# The base is the demo run (trained first when missing); the adapter's run is scored paired against the same 4-bit
# base without it, on 200 questions of the new type and on 200 of the two the base was trained on.
$(DEMO)/config.json: | $(VENV)/.installed
	$(PY) train.py --recipe demo --output $(DEMO) --force

demo-qlora: $(VENV)/.installed $(DEMO)/config.json
	$(PY) train.py --recipe demo_qlora --set model_name_or_path=$(DEMO) --output $(DEMO_QLORA) --force
	$(PY) eval.py $(DEMO_QLORA) --compare base,finetuned --question-types last --force
	$(PY) eval.py $(DEMO_QLORA) --compare base,finetuned --question-types count,max --out $(DEMO_QLORA)/eval-old --force

# The second laptop demo: a task scored by character error rate (recipes/demo_ocr.py), the same bar as `demo`:
# fine-tuned against base and against each shown another image, with intervals.
demo-ocr: $(VENV)/.installed
	$(PY) train.py --recipe demo_ocr --output $(DEMO_OCR) --force
	$(PY) eval.py $(DEMO_OCR) --data synthetic_text --compare base,finetuned --control shuffled --force

# The SFT run is scored into the GRPO run's folder (eval-sft), so make demo's own eval/ is left as it was.
demo-grpo: $(VENV)/.installed
	test -f $(DEMO)/model.safetensors || $(PY) train.py --recipe demo --output $(DEMO) --force
	$(PY) train.py --recipe demo_grpo --output $(DEMO)-grpo --set init_from=$(DEMO) --force
	$(PY) eval.py $(DEMO) --compare finetuned --out $(DEMO)-grpo/eval-sft --force
	$(PY) eval.py $(DEMO)-grpo --compare finetuned --force
	$(PY) eval.py --score sft=$(DEMO)-grpo/eval-sft/predictions.jsonl --score grpo=$(DEMO)-grpo/eval/predictions.jsonl \
	  --out $(DEMO)-grpo/eval-vs-sft --force

board: $(VENV)/.installed
	$(PY) board.py

# tests/test_board.py drives the OS's headless Chromium through its chromedriver (nothing downloads a browser).
# Installed with apt-get when missing and we are root (CI); otherwise the test skips and says how to run it.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } || \
	  echo "note: no chromium/chromedriver (apt-get install chromium chromium-driver as root): tests/test_board.py skips"

clean:
	rm -rf $(VENV) runs .pytest_cache
