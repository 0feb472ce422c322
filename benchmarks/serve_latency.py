"""Latency and throughput of `pwemoe serve`'s /api/predict on a trained run (default: the demo's).

Starts `pwemoe serve RUN` as its own process on 127.0.0.1, then, from this process:
  * plain: the exported plain model (transformers, no pwemoe) for one short text: tokenise + forward,
    in this process with the same thread count: the reference;
  * hit: /api/predict for that text with a cached preference;
  * miss: /api/predict with a preference never asked before (cache full: one re-merge per request);
  * throughput: 8 concurrent clients, cached preferences, requests per second.
Reports medians (p50) and p95 over many requests, and the two ratios the issue sets targets on:
miss - hit <= 60 ms, and hit p50 <= 2x plain p50.

    .venv/bin/python benchmarks/serve_latency.py [--run demo_runs/run] [--requests 200]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

TEXT = "a wonderful, moving film"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def post(self, path: str, body: dict) -> tuple[float, dict]:
        data = json.dumps(body).encode()
        t = time.perf_counter()
        self.conn.request("POST", path, data, {"Content-Type": "application/json"})
        res = self.conn.getresponse()
        payload = res.read()
        dt = time.perf_counter() - t
        if res.status != 200:
            raise RuntimeError(f"{path}: {res.status} {payload[:300]!r}")
        return dt, json.loads(payload)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="demo_runs/run")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--cache-size", type=int, default=4)
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    run = Path(args.run)
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pwemoe.cli",
            "serve",
            str(run),
            "--port",
            str(port),
            "--cache-size",
            str(args.cache_size),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 180
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/api/run")
                info = json.loads(c.getresponse().read())
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"server did not start: {server.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.2)
        task = info["tasks"][0]["name"]
        k = info["k"]
        cached = [1.0 / k] * k
        cl = Client(port)
        _, ex = cl.post("/api/export", {"preference": cached, "name": "bench-serve-latency", "overwrite": True})

        # the reference: the exported plain model, tokenise + forward + softmax, same text
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        plain_dir = Path(ex["models"][task])
        model = AutoModelForSequenceClassification.from_pretrained(plain_dir).eval()
        tok = AutoTokenizer.from_pretrained(plain_dir)
        plain = []
        with torch.no_grad():
            for i in range(args.requests + 10):
                t = time.perf_counter()
                enc = tok([TEXT], truncation=True, max_length=32, padding=True, return_tensors="pt")
                model(**enc).logits.softmax(-1)
                if i >= 10:
                    plain.append(time.perf_counter() - t)
        del model

        body = {"preference": cached, "task": task, "inputs": [TEXT]}
        for _ in range(10):
            cl.post("/api/predict", body)
        hit = []
        for _ in range(args.requests):
            dt, res = cl.post("/api/predict", body)
            assert res["cache"] == "hit", res["cache"]
            hit.append(dt)

        g = torch.Generator().manual_seed(0)
        fresh = torch.distributions.Dirichlet(torch.ones(k)).sample((args.requests + args.cache_size,))
        miss = []
        for i, r in enumerate(fresh.tolist()):  # the first cache_size fill the cache (a new copy each)
            dt, res = cl.post("/api/predict", {**body, "preference": r})
            assert res["cache"] == "miss", res["cache"]
            if i >= args.cache_size:
                miss.append(dt)
        del g

        prefs = [cached] + fresh[-(args.cache_size - 1) :].tolist()  # the cache holds these now
        per_client = max(1, args.requests // args.clients)
        errors: list[str] = []

        def work(j: int) -> None:
            c = Client(port)
            try:
                for i in range(per_client):
                    c.post("/api/predict", {**body, "preference": prefs[(i + j) % len(prefs)]})
            except Exception as e:  # noqa: BLE001
                errors.append(str(e))

        threads = [threading.Thread(target=work, args=(j,)) for j in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        if errors:
            raise RuntimeError(errors[0])
        throughput = per_client * args.clients / wall
    finally:
        server.terminate()
        server.wait(30)

    ms = lambda x: round(1000 * x, 2)  # noqa: E731
    out = {
        "run": str(run),
        "task": task,
        "text": TEXT,
        "requests": args.requests,
        "plain_p50_ms": ms(statistics.median(plain)),
        "plain_p95_ms": ms(pct(plain, 0.95)),
        "hit_p50_ms": ms(statistics.median(hit)),
        "hit_p95_ms": ms(pct(hit, 0.95)),
        "miss_p50_ms": ms(statistics.median(miss)),
        "miss_p95_ms": ms(pct(miss, 0.95)),
        "miss_extra_p50_ms": ms(statistics.median(miss) - statistics.median(hit)),
        "hit_over_plain_p50": round(statistics.median(hit) / statistics.median(plain), 2),
        "throughput_rps": round(throughput, 1),
        "clients": args.clients,
        "cache_size": args.cache_size,
    }
    print(f"{'':<34}{'p50 ms':>9}{'p95 ms':>9}")
    print(f"{'plain exported model (reference)':<34}{out['plain_p50_ms']:>9}{out['plain_p95_ms']:>9}")
    print(f"{'/api/predict, cached preference':<34}{out['hit_p50_ms']:>9}{out['hit_p95_ms']:>9}")
    print(f"{'/api/predict, new preference':<34}{out['miss_p50_ms']:>9}{out['miss_p95_ms']:>9}")
    print(
        f"cache miss adds {out['miss_extra_p50_ms']} ms (target <= 60); cached p50 = "
        f"{out['hit_over_plain_p50']}x plain (target <= 2); {out['throughput_rps']} requests/s with "
        f"{args.clients} clients"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
