"""Request guards run before routing: cross-site requests (CSRF) and per-client rate limits.

**Cross-site requests.** A page on another site can make a visitor's browser post a form to this
server (the server may run on the visitor's own machine). Every state-changing request (POST, PUT,
PATCH, DELETE) is therefore refused (403) when the browser says it comes from another site:
``Sec-Fetch-Site`` (set by browsers, never by pages) when present, else the ``Origin`` header
(``null`` included), else the ``Referer``. A script (curl, requests, httpx) sends none of these and
keeps using the JSON API. Pages are served with ``Referrer-Policy: same-origin``, so the browser
names our own origin on our own forms and never sends a job's link to another site.

**Rate limits.** Per client address and kind of request (``upload``, ``submit``, ``lookup`` of a job
by token), at most ``count`` requests in a sliding window of ``seconds``; more are answered 429 with
``Retry-After``. Counters live in memory, per process.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict, deque
from urllib.parse import urlsplit

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Kinds of request that are rate limited, by method and path.
_KINDS = (
    ("upload", "POST", re.compile(r"^/(api/jobs|predict)/?$")),
    ("submit", "POST", re.compile(r"^/(api/)?jobs/[^/]+/run/?$")),
    ("lookup", "GET", re.compile(r"^/(api/)?jobs/[^/]+(/.*)?$")),
)
#: Most (client, kind) windows kept; the least recently used are dropped beyond it.
MAX_TRACKED = 10_000


def _headers(scope: dict) -> dict[str, str]:
    return {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers") or []}


def _origin_of(url: str) -> tuple[str, str]:
    """Return (``scheme://host:port``, ``host:port``) of a URL, lower-cased."""
    parts = urlsplit(url.strip())
    return f"{parts.scheme}://{parts.netloc}".lower(), parts.netloc.lower()


def cross_site_reason(scope: dict, allowed_origins: tuple[str, ...] = ()) -> str | None:
    """Return why a state-changing request comes from another site (to refuse it), or None to let it through."""
    if scope.get("type") != "http" or scope.get("method", "GET").upper() not in STATE_CHANGING:
        return None
    headers = _headers(scope)
    host = headers.get("host", "").lower()
    origin = headers.get("origin")
    fetch_site = headers.get("sec-fetch-site", "").lower()
    if fetch_site in ("same-origin", "none"):
        return None
    if fetch_site in ("same-site", "cross-site"):
        if origin and _origin_of(origin)[0] in allowed_origins:
            return None
        return f"Sec-Fetch-Site {fetch_site}" + (f", Origin {origin}" if origin else "")
    if origin is not None:
        if origin.strip().lower() == "null":
            return "Origin null"
        full, netloc = _origin_of(origin)
        return None if netloc == host or full in allowed_origins else f"Origin {origin}"
    referer = headers.get("referer")
    if referer:
        full, netloc = _origin_of(referer)
        return None if netloc == host or full in allowed_origins else f"Referer from {full}"
    return None  # no browser header at all: a script


def request_kind(scope: dict) -> str | None:
    """Return the rate-limited kind of a request (``upload``, ``submit``, ``lookup``), or None."""
    method, path = scope.get("method", "GET").upper(), scope.get("path", "")
    for kind, wanted, pattern in _KINDS:
        if method == wanted and pattern.match(path):
            return kind
    return None


class RateLimiter:
    """Sliding-window counters per (client, kind); thread-safe."""

    def __init__(self, limits: dict[str, tuple[int, float]], *, clock=time.monotonic) -> None:
        self.limits = {kind: (int(count), float(seconds)) for kind, (count, seconds) in limits.items()}
        self.clock = clock
        self._windows: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def hit(self, client: str, kind: str) -> float | None:
        """Count one request; return the seconds to wait when it is over the limit (not counted), else None."""
        count, seconds = self.limits.get(kind, (0, 0.0))
        if count <= 0 or seconds <= 0:
            return None
        now = self.clock()
        with self._lock:
            window = self._windows.pop((client, kind), None) or deque()
            while window and window[0] <= now - seconds:
                window.popleft()
            self._windows[(client, kind)] = window
            while len(self._windows) > MAX_TRACKED:
                self._windows.popitem(last=False)
            if len(window) >= count:
                return max(0.0, window[0] + seconds - now)
            window.append(now)
        return None


def retry_after(seconds: float) -> str:
    """Return a ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
