"""Where the demos' digits part between CPU kernel paths, and what the reproducible paths cost.

Runs the MiniLM demo's pipeline on small slices of its data (fp32: experts fine-tuned, routers trained, the grid
evaluated) once per setting of the environment variables that pick the CPU's kernels, each in a fresh process
(the variables are read when a library first computes), on top of the caller's environment, and prints per
setting the short sha256 of each expert and of the routers, and PWEMoE's hypervolume. Equal hashes mean
bit-identical experts or routers; where a setting changes the experts' hashes, the digits part at the fine-tuning.
`--llm` does the same for the LLM demo in bf16 (the precision it picks where the CPU computes bf16 natively).

It also times one fp32 GEMM of the demo's shapes under each setting (`--gemm`, the median of 20), the cost of
`MKL_CBWR=COMPATIBLE`. `--ops` only hashes single operations (fp32 and bf16 matmuls, softmax, attention, a long sum)
under each setting, in seconds: which kernels each variable switches on this CPU.

    .venv/bin/python benchmarks/kernel_paths.py [--llm] [--gemm] [--ops] [--out kernel_paths.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "default": {},
    "ATEN_CPU_CAPABILITY=avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "ONEDNN_MAX_CPU_ISA=AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "MKL_ENABLE_INSTRUCTIONS=AVX2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "MKL_CBWR=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
    "OMP_NUM_THREADS=2": {"OMP_NUM_THREADS": "2"},
}

CHILD = r"""
import json, sys, time
from pathlib import Path
work, llm = Path(sys.argv[1]), sys.argv[2] == "llm"
import os
os.environ["PWEMOE_CACHE"] = str(Path(os.environ.get("PWEMOE_CACHE", Path.home() / ".cache" / "pwemoe")))
ov = {"train.steps": 6, "train.save_interval": 3}
for i in range(3):
    ov[f"tasks.{i}.data.max_train_samples"] = 64
    ov[f"tasks.{i}.data.max_test_samples"] = 48
    ov[f"tasks.{i}.data.max_validation_samples"] = 40
    ov[f"tasks.{i}.max_length"] = 32
t0 = time.perf_counter()
if llm:
    from pwemoe.demo.llm import run_llm_demo
    ov.update({"eval.batch_size": 8})
    s = run_llm_demo(work, overrides=ov, expert_hp={"epochs": 1.0, "batch_size": 8}, grid=2)
else:
    from pwemoe.demo.offline import run_demo
    ov["eval.ta_scales"] = [0.3, 1.0]
    s = run_demo(work, overrides=ov, finetune_epochs=1.0, grid=3)
done = json.loads((work / "demo_summary.json").read_text())
print("RESULT " + json.dumps({"sha256": done["numerics"]["sha256"], "machine": done["numerics"]["machine"],
      "hv_pwemoe": s["methods"]["pwemoe"]["hypervolume"], "seconds": round(time.perf_counter() - t0, 1)}))
"""

OPS = r"""
import hashlib, json, torch
torch.manual_seed(0)
def h(t): return hashlib.sha256(t.detach().float().numpy().tobytes()).hexdigest()[:10]
x, w = torch.randn(37, 576), torch.randn(1536, 576)
q = x.view(1, 1, 37, 576)
out = {"fp32 matmul": h(x @ w.T), "fp32 attention": h(torch.nn.functional.scaled_dot_product_attention(q, q, q))}
with torch.autocast("cpu", dtype=torch.bfloat16):
    out["bf16 matmul"] = h(x @ w.T)
out["softmax"] = h(torch.softmax(x, -1))
out["sum of 1M"] = h(torch.randn(1_000_000).sum())
out["layer norm"] = h(torch.nn.functional.layer_norm(x, (576,)))
print("RESULT " + json.dumps({"ops": out, "aten": torch.backends.cpu.get_cpu_capability()}))
"""

GEMM = r"""
import time, torch
torch.manual_seed(0)
x, w = torch.randn(16 * 32, 384, requires_grad=True), torch.randn(1536, 384, requires_grad=True)
ts = []
for _ in range(21):
    t0 = time.perf_counter()
    y = torch.nn.functional.linear(x, w)
    y.sum().backward()
    ts.append(time.perf_counter() - t0)
ts = sorted(ts[1:])
print("RESULT %.3f" % (1000 * ts[len(ts) // 2]))
"""


def child(code: str, env: dict[str, str], *args: str) -> str:
    full = {**os.environ, **env, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code, *args], env=full, capture_output=True, text=True, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{env}: the child failed:\n{out.stderr[-3000:]}")
    return line[len("RESULT ") :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llm", action="store_true", help="the LLM demo's pipeline (bf16 where native) instead")
    ap.add_argument("--gemm", action="store_true", help="also time one fp32 GEMM of the demo's shape per setting")
    ap.add_argument("--ops", action="store_true", help="only hash single operations under each setting")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    ap.add_argument("--out", default="kernel_paths.json")
    a = ap.parse_args()
    import torch

    from pwemoe.devices import numerics_description

    print(f"on {numerics_description(torch.device('cpu'))}; each setting on top of this environment\n")
    if a.ops:
        base = None
        print("| setting | ATen | " + " | ".join(json.loads(child(OPS, {}))["ops"]) + " |")
        for name in a.settings.split(","):
            res = json.loads(child(OPS, SETTINGS[name]))
            base = base or res["ops"]
            cells = " | ".join("same" if v == base[k] else f"**{v}**" for k, v in res["ops"].items())
            print(f"| {name} | {res['aten']} | {cells} |", flush=True)
        return
    rows = []
    for name in a.settings.split(","):
        env = SETTINGS[name]
        with tempfile.TemporaryDirectory() as tmp:
            res = json.loads(child(CHILD, env, str(Path(tmp) / "demo"), "llm" if a.llm else "minilm"))
        if a.gemm:
            res["gemm_ms"] = float(child(GEMM, env))
        rows.append({"setting": name, **res})
        print(json.dumps(rows[-1]), flush=True)
        Path(a.out).write_text(json.dumps(rows, indent=1))
    names = list(rows[0]["sha256"])
    print("\n| setting | " + " | ".join(names) + " | PWEMoE HV |" + (" GEMM ms |" if a.gemm else ""))
    print("|---" * (len(names) + 2 + a.gemm) + "|")
    for r in rows:
        cells = " | ".join(r["sha256"][n] for n in names)
        gemm = f" {r['gemm_ms']:.2f} |" if a.gemm else ""
        print(f"| {r['setting']} | {cells} | {r['hv_pwemoe']:.4f} |{gemm}")


if __name__ == "__main__":
    main()
