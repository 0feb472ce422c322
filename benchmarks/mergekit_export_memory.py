"""Peak RSS of `pwemoe export --engine mergekit` against `--engine torch` for one preference of a random Llama.

Builds once, into a temporary folder: a randomly initialised Llama of about 1.1B parameters (TinyLlama's shape) as
the base, k = 2 experts (the base plus seeded noise, full checkpoints), a word-level tokenizer and a causal-LM run
whose routers are saved from the upcycled model (no training step: the export reads whatever routers are there).
Then each engine exports the same preference in its own process; the script reports each process's peak RSS
(VmHWM of /proc/self/status) and its peak anonymous memory (RssAnon of /proc/PID/status, sampled every 20 ms), and the
ratios (target: mergekit <= 0.35 x torch). Peak RSS also counts the pages of the memory-mapped safetensors files
that were read (file-backed, reclaimed by the kernel under pressure, shared with the page cache); RssAnon is the
memory the process itself holds.

    python benchmarks/mergekit_export_memory.py              # ~1.1B parameters, float32 (about 13 GB of disk)
    python benchmarks/mergekit_export_memory.py --size tiny  # seconds: checks that the script works
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = {
    # TinyLlama-1.1B's shape: 1.10B parameters
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000),
}  # fmt: skip

CHILD = """
import sys
engine, run, out = sys.argv[1:4]
if engine == "torch":
    from pwemoe.runs import export_run
    export_run(run, "0.3,0.7", out, device="cpu")
else:
    from pwemoe.mergekit_export import export_mergekit
    export_mergekit(run, "0.3,0.7", out)
# VmHWM: this process's own peak RSS (getrusage's ru_maxrss would include the parent's, inherited across fork)
print("PEAK_RSS_KB", next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def build(root: Path, size: str) -> Path:
    """base/, experts/{a,b}/, data and a run directory with routers: one model in memory at a time."""
    import torch
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.fixtures import write_csv_splits
    from tests.test_causal_lm import _rows, _tokenizer

    tok = _tokenizer()
    conf = LlamaConfig(**SIZES[size], max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(conf).eval()
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters", flush=True)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    tasks = []
    import random

    rng = random.Random(0)
    for i, name in enumerate(("a", "b")):
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
        model.save_pretrained(root / "experts" / name)
        data = write_csv_splits(root, name, {"train": _rows("polarity", 4, rng), "test": _rows("polarity", 4, rng)})
        tasks.append({"name": name, "type": "causal_lm", "expert": str(root / "experts" / name), "data": data})
    del model
    cfg = {
        "model": {"base": str(root / "base"), "init_lambda": 0.3},
        "tasks": tasks,
        "train": {"steps": 1, "batch_size": 1, "save_interval": 1, "log_interval": 1},
        "eval": {"loss_reference": 100.0},
        "device": "cpu",
        "run_dir": str(root / "run"),
    }
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    from pwemoe.recipes.train import train

    train(str(root / "config.yaml"), verbose=-1)  # one step: the routers (and the run's hashes) are saved
    return root / "run"


def _anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("RssAnon:")), 0)
    except OSError:
        return 0


def measure(engine: str, run: Path, out: Path) -> tuple[int, int]:
    """(peak RSS, peak anonymous RSS) in bytes of a fresh process exporting with `engine`."""
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, engine, str(run), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    anon = 0
    while proc.poll() is None:
        anon = max(anon, _anon_kb(proc.pid))
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} export failed:\n{stderr[-3000:]}")
    kb = next(int(line.split()[1]) for line in stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    return kb * 1024, anon * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--workdir", help="where to build the models (default: a temporary folder, removed after)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        run = build(root, args.size)
        peaks = {e: measure(e, run, root / f"out-{e}") for e in ("torch", "mergekit")}
    report = {f"peak_rss_gb_{e}": round(v[0] / 2**30, 3) for e, v in peaks.items()}
    report |= {f"peak_anon_gb_{e}": round(v[1] / 2**30, 3) for e, v in peaks.items()}
    report |= {
        "ratio_rss_mergekit_over_torch": round(peaks["mergekit"][0] / peaks["torch"][0], 3),
        "ratio_anon_mergekit_over_torch": round(peaks["mergekit"][1] / peaks["torch"][1], 3),
        "target": 0.35,
        "size": args.size,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
