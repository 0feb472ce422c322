"""A real uvicorn server on 127.0.0.1 at a free port, in a thread, and a small JSON client."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve `app` until the block exits; yields the base URL (http://127.0.0.1:PORT)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not t.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(10)
        sock.close()


def call(
    url: str, body: Any = None, raw: bytes | None = None, content_type: str = "application/json"
) -> tuple[int, Any]:
    """(status, parsed JSON) of a GET (no body) or POST (JSON `body`, or `raw` bytes)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            payload = res.read()
            status = res.status
    except urllib.error.HTTPError as e:
        payload, status = e.read(), e.code
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload


def call_expecting_continue(url: str, path: str, body: bytes) -> tuple[int, Any]:
    """POST with `Expect: 100-continue` (what curl sends for large bodies): the body is sent only if
    the server asks for it, so an early 413 is read without a race against the upload."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        s.sendall(head.encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        status = int(data.split(b" ", 2)[1])
        if status == 100:  # the server wants the body after all
            s.sendall(body)
            data = data.split(b"\r\n\r\n", 1)[1]
            while b"\r\n\r\n" not in data:
                data += s.recv(65536)
            status = int(data.split(b" ", 2)[1])
        rest = data.split(b"\r\n\r\n", 1)[1]
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    try:
        return status, json.loads(rest)
    except ValueError:
        return status, rest
