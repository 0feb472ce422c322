"""Soak test of `pwemoe serve`'s OpenAI-compatible endpoints: many clients for minutes, then what held.

Starts `pwemoe serve RUN` (a causal-LM run) on 127.0.0.1 in its own process and runs N client threads against it
for a fixed time. Each client sends, one after another: chat and completions requests, streamed or not, at a
random preference (as the body's `preference` or as `model@w1,w2,...`), with random max_tokens, temperature and
seed. A share of the clients (--disconnect, default 10%) close their connection after the first token of every
streamed request. About one request in --hostile-every is hostile (malformed JSON, wrong types, unknown fields,
impossible lengths, a body over the server's limit, a body cut short, a wrong method) and must be refused with
the status the OpenAI API uses and an `error` object. Only 127.0.0.1 is contacted; every loop is bounded in time
and count, so the script stops by itself.

Reported (JSON, then a markdown table): requests served by kind; errors by type (expected refusals apart from
unexpected ones: the goal is 0 unexpected); p50 / p99 latency and time to first token; the server's RSS and
thread count at start, after the warm-up and at the end, the RSS slope after the warm-up (MB per minute); the
server's generation queue at the end (nothing running, nothing waiting).

    .venv/bin/python benchmarks/serve_soak.py demo_runs_llm/run                     # 32 clients, 10 minutes
    .venv/bin/python benchmarks/serve_soak.py RUN --clients 8 --duration 60 --json soak.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"  # the only address this script talks to
WORDS = (
    "the film was good bad very not red blue sky sea tree song team a story about an old friend who comes home "
    "after many years and finds the town changed the music is loud the actors are fine but the plot is thin"
).split()
MAX_BODY_MB = 1.0  # the server's --max-body-mb here: one hostile body is just over it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, float]:
    """RSS (MB) and thread count of a process, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(math.ceil(q * len(xs))) - 1)] if q > 0 else xs[0]


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t seconds, y) points, per minute."""
    if len(points) < 3:
        return None
    ts, ys = [p[0] for p in points], [p[1] for p in points]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / den if den else None


@dataclass
class Tally:
    """What every client saw; one lock for all."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    served: Counter = field(default_factory=Counter)  # kind -> completed requests
    expected: Counter = field(default_factory=Counter)  # refusals and disconnects that were asked for
    unexpected: Counter = field(default_factory=Counter)  # error type -> count
    examples: dict[str, str] = field(default_factory=dict)  # error type -> first message
    latency: dict[str, list[float]] = field(default_factory=dict)  # kind -> seconds, whole request
    ttft: list[float] = field(default_factory=list)  # streamed requests: seconds to the first token
    tokens: int = 0

    def ok(self, kind: str, seconds: float, ttft: float | None, tokens: int) -> None:
        with self.lock:
            self.served[kind] += 1
            self.latency.setdefault(kind, []).append(seconds)
            if ttft is not None:
                self.ttft.append(ttft)
            self.tokens += tokens

    def bad(self, kind: str, message: str) -> None:
        with self.lock:
            self.unexpected[kind] += 1
            self.examples.setdefault(kind, message[:300])


