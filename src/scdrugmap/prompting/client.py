"""A small client for OpenAI-compatible ``/chat/completions`` endpoints, with an on-disk answer cache.

Works with OpenAI and with servers that speak its API (vLLM, llama.cpp ``server``,
Ollama, LM Studio). Standard library only (``urllib`` in a thread pool), so the
language-model arm needs no extra package.

- Timeouts per request; retries with exponential backoff and seeded jitter on
  429, 5xx, timeouts and dropped connections, waiting at least as long as the
  server's ``Retry-After``; other HTTP errors are raised at once.
- At most ``max_concurrency`` requests in flight and at most
  ``requests_per_minute`` started per minute.
- Every successful response is cached under ``cache_dir`` keyed by the sha256 of
  the full request body (messages, model, temperature, seed, log-probability
  flags), written atomically, so a rerun sends nothing twice.
- The API key is only ever put in the ``Authorization`` header: it is held by an
  object that prints as ``***``, never cached, logged or put into an error.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import os
import random
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scdrugmap.errors import ConfigError, ScDrugMapError

log = logging.getLogger(__name__)

#: HTTP statuses retried with backoff: rate limited, and server errors.
RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
#: The longest Retry-After honoured, in seconds (a larger value is treated as this).
MAX_RETRY_AFTER = 600.0
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: urllib would forward the Authorization header (the key) to the new host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class PromptRequestError(ScDrugMapError):
    """A chat request kept failing after every retry (rate limits, server errors, timeouts)."""


class _Secret:
    """Holds the API key; prints, reprs and pickles as nothing readable."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value or None

    def reveal(self) -> str | None:
        return self._value

    def __bool__(self) -> bool:
        return self._value is not None

    def __repr__(self) -> str:
        return "'***'" if self._value else "None"

    __str__ = __repr__

    def __reduce__(self):
        msg = "the API key cannot be pickled"
        raise TypeError(msg)


def sanitise_endpoint(url: str) -> str:
    """Return ``url`` without user name, password, query or fragment (safe to log and store)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def request_key(body: dict[str, Any]) -> str:
    """Return the cache key of a request: the sha256 of its body as canonical JSON."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class ChatResult:
    """One request and its response, and whether it came from the cache."""

    key: str
    request: dict[str, Any]
    response: dict[str, Any]
    from_cache: bool
    attempts: int = 0

    @property
    def content(self) -> str | None:
        """Return the first choice's message text (None when there is none)."""
        choices = self.response.get("choices") or [{}]
        return (choices[0].get("message") or {}).get("content")

    @property
    def finish_reason(self) -> str | None:
        return (self.response.get("choices") or [{}])[0].get("finish_reason")

    @property
    def logprobs(self) -> dict[str, Any] | None:
        return (self.response.get("choices") or [{}])[0].get("logprobs")

    @property
    def usage(self) -> tuple[int, int]:
        """Return (prompt tokens, completion tokens) as the server reported them (0 when it did not)."""
        usage = self.response.get("usage") or {}
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


