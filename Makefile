# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install test demo bench-engine bench-runtimes bench-draft bench-kernels ortgenai-builder llama-cpp clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# --no-compile: Python compiles what it imports, when it does (bytecode for all of torch took part of the set-up)
	$(BIN)/pip install -q --no-compile -e '.[test,compress,bench,peers]'
	@# Our 4-bit kernel (an OpenVINO extension, g++ + cmake, ~10 s); where it cannot build, the stock kernels run.
	$(BIN)/python -m mirror_deploy.kernels build || echo "note: the 4-bit kernel did not build; the stock kernels run"
	touch $(STAMP)

install: $(STAMP)

# Two workers, a test file each at a time: one file's subprocess and I/O waits leave the other core to the other.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

demo: $(STAMP)
	$(BIN)/mirror-deploy demo

# Figures of the engine and the runtimes on random models (A/B interleaved, medians).
bench-engine: $(STAMP)
	$(BIN)/python -m mirror_deploy.bench.engine

bench-runtimes: $(STAMP)
	$(BIN)/python -m mirror_deploy.bench.runtimes

# The 4-bit kernel routes (ours, ORT MatMulNBits, OpenVINO int4, torch int4pack; add --inductor, --gguf FILE) at 1/2/4/8 rows.
bench-kernels: $(STAMP)
	$(BIN)/python -m mirror_deploy.bench.kernels

# The draft call at widths 1/4/8, explicit K/V inputs against the stateful graph (stand-in at 0.5B widths).
bench-draft: $(STAMP)
	$(BIN)/python -m mirror_deploy.bench.draft_calls --stand-in

# onnxruntime-genai's model builder needs transformers 5.x, which clashes with our pins: it gets its own
# venv, used only to build the peer's models (`--peers ort-genai-...`).
ORTGENAI_VENV ?= /tmp/ortgenai-venv
ortgenai-builder:
	$(PY) -m venv $(ORTGENAI_VENV)
	$(ORTGENAI_VENV)/bin/pip install -q torch==2.13.0 "transformers==5.23.*" "onnxruntime-genai==0.18.*" "onnx-ir==1.1.*"

# llama.cpp (`--peers llama-cpp...`): llama-server and llama-bench built from the source the
# llama-cpp-python 0.3.36 sdist vendors (no wheel or package fits), 4-10 min on two cores, installed with
# its GGUF converter into ${MIRROR_DEPLOY_CACHE:-~/.cache/mirror-deploy}/llama.cpp/0.3.36.
llama-cpp: $(STAMP)
	mirror_deploy/bench/peers/llama_cpp_build.sh $(BIN)/pip

clean:
	rm -rf $(VENV) artifacts .pytest_cache