class Client(threading.Thread):
    """One client: requests one after another until the deadline (or `max_requests`)."""

    def __init__(self, i: int, args: Any, info: dict, tally: Tally, deadline: float, disconnects: bool) -> None:
        super().__init__(name=f"client-{i}", daemon=True)
        self.i, self.args, self.info, self.tally, self.deadline = i, args, info, tally, deadline
        self.disconnects = disconnects
        self.rng = random.Random(args.seed * 1000 + i)
        self.conn: http.client.HTTPConnection | None = None

    def connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(HOST, self.args.port, timeout=self.args.request_timeout)
        return self.conn

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def run(self) -> None:
        for _ in range(self.args.max_requests):
            if time.monotonic() >= self.deadline:
                break
            try:
                if self.args.hostile_every and self.rng.randrange(self.args.hostile_every) == 0:
                    self.hostile()
                else:
                    self.normal()
            except (OSError, http.client.HTTPException) as e:
                self.tally.bad(f"connection:{type(e).__name__}", str(e))
                self.drop()
        self.drop()

    # --- ordinary traffic --------------------------------------------------------------------------
    def preference(self) -> list[float]:
        g = [self.rng.gammavariate(1.0, 1.0) for _ in self.info["tasks"]]
        return [round(x / sum(g), 4) for x in g]

    def text(self, lo: int, hi: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(lo, hi)))

    def normal(self) -> None:
        chat, stream = self.rng.random() < 0.5, self.rng.random() < 0.5
        name, pref = self.info["name"], self.preference()
        body: dict[str, Any] = {"max_tokens": self.rng.randint(1, self.args.max_tokens), "stream": stream}
        if self.rng.random() < 0.5:
            body["model"], body["preference"] = name, pref
        else:
            body["model"] = f"{name}@{','.join(map(str, pref))}"
        if self.rng.random() < 0.5:
            body["temperature"], body["seed"] = 0.8, self.rng.randrange(1 << 30)
        else:
            body["temperature"] = 0.0
        if chat:
            body["messages"] = [{"role": "user", "content": self.text(3, 20)}]
            if self.rng.random() < 0.3:
                body["messages"].insert(0, {"role": "system", "content": self.text(2, 8)})
        else:
            body["prompt"] = self.text(3, 20)
        kind = f"{'chat' if chat else 'completions'}{' stream' if stream else ''}"
        path = "/v1/chat/completions" if chat else "/v1/completions"
        t0 = time.monotonic()
        conn = self.connection()
        conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        res = conn.getresponse()
        if res.status != 200:
            self.tally.bad(f"http {res.status} ({kind})", res.read().decode(errors="replace"))
            self.drop()
            return
        if not stream:
            try:
                obj = json.loads(res.read())
                choice = obj["choices"][0]
                text = choice["message"]["content"] if chat else choice["text"]
                assert isinstance(text, str) and choice["finish_reason"] in ("stop", "length"), obj
                tokens = obj["usage"]["completion_tokens"]
            except (ValueError, KeyError, IndexError, TypeError, AssertionError) as e:
                self.tally.bad(f"bad body ({kind})", repr(e))
                self.drop()
                return
            self.tally.ok(kind, time.monotonic() - t0, None, tokens)
            return
        self.stream(res, kind, chat, t0)

    def stream(self, res: http.client.HTTPResponse, kind: str, chat: bool, t0: float) -> None:
        """Read server-sent events to `data: [DONE]`; a disconnecting client closes after the first token."""
        first, tokens, finish = None, 0, None
        for _ in range(100_000):  # bounded: far more events than max_tokens allows
            line = res.readline()
            if not line:
                self.tally.bad(f"stream cut ({kind})", f"after {tokens} tokens, no [DONE]")
                self.drop()
                return
            line = line.strip()
            if not line:
                continue
            if line == b"data: [DONE]":
                res.read()  # the end of the chunked body: the connection is reused
                break
            try:
                obj = json.loads(line.removeprefix(b"data: "))
            except ValueError as e:
                self.tally.bad(f"bad chunk ({kind})", f"{e}: {line[:200]!r}")
                self.drop()
                return
            if "error" in obj:
                self.tally.bad(f"stream error ({kind})", json.dumps(obj["error"]))
                self.drop()
                return
            for c in obj.get("choices", []):
                piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                if piece or c.get("finish_reason"):
                    if first is None:
                        first = time.monotonic() - t0
                    tokens += bool(piece)
                    finish = c.get("finish_reason") or finish
            if self.disconnects and first is not None:  # a client that goes away mid-stream
                self.drop()
                with self.tally.lock:
                    self.tally.expected["disconnected mid-stream"] += 1
                    self.tally.ttft.append(first)
                return
        else:
            self.tally.bad(f"stream too long ({kind})", "no [DONE] after 100000 events")
            self.drop()
            return
        if finish not in ("stop", "length"):
            self.tally.bad(f"no finish_reason ({kind})", str(finish))
            self.drop()
            return
        self.tally.ok(kind, time.monotonic() - t0, first, tokens)

    # --- hostile traffic ---------------------------------------------------------------------------
    def hostile(self) -> None:
        name = self.info["name"]
        k = len(self.info["tasks"])
        cases: list[tuple[str, str, str, bytes | None, int | None]] = [  # (case, method, path, body, status)
            ("malformed JSON", "POST", "/v1/chat/completions", b'{"model": ', 400),
            ("a JSON list", "POST", "/v1/completions", b"[1, 2]", 400),
            ("unknown field", "POST", "/v1/completions", _j(model=name, prompt="hi", frobnicate=1), 400),
            ("n=2", "POST", "/v1/completions", _j(model=name, prompt="hi", n=2), 400),
            ("negative preference", "POST", "/v1/completions", _j(model=name, prompt="hi", preference=[-1] * k), 400),
            ("short preference", "POST", "/v1/completions", _j(model=name, prompt="hi", preference=[1.0]), 400),
            ("bad model@", "POST", "/v1/completions", _j(model=f"{name}@x,y", prompt="hi"), 400),
            ("unknown model", "POST", "/v1/completions", _j(model="nope", prompt="hi"), 404),
            ("max_tokens 10**9", "POST", "/v1/completions", _j(model=name, prompt="hi", max_tokens=10**9), 400),
            ("max_tokens -1", "POST", "/v1/chat/completions", _j(model=name, messages=[_u("hi")], max_tokens=-1), 400),
            ("temperature text", "POST", "/v1/completions", _j(model=name, prompt="hi", temperature="hot"), 400),
            ("empty messages", "POST", "/v1/chat/completions", _j(model=name, messages=[]), 400),
            ("bad role", "POST", "/v1/chat/completions", _j(model=name, messages=[{"role": "x", "content": 1}]), 400),
            ("prompt beyond context", "POST", "/v1/completions", _j(model=name, prompt="a " * 40_000), 400),
            ("body over the limit", "POST", "/v1/completions", b" " * int(MAX_BODY_MB * (1 << 20) + 1024), 413),
            ("wrong method", "GET", "/v1/chat/completions", None, 405),
            ("unknown path", "POST", "/v1/embeddings", _j(model=name, input="hi"), 404),
            ("body cut short", "POST", "/v1/completions", None, None),
        ]
        case, method, path, body, want = self.rng.choice(cases)
        if want is None:  # announce 1000 bytes, send 10, hang up: the server must just drop it
            with socket.create_connection((HOST, self.args.port), timeout=self.args.request_timeout) as s:
                s.sendall(_head(path, 1000) + b'{"model": ')
            with self.tally.lock:
                self.tally.expected[f"hostile: {case}"] += 1
            return
        if want == 413:  # on its own socket: the server may answer before it has read the whole body
            status, payload = self.raw(_head(path, len(body)) + body)
            if status == 413 and b'"error"' in payload:
                with self.tally.lock:
                    self.tally.expected[f"hostile: {case}"] += 1
            else:
                self.tally.bad(f"hostile {case}: {status}", payload.decode(errors="replace"))
            return
        conn = self.connection()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body, headers)
        res = conn.getresponse()
        payload = res.read()
        try:
            err = json.loads(payload).get("error")
        except (ValueError, AttributeError):
            err = None
        if res.status != want or not err:
            self.tally.bad(f"hostile {case}: {res.status}", payload.decode(errors="replace"))
            self.drop()
            return
        with self.tally.lock:
            self.tally.expected[f"hostile: {case}"] += 1
        if res.will_close:
            self.drop()

    def raw(self, request: bytes) -> tuple[int | None, bytes]:
        """Send bytes, stop sending if the server hangs up, and read its answer: (status, body)."""
        with socket.create_connection((HOST, self.args.port), timeout=self.args.request_timeout) as s:
            try:
                s.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                pass  # it answered (and closed) before reading everything
            data = b""
            for _ in range(10_000):  # bounded: an answer is a few kB
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data += chunk
                if b"\r\n\r\n" in data and data.split(b"\r\n\r\n", 1)[1].rstrip().endswith(b"}"):
                    break
        head, _, payload = data.partition(b"\r\n\r\n")
        try:
            return int(head.split(b" ", 2)[1]), payload
        except (IndexError, ValueError):
            return None, data[:300]


