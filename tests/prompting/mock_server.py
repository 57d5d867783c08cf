"""A local OpenAI-compatible chat server for tests: 127.0.0.1, an ephemeral port, one thread, no network.

By default it answers every request in the scDrugMap format, ``{res:1,0,...}``,
one label per cell of the prompt, calling a cell sensitive when most of its
listed genes are "marker" genes, with token log-probabilities when asked. Tests
queue scripted replies (429, 500, malformed answers) that are served first, and
read back every request it received (body and headers).
"""

from __future__ import annotations

import ast
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: Genes raised in sensitive cells by conftest.make_adata (its first ten genes).
MARKERS = frozenset(["TP53", "EGFR", "KRAS", "BRAF", "MYC", "CD3E", "CD4", "CD8A", "PTPRC", "ACTB"])
GENES_HEADER = "The following are the gene names:\n"
#: CPython 3.11's ast.literal_eval is not safe to call from several threads at once.
_PARSE_LOCK = threading.Lock()


def prompt_cells(body: dict[str, Any]) -> list[list[str]]:
    """Return the gene lists of the cells a request asks about (from its first user message)."""
    for message in body["messages"]:
        if message["role"] == "user" and GENES_HEADER in message["content"]:
            line = message["content"].split(GENES_HEADER, 1)[1].split("\n", 1)[0]
            with _PARSE_LOCK:
                return ast.literal_eval(line)
    raise ValueError("no gene lists in the request")


def marker_probability(genes: list[str]) -> float:
    """The mock model's P(sensitive) for one cell: smoothed share of marker genes, in (0, 1)."""
    hits = sum(gene in MARKERS for gene in genes)
    return (hits + 0.5) / (len(genes) + 1.0)


def scored_reply(probabilities: list[float], *, logprobs: bool) -> tuple[str, dict[str, Any] | None]:
    """Return the answer text for the given P(1) per cell, and its token log-probabilities."""
    labels = [int(p >= 0.5) for p in probabilities]
    content = "{res:" + ",".join(map(str, labels)) + "}"
    if not logprobs:
        return content, None
    tokens = [{"token": "{", "logprob": 0.0, "top_logprobs": []}, {"token": "res", "logprob": 0.0, "top_logprobs": []},
              {"token": ":", "logprob": 0.0, "top_logprobs": []}]
    for index, (label, p) in enumerate(zip(labels, probabilities, strict=True)):
        one, zero = math.log(p), math.log(1.0 - p)
        alternatives = sorted([{"token": "1", "logprob": one}, {"token": "0", "logprob": zero},
                               {"token": "2", "logprob": -20.0}], key=lambda a: -a["logprob"])
        tokens.append({"token": str(label), "logprob": one if label else zero, "top_logprobs": alternatives})
        if index < len(labels) - 1:
            tokens.append({"token": ",", "logprob": 0.0, "top_logprobs": []})
    tokens.append({"token": "}", "logprob": 0.0, "top_logprobs": []})
    return content, {"content": tokens}


class MockChatServer:
    """An OpenAI-compatible ``/v1/chat/completions`` in a thread; use as a context manager.

    Parameters
    ----------
    logprobs
        Return token log-probabilities when a request asks for them.
    answer
        Replaces the default answer: body -> message text (then no log-probabilities are returned).
    delay
        Seconds each request takes (to observe concurrency).
    """

    def __init__(self, *, logprobs: bool = True, answer: Callable[[dict[str, Any]], str | None] | None = None,
                 delay: float = 0.0) -> None:
        self.logprobs, self.answer, self.delay = logprobs, answer, delay
        self.requests: list[dict[str, Any]] = []
        self.script: deque[tuple[int, dict[str, str], Any]] = deque()
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01},
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def queue(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        """Serve this reply to the next request instead of the default answer (a dict body is sent as JSON)."""
        self.script.append((status, headers or {}, body if body is not None else {"error": {"message": "mock"}}))

    def __enter__(self) -> MockChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _reply(self, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        with self._lock:
            if self.script:
                return self.script.popleft()
            number = len(self.requests)
        if self.answer is not None:
            content, logprobs = self.answer(body), None
        else:
            probabilities = [marker_probability(genes) for genes in prompt_cells(body)]
            content, logprobs = scored_reply(probabilities, logprobs=self.logprobs and bool(body.get("logprobs")))
        text = " ".join(m["content"] for m in body["messages"])
        completion = len((logprobs or {}).get("content") or []) or len(content or "") // 3 + 1
        response = {"id": f"mock-{number}", "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop", "logprobs": logprobs}],
                    "usage": {"prompt_tokens": len(text) // 4, "completion_tokens": completion,
                              "total_tokens": len(text) // 4 + completion}}
        return 200, {}, response

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                with server._lock:
                    server.requests.append({"body": body, "headers": dict(self.headers), "path": self.path})
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if server.delay:
                        time.sleep(server.delay)
                    if self.path != "/v1/chat/completions":
                        status, headers, reply = 404, {}, {"error": {"message": f"no route {self.path}"}}
                    else:
                        status, headers, reply = server._reply(body)
                finally:
                    with server._lock:
                        server.in_flight -= 1
                payload = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

        return Handler
