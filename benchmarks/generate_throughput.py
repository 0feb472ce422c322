"""Generation throughput of `pwemoe serve` on a causal-LM run: many preferences at once, per request.

The server runs in its own process (`pwemoe serve RUN --max-batch N`); clients are threads speaking the
OpenAI-compatible API over HTTP. Scenarios, interleaved over `--repeats` rounds (medians reported):

- mixed:      N concurrent clients, each with its own preference (distinct points of the simplex);
- shared:     the same N requests, all at one preference: such a batch decodes on a merged copy (mixed / shared);
- one-by-one: the same N requests, one after another (the gain of batching = mixed / one-by-one);
- the same three on a second server with --no-merged-decoding (every step on the upcycled model): the cost of
  mixing within one engine (mixed_upcycled / shared_upcycled) and the merged copy's gain for a lone request;
- TTFT:       time to the first streamed token with N concurrent clients, against one client alone;
- merge+generate: what a user does without pwemoe serve, in this process: for each request
  `merge_and_unload(model, r)` and plain `transformers` generate (the merge included).

Greedy decoding, `--tokens` new tokens at most (a request may end earlier at its end-of-text token: throughput
counts the tokens actually generated, as `usage.completion_tokens` reports them).

    .venv/bin/python benchmarks/generate_throughput.py demo_runs_llm/run [--clients 8] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "What makes a good movie review?",
    "Describe the weather of a rainy day in a city.",
    "Give advice to someone starting to cook.",
    "Tell me about the history of tea.",
    "Why do people enjoy sports?",
    "Describe a busy market in the morning.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as res:
        return json.loads(res.read())


def _stream_ttft(url: str, body: dict) -> tuple[float, int]:
    """(seconds to the first content chunk, completion tokens) of one streamed chat completion."""
    t0 = time.perf_counter()
    req = urllib.request.Request(
        url,
        json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode(),
        {"Content-Type": "application/json"},
    )
    first, tokens = None, 0
    with urllib.request.urlopen(req, timeout=600) as res:
        for raw in res:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev["choices"] and ev["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - t0
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    return first if first is not None else float("nan"), tokens


def _concurrent(url: str, bodies: list[dict]) -> tuple[float, int]:
    """(wall seconds, completion tokens) of all requests sent at once."""
    out: list[int] = [0] * len(bodies)

    def ask(i: int) -> None:
        out[i] = _post(url, bodies[i])["usage"]["completion_tokens"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, sum(out)


def _one_by_one(url: str, bodies: list[dict]) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = sum(_post(url, b)["usage"]["completion_tokens"] for b in bodies)
    return time.perf_counter() - t0, tokens


def _ttft(url: str, bodies: list[dict]) -> list[float]:
    out: list[float] = [0.0] * len(bodies)

    def ask(i: int) -> None:
        out[i] = _stream_ttft(url, bodies[i])[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _merge_and_generate(run: Path, prefs: list[list[float]], tokens: int, precision: str | None) -> tuple[float, int]:
    """Without pwemoe serve: a merged plain copy per request, then transformers generate (greedy), one by one."""
    import torch

    from pwemoe import merge_and_unload
    from pwemoe.devices import autocast
    from pwemoe.runs import open_run

    wb, _ = open_run(run, load_test=False, precision=precision)
    model, tok = wb.modality.model, wb.modality.tokenizer
    t0 = time.perf_counter()
    total = 0
    for prompt, r in zip(PROMPTS, prefs):
        plain = merge_and_unload(model, r).eval()
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad(), autocast(wb.device, wb.precision):
            out = plain.generate(
                **ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        total += out.shape[1] - ids["input_ids"].shape[1]
        del plain
    return time.perf_counter() - t0, total


@contextlib.contextmanager
def _server(run: Path, clients: int, precision: str | None, extra: list[str]) -> Iterator[tuple[str, str]]:
    """A `pwemoe serve` process on a free port: yields (chat completions URL, model name) once it answers."""
    port = _free_port()
    cmd = [sys.executable, "-m", "pwemoe.cli", "serve", str(run), "--port", str(port), "--max-batch", str(clients)]
    cmd += ["--max-test-samples", "1", *extra] + (["--precision", precision] if precision else [])
    server = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(base + "/v1/models", timeout=5).read()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(1)
        yield (
            base + "/v1/chat/completions",
            json.loads(urllib.request.urlopen(base + "/v1/models").read())["data"][0]["id"],
        )
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", help="the server's (and the merge+generate baseline's) precision")
    args = ap.parse_args()
    run = Path(args.run)
    import torch

    from pwemoe.configfile import read_config

    k = len(read_config(run / "config.yaml").tasks)
    torch.manual_seed(0)
    prefs = torch.distributions.Dirichlet(torch.ones(k)).sample((args.clients,)).tolist()  # distinct points
    prefs = [[round(x, 4) for x in r] for r in prefs]
    prompts = (PROMPTS * (args.clients // len(PROMPTS) + 1))[: args.clients]

    def bodies(name: str, pref_list: list[list[float]]) -> list[dict]:
        return [
            {
                "model": name,
                "messages": [{"role": "user", "content": p}],
                "max_tokens": args.tokens,
                "temperature": 0,
                "ignore_eos": True,  # every request decodes its tokens: the demo's adapters answer in one word
                "preference": r,
            }
            for p, r in zip(prompts, pref_list)
        ]

    res: dict[str, list[float]] = {}

    def record(key: str, rnd: int, s: float, n: int) -> None:
        res.setdefault(key, []).append(n / s)
        print(f"round {rnd}: {key}: {n} tokens in {s:.2f} s = {n / s:.2f} tokens/s", flush=True)

    # the server as it ships: a batch whose sequences share one preference decodes on a merged copy
    with _server(run, args.clients, args.precision, []) as (url, name):
        mixed, shared = bodies(name, prefs), bodies(name, [prefs[0]] * args.clients)
        _concurrent(url, mixed[:2])  # warm-up: the first forwards, allocations
        for rnd in range(args.repeats):
            record("mixed", rnd, *_concurrent(url, mixed))
            record("shared", rnd, *_concurrent(url, shared))
            record("one_by_one", rnd, *_one_by_one(url, mixed))
            many = _ttft(url, mixed)
            res.setdefault("ttft_many", []).append(statistics.median(many))
            res.setdefault("ttft_one", []).append(_stream_ttft(url, mixed[0])[0])
            print(
                f"round {rnd}: TTFT p50 with {args.clients} clients {res['ttft_many'][-1]:.3f} s, alone "
                f"{res['ttft_one'][-1]:.3f} s",
                flush=True,
            )
    # --no-merged-decoding: every step on the upcycled model (the cost of mixing within one engine)
    with _server(run, args.clients, args.precision, ["--no-merged-decoding"]) as (url, name):
        mixed, shared = bodies(name, prefs), bodies(name, [prefs[0]] * args.clients)
        _concurrent(url, mixed[:2])
        for rnd in range(args.repeats):
            record("mixed_upcycled", rnd, *_concurrent(url, mixed))
            record("shared_upcycled", rnd, *_concurrent(url, shared))
            record("one_by_one_upcycled", rnd, *_one_by_one(url, mixed))
    s, n = _merge_and_generate(run, prefs, args.tokens, args.precision)
    res["merge_generate"] = [n / s]
    print(f"merge_and_unload + generate, one by one: {n} tokens in {s:.2f} s = {n / s:.2f} tokens/s", flush=True)
    med = {key: statistics.median(v) for key, v in res.items()}
    print(json.dumps({"clients": args.clients, "tokens": args.tokens, "repeats": args.repeats, "medians": med}))
    print(
        f"mixed / shared = {med['mixed'] / med['shared']:.3f} (shared on the merged copy); upcycled only: "
        f"{med['mixed_upcycled'] / med['shared_upcycled']:.3f} (target >= 0.8); mixed / one-by-one = "
        f"{med['mixed'] / med['one_by_one']:.2f} (target >= 3); one-by-one merged copy / upcycled = "
        f"{med['one_by_one'] / med['one_by_one_upcycled']:.2f}; mixed / merge+generate = "
        f"{med['mixed'] / med['merge_generate']:.2f}; TTFT p50 {med['ttft_many']:.3f} s with {args.clients} "
        f"clients vs {med['ttft_one']:.3f} s alone"
    )


if __name__ == "__main__":
    main()