class RateLimiter:
    """Space request starts so that at most ``per_minute`` begin in any minute (no bursts)."""

    def __init__(self, per_minute: float | None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self._clock, self._sleep = clock, sleep
        self._next = -float("inf")
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Wait until the next request may start."""
        if not self.interval:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


@dataclass
class _Counters:
    sent: int = 0
    attempts: int = 0
    retries: int = 0
    cache_hits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **amounts: int) -> None:
        with self.lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)


class ChatClient:
    """Send chat-completion requests to one OpenAI-compatible endpoint, caching every answer.

    Parameters
    ----------
    api_base
        The API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1`` (vLLM).
    api_key
        Sent as ``Authorization: Bearer ...``; None sends no header (most local servers need none).
    cache_dir
        Folder of the answer cache; None caches nothing.
    timeout
        Seconds to wait for the server (to connect, and between bytes of the answer) before the attempt fails.
    max_retries
        Retries after the first attempt, for 429, 5xx, timeouts and dropped connections.
    max_concurrency
        Requests in flight at once.
    requests_per_minute
        Most request starts (retries included) per minute; None for no limit.
    backoff_base, backoff_max
        The wait before retry ``n`` is ``min(backoff_max, backoff_base * 2**n)``, half fixed and half random
        (seeded), and never shorter than the server's ``Retry-After``.
    seed
        Seed of the jitter.
    sleep
        Replaces `time.sleep` (tests record the waits instead).
    """

    def __init__(self, api_base: str, *, api_key: str | None = None, cache_dir: str | Path | None = None,
                 timeout: float = 60.0, max_retries: int = 5, max_concurrency: int = 4,
                 requests_per_minute: float | None = None, backoff_base: float = 1.0, backoff_max: float = 60.0,
                 seed: int = 0, sleep: Callable[[float], None] = time.sleep) -> None:
        parts = urllib.parse.urlsplit(api_base)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            msg = (f"api_base {sanitise_endpoint(api_base)!r} is not an http(s) URL; "
                   "use e.g. https://api.openai.com/v1.")
            raise ConfigError(msg)
        if max_concurrency < 1 or max_retries < 0 or timeout <= 0:
            msg = (f"max_concurrency {max_concurrency}, max_retries {max_retries}, timeout {timeout}: need "
                   "max_concurrency >= 1, max_retries >= 0 and timeout > 0.")
            raise ConfigError(msg)
        self.endpoint = api_base.rstrip("/") + "/chat/completions"
        self._key = _Secret(api_key)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.timeout, self.max_retries, self.max_concurrency = timeout, max_retries, max_concurrency
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self._sleep = sleep
        self._limiter = RateLimiter(requests_per_minute, sleep=sleep)
        self._random = random.Random(seed)
        self._random_lock = threading.Lock()
        self.counters = _Counters()
        # loopback servers (vLLM, llama.cpp, Ollama on this machine) are never reached through a proxy
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if parts.hostname in LOOPBACK_HOSTS:
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"ChatClient({sanitise_endpoint(self.endpoint)!r}, api_key={self._key!r})"

    # --- cache ---------------------------------------------------------------------------------------------

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

    def cached(self, body: dict[str, Any]) -> ChatResult | None:
        """Return the cached answer to ``body``, or None."""
        key = request_key(body)
        path = self._cache_path(key)
        if path is None or not path.exists():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            response = record["response"]
        except (OSError, ValueError, KeyError) as err:
            log.warning("ignoring the unreadable cache file %s (%s); the request will be sent again", path, err)
            return None
        return ChatResult(key, body, response, from_cache=True)

    def _store(self, key: str, body: dict[str, Any], response: dict[str, Any]) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"key": key, "endpoint": sanitise_endpoint(self.endpoint), "request": body, "response": response}
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:12]}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(record, stream, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # --- sending -------------------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        secret = self._key.reveal()
        return text.replace(secret, "***") if secret else text

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** attempt)
        with self._random_lock:
            delay = ceiling / 2.0 + self._random.uniform(0.0, ceiling / 2.0)
        return max(delay, min(retry_after or 0.0, MAX_RETRY_AFTER))

    def _post_once(self, payload: bytes) -> tuple[int, Any, bytes]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key.reveal()}"
        request = urllib.request.Request(self.endpoint, data=payload, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.headers, err.read()

    def send(self, body: dict[str, Any]) -> ChatResult:
        """Send one request (no cache lookup), retrying transient failures; cache and return the answer.

        Raises
        ------
        ConfigError
            When the server refuses the request itself (400, 401, 403, 404, ...): wrong key, model or URL.
        PromptRequestError
            When every attempt failed with a transient error.
        """
        key = request_key(body)
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        where = sanitise_endpoint(self.endpoint)
        self.counters.add(sent=1)
        problem = ""
        for attempt in range(self.max_retries + 1):
            self._limiter.acquire()
            self.counters.add(attempts=1)
            retry_after = None
            try:
                status, headers, raw = self._post_once(payload)
            except (OSError, http.client.HTTPException) as err:  # timeouts, refused or dropped connections
                reason = getattr(err, "reason", err)
                problem = f"{type(err).__name__}: {self._scrub(str(reason))}"
            else:
                if status == 200:
                    try:
                        response = json.loads(raw)
                        if not isinstance(response, dict) or not isinstance(response.get("choices"), list):
                            raise ValueError("no 'choices' list")
                    except ValueError as err:
                        problem = f"HTTP 200 with a body that is not a chat completion ({err})"
                    else:
                        self._store(key, body, response)
                        return ChatResult(key, body, response, from_cache=False, attempts=attempt + 1)
                else:
                    detail = self._scrub(raw[:500].decode("utf-8", "replace")).strip()
                    problem = f"HTTP {status}: {detail}"
                    if status not in RETRY_STATUSES:
                        hint = {301: "the server redirects; give the final URL as --api-base",
                                302: "the server redirects; give the final URL as --api-base",
                                401: "check the API key (environment variable OPENAI_API_KEY)",
                                403: "check the API key and its access to this model",
                                404: "check --api-base (it should end in /v1) and --llm-model"}.get(
                            status, "check the model name and the options the server accepts (a server without "
                            "log-probabilities needs logprobs=False, a model without temperature temperature=None)")
                        msg = f"{where} refused the chat request ({problem}); {hint}."
                        raise ConfigError(msg)
                    retry_after = _parse_retry_after(headers.get("Retry-After") if headers else None)
            if attempt == self.max_retries:
                break
            delay = self._backoff(attempt, retry_after)
            log.debug("chat request to %s failed (%s); retry %d of %d in %.2fs", where, problem, attempt + 1,
                      self.max_retries, delay)
            self.counters.add(retries=1)
            self._sleep(delay)
        msg = (f"{where}: the chat request failed {self.max_retries + 1} times; last error {problem}. "
               "Rerun later (answers received so far are cached), or lower --llm-concurrency / "
               "--llm-requests-per-minute.")
        raise PromptRequestError(msg)

    def complete(self, body: dict[str, Any]) -> ChatResult:
        """Return the cached answer to ``body``, or send it."""
        hit = self.cached(body)
        if hit is not None:
            self.counters.add(cache_hits=1)
            return hit
        return self.send(body)

    def complete_many(self, bodies: Sequence[dict[str, Any]], *,
                      progress: Callable[[int, int], None] | None = None) -> list[ChatResult]:
        """Answer every body (identical bodies once), ``max_concurrency`` at a time; keep the input order.

        On a failure, requests not yet started are cancelled, those in flight finish (and are cached), then
        the first error is raised.
        """
        keys = [request_key(body) for body in bodies]
        unique: dict[str, dict[str, Any]] = {}
        for key, body in zip(keys, bodies, strict=True):
            unique.setdefault(key, body)
        results: dict[str, ChatResult] = {}
        to_send = []
        for key, body in unique.items():
            hit = self.cached(body)
            if hit is None:
                to_send.append((key, body))
            else:
                self.counters.add(cache_hits=1)
                results[key] = hit
        total, done = len(unique), len(results)
        if progress:
            progress(done, total)
        if to_send:
            error: BaseException | None = None
            with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="chat") as pool:
                futures = {pool.submit(self.send, body): key for key, body in to_send}
                for future in as_completed(futures):
                    if future.cancelled():
                        continue
                    if future.exception() is not None:
                        if error is None:
                            error = future.exception()
                            for other in futures:
                                other.cancel()
                        continue
                    results[futures[future]] = future.result()
                    done += 1
                    if progress:
                        progress(done, total)
            if error is not None:
                raise error
        return [results[key] for key in keys]


def _parse_retry_after(value: str | None) -> float | None:
    """Return the seconds a ``Retry-After`` header asks for (a number or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