def _head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode()


def _j(**body: Any) -> bytes:
    return json.dumps(body).encode()


def _u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def get_json(port: int, path: str, timeout: float = 30) -> Any:
    c = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return json.loads(r.read())
    finally:
        c.close()


def start_server(args: Any) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", "pwemoe.cli", "serve", str(args.run), "--host", HOST, "--port", str(args.port)]
    cmd += ["--max-body-mb", str(MAX_BODY_MB), *args.server_args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(args.server_log, "wb"))


def wait_ready(server: subprocess.Popen, port: int, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before it answered")
        try:
            return get_json(port, "/v1/models", timeout=5)
        except (OSError, http.client.HTTPException, ValueError):
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer /v1/models within {seconds:.0f} s")


def stop_server(server: subprocess.Popen) -> int | None:
    """SIGINT (uvicorn's graceful stop), then SIGKILL after 30 s: bounded."""
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
    return server.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a causal-LM run directory (pwemoe train)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    ap.add_argument("--warmup", type=float, default=None, help="seconds not counted for RSS growth (default 20%%)")
    ap.add_argument("--disconnect", type=float, default=0.1, help="share of clients that leave mid-stream")
    ap.add_argument("--hostile-every", type=int, default=50, help="about one request in N is hostile (0: none)")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens is drawn from 1..N")
    ap.add_argument("--max-requests", type=int, default=100_000, help="per client, a bound besides the duration")
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS / thread samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=0, help="default: a free port")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--server-log", type=Path, default=Path("/tmp/pwemoe_serve_soak.log"))
    ap.add_argument("server_args", nargs="*", help="more `pwemoe serve` options, after --")
    args = ap.parse_args()
    args.port = args.port or _free_port()
    warmup = args.duration * 0.2 if args.warmup is None else args.warmup
    server = start_server(args)
    try:
        models = wait_ready(server, args.port, 600)
        card = models["data"][0]
        info = {"name": card["id"], "tasks": card["preference_tasks"]}
        run_info = get_json(args.port, "/api/run")
        start = proc_status(server.pid)
        tally = Tally()
        t0 = time.monotonic()
        deadline = t0 + args.duration
        n_leave = math.ceil(args.disconnect * args.clients) if args.disconnect > 0 else 0
        clients = [Client(i, args, info, tally, deadline, i < n_leave) for i in range(args.clients)]
        for c in clients:
            c.start()
        samples, health = [], []
        while time.monotonic() < deadline and server.poll() is None:  # bounded by the deadline
            time.sleep(min(args.sample_every, max(0.0, deadline - time.monotonic())))
            st = proc_status(server.pid)
            samples.append((time.monotonic() - t0, st["rss_mb"], st["threads"]))
            h0 = time.monotonic()
            try:
                get_json(args.port, "/v1/models", timeout=args.request_timeout)
                health.append(time.monotonic() - h0)
            except (OSError, http.client.HTTPException, ValueError) as e:
                tally.bad("health check", str(e))
        for c in clients:  # each finishes the request in flight: bounded by --request-timeout
            c.join(args.request_timeout + 10)
        hung = sum(c.is_alive() for c in clients)
        elapsed = time.monotonic() - t0
        time.sleep(2)  # cancelled rows leave at the next decoding step
        end = proc_status(server.pid)
        gen_end = get_json(args.port, "/api/run").get("decoding")
    finally:
        code = stop_server(server)
    after = [(t, rss) for t, rss, _ in samples if t >= warmup]
    warm = after[0][1] if after else None
    lat_all = [x for v in tally.latency.values() for x in v]
    report = {
        "run": str(args.run),
        "clients": args.clients,
        "disconnecting_clients": n_leave,
        "duration_s": round(elapsed, 1),
        "warmup_s": warmup,
        "max_tokens": args.max_tokens,
        "server_args": args.server_args,
        "device": run_info.get("device"),
        "precision": run_info.get("precision"),
        "requests_served": sum(tally.served.values()),
        "served_by_kind": dict(tally.served),
        "tokens_generated": tally.tokens,
        "expected": dict(tally.expected),
        "unexpected_errors": dict(tally.unexpected),
        "unexpected_examples": tally.examples,
        "clients_still_running": hung,
        "latency_s": {
            "all": {"p50": pct(lat_all, 0.5), "p99": pct(lat_all, 0.99)},
            **{k: {"p50": pct(v, 0.5), "p99": pct(v, 0.99), "n": len(v)} for k, v in sorted(tally.latency.items())},
        },
        "ttft_s": {"p50": pct(tally.ttft, 0.5), "p99": pct(tally.ttft, 0.99), "n": len(tally.ttft)},
        "health_check_s": {"p50": pct(health, 0.5), "max": max(health) if health else None},
        "rss_mb": {
            "start": round(start["rss_mb"], 1),
            "after_warmup": round(warm, 1) if warm is not None else None,
            "end": round(end["rss_mb"], 1),
            "max": round(max([start["rss_mb"], *(s[1] for s in samples)]), 1),
            "slope_after_warmup_mb_per_min": (lambda s: round(s, 2) if s is not None else None)(slope(after)),
            # growth is often a step (a bigger batch than before), then flat: the second half says whether it goes on
            "growth_last_half_mb": round(after[-1][1] - after[len(after) // 2][1], 1) if len(after) > 1 else None,
        },
        "threads": {
            "start": start["threads"],
            "end": end["threads"],
            "max": max([start["threads"], *(s[2] for s in samples)]),
        },
        "generation_at_end": gen_end,
        "samples_t_rss_threads": [(round(t, 1), round(rss, 1), n) for t, rss, n in samples],
        "server_exit_code": code,
        "server_log": str(args.server_log),
        "server_log_tracebacks": args.server_log.read_text(errors="replace").count("Traceback"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    bad = sum(tally.unexpected.values()) + hung + report["server_log_tracebacks"]
    sys.exit(1 if bad else 0)


def markdown(r: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    unexpected = sum(r["unexpected_errors"].values())
    rss, th = r["rss_mb"], r["threads"]
    rows = [
        ("requests served", f"{r['requests_served']} ({r['tokens_generated']} tokens) in {r['duration_s']} s"),
        ("by kind", ", ".join(f"{k}: {v}" for k, v in sorted(r["served_by_kind"].items()))),
        ("disconnected mid-stream (asked for)", str(r["expected"].get("disconnected mid-stream", 0))),
        ("hostile requests refused as expected", str(sum(v for k, v in r["expected"].items() if "hostile" in k))),
        ("unexpected errors", f"{unexpected} {r['unexpected_errors']}" if unexpected else "0"),
        ("server log tracebacks", str(r["server_log_tracebacks"])),
        ("latency p50 / p99 (s)", f"{f(r['latency_s']['all']['p50'])} / {f(r['latency_s']['all']['p99'])}"),
        ("time to first token p50 / p99 (s)", f"{f(r['ttft_s']['p50'])} / {f(r['ttft_s']['p99'])}"),
        ("RSS start / after warm-up / end (MB)", f"{rss['start']} / {rss['after_warmup']} / {rss['end']}"),
        ("RSS slope after warm-up (MB/min)", str(rss["slope_after_warmup_mb_per_min"])),
        ("RSS growth over the last half (MB)", str(rss["growth_last_half_mb"])),
        ("threads start / end (max)", f"{th['start']} / {th['end']} ({th['max']})"),
        ("generation queue at the end", json.dumps(r["generation_at_end"])),
    ]
    who = f"{r['clients']} clients ({r['disconnecting_clients']} leaving mid-stream)"
    head = f"\n{who}, `{r['command']}`, {r['date']}\n\n"
    return head + "| | |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


if __name__ == "__main__":
    main()
