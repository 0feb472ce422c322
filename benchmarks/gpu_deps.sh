#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh on a GPU machine without network whose python lacks pydantic or
# pytest (torch, transformers, accelerate and safetensors are expected there). Run here, with network:
# unpacks the pinned versions (constraints.txt) into .gpu_deps/common (pure python) and
# .gpu_deps/py3XX (pydantic-core, compiled per Python version). Git-ignored; travels with `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
pins=$(grep -E '^(pydantic|pydantic-core|pytest)==' constraints.txt)
rm -rf .gpu_deps.tmp && mkdir -p .gpu_deps.tmp/common
for v in 3.10 3.11 3.12 3.13; do
  w=.gpu_deps.tmp/wheels${v/./}
  .venv/bin/python -m pip download -q --only-binary=:all: --python-version "$v" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$w" $pins 2>/dev/null
  mkdir -p .gpu_deps.tmp/py${v/./}
  for f in "$w"/*.whl; do
    case "$(basename "$f")" in
      pydantic_core-*) .venv/bin/python -m zipfile -e "$f" .gpu_deps.tmp/py${v/./} ;;
      packaging-*|typing_extensions-*) ;;  # the GPU machine's own (torch needs them) must not be shadowed
      *) .venv/bin/python -m zipfile -e "$f" .gpu_deps.tmp/common ;;
    esac
  done
  rm -rf "$w"
done
rm -rf .gpu_deps && mv .gpu_deps.tmp .gpu_deps
du -sh .gpu_deps .gpu_deps/*
