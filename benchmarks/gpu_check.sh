#!/usr/bin/env bash
# The GPU check, in one go (under 8 minutes on one GPU): the cuda-marked tests, then the training-step
# benchmark (ViT-B/32 k=2,8 fp32 and bf16; the bf16 LS step's host work against the floor's; ViT-L/14
# k=8 with bf16 task vectors and gradient checkpointing). Runs from the source tree on a machine with torch (CUDA), transformers, accelerate
# and safetensors, without network, `datasets` or `pymoo`:
#     bash benchmarks/gpu_check.sh            # writes gpu_check_out/ (or $OUT)
# Without pydantic / pytest there, prepare .gpu_deps here first (benchmarks/gpu_deps.sh) and bring it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
ver=$($PY -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
path=src
if ! $PY -c "import pydantic, pytest" 2>/dev/null; then
  if [ -d ".gpu_deps/py$ver" ]; then
    path="src:.gpu_deps/common:.gpu_deps/py$ver"
  else
    echo "pydantic or pytest missing and no .gpu_deps/py$ver: run benchmarks/gpu_deps.sh where there is network"
    exit 2
  fi
fi
export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  nproc; } 2>&1 | tee "$OUT/machine.txt"
t0=$(date +%s)
echo "== cuda tests"
timeout 180 $PY -m pytest tests/test_devices.py -m cuda -p no:cacheprovider -q -rs 2>&1 | tee "$OUT/tests.txt" | tail -15
echo "== ViT-B/32, fp32, k=2,8 ($(( $(date +%s) - t0 )) s)"
timeout 200 $PY benchmarks/train_step.py --device cuda --shape vit-b32 --k 2 8 --steps 10 --micro 0 32 \
  --json "$OUT/vitb32_fp32.json" 2>&1 | tee "$OUT/vitb32_fp32.txt" | grep -v '^{'
echo "== ViT-B/32, fp32, k=8, checkpointing of the upcycled modules only ($(( $(date +%s) - t0 )) s)"
timeout 90 $PY benchmarks/train_step.py --device cuda --shape vit-b32 --k 8 --steps 10 --variants limit ls@0+upcycled \
  --json "$OUT/vitb32_fp32_upcycled_ckpt.json" 2>&1 | tee "$OUT/vitb32_fp32_upcycled_ckpt.txt" | grep -v '^{'
echo "== ViT-B/32, bf16, k=8 ($(( $(date +%s) - t0 )) s)"
timeout 120 $PY benchmarks/train_step.py --device cuda --precision bf16 --shape vit-b32 --k 8 --steps 10 \
  --variants limit limit_wgrad ls@0 epo pipeline --json "$OUT/vitb32_bf16.json" 2>&1 | tee "$OUT/vitb32_bf16.txt" | grep -v '^{'
echo "== host work: LS step against the floor, interleaved, with its phases (bf16 ViT-B/32, k=8) ($(( $(date +%s) - t0 )) s)"
timeout 120 $PY benchmarks/host_overhead.py --device cuda --precision bf16 --shape vit-b32 --k 8 --rounds 6 \
  --json "$OUT/host_bf16.json" 2>&1 | tee "$OUT/host_bf16.txt" | grep -v '^{'
echo "== ViT-L/14, bf16, bf16 task vectors, gradient checkpointing, k=8 ($(( $(date +%s) - t0 )) s)"
timeout 200 $PY benchmarks/train_step.py --device cuda --precision bf16 --shape vit-l14 --k 8 --steps 3 \
  --tv-dtype bfloat16 --checkpointing --variants limit ls@0 --json "$OUT/vitl14.json" 2>&1 | tee "$OUT/vitl14.txt" | grep -v '^{'
echo "== done in $(( $(date +%s) - t0 )) s"
