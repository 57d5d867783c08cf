"""The chat client against a local mock server: retries, limits, the cache, and the key kept out of sight."""

from __future__ import annotations

import json
import pickle

import pytest
from mock_server import MockChatServer

from scdrugmap.errors import ConfigError
from scdrugmap.prompting.client import ChatClient, PromptRequestError, RateLimiter, request_key

KEY = "sk-test-DO-NOT-LEAK-0123456789"


def _body(text: str = "{res:1}", n: int = 1) -> dict:
    cells = [["TP53", "EGFR"]] * n
    content = f"{text}\nThe following are the gene names:\n{cells!r}\n\n"
    return {"model": "mock", "messages": [{"role": "user", "content": content}], "temperature": 0, "seed": 0}


def _client(server, tmp_path, **options) -> tuple[ChatClient, list[float]]:
    sleeps: list[float] = []
    options = {"api_key": KEY, "cache_dir": tmp_path / "cache", "max_retries": 3, "backoff_base": 0.5,
               "backoff_max": 4.0, "sleep": sleeps.append, **options}
    return ChatClient(server.url, **options), sleeps


def test_429_and_500_are_retried_with_backoff_honouring_retry_after(tmp_path):
    with MockChatServer() as server:
        server.queue(429, headers={"Retry-After": "7"})
        server.queue(500)
        client, sleeps = _client(server, tmp_path)
        result = client.complete(_body())
    assert len(server.requests) == 3 and result.attempts == 3 and not result.from_cache
    assert result.content == "{res:1}"
    assert sleeps[0] >= 7.0  # Retry-After wins over the shorter backoff
    assert 0.5 <= sleeps[1] <= 1.0  # retry 2: half fixed, half seeded jitter of min(4, 0.5 * 2**1)
    assert client.counters.retries == 2 and client.counters.attempts == 3 and client.counters.sent == 1


def test_requests_failing_every_retry_raise_prompt_request_error(tmp_path):
    with MockChatServer() as server:
        for _ in range(4):
            server.queue(503)
        client, sleeps = _client(server, tmp_path)
        with pytest.raises(PromptRequestError, match="failed 4 times; last error HTTP 503"):
            client.complete(_body())
    assert len(server.requests) == 4 and len(sleeps) == 3
    assert sleeps == sorted(sleeps)  # exponential
    assert not list((tmp_path / "cache").glob("**/*.json"))  # failures are never cached


def test_backoff_jitter_is_seeded():
    first = ChatClient("http://127.0.0.1:9/v1", seed=3)
    second = ChatClient("http://127.0.0.1:9/v1", seed=3)
    assert [first._backoff(n, None) for n in range(5)] == [second._backoff(n, None) for n in range(5)]


def test_a_refused_request_raises_config_error_at_once_without_the_key(tmp_path):
    with MockChatServer() as server:
        server.queue(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}})
        client, _ = _client(server, tmp_path)
        with pytest.raises(ConfigError, match="401") as raised:
            client.complete(_body())
    assert len(server.requests) == 1
    assert KEY not in str(raised.value) and "***" in str(raised.value)


def test_the_key_is_sent_in_the_authorization_header_only(tmp_path):
    with MockChatServer() as server:
        client, _ = _client(server, tmp_path)
        client.complete(_body())
    request = server.requests[0]
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert KEY not in json.dumps(request["body"])
    assert KEY not in repr(client) and "***" in repr(client)
    with pytest.raises(TypeError):
        pickle.dumps(client._key)


def test_no_key_sends_no_authorization_header(tmp_path):
    with MockChatServer() as server:
        client, _ = _client(server, tmp_path, api_key=None)
        client.complete(_body())
    assert "Authorization" not in server.requests[0]["headers"]


def test_answers_are_cached_atomically_and_never_sent_twice(tmp_path):
    body = _body()
    with MockChatServer() as server:
        client, _ = _client(server, tmp_path)
        first = client.complete(body)
        again = client.complete(body)
        rerun = _client(server, tmp_path)[0].complete(body)
        other = client.complete({**body, "seed": 1})  # any change of the body is a new request
    assert len(server.requests) == 2
    assert again.from_cache and rerun.from_cache and not other.from_cache
    assert rerun.response == first.response and rerun.key == request_key(body)
    files = sorted((tmp_path / "cache").rglob("*"))
    assert [f.name for f in files if f.is_file()] == sorted(f"{k}.json" for k in (first.key, other.key))
    record = json.loads((tmp_path / "cache" / first.key[:2] / f"{first.key}.json").read_text())
    assert record["request"] == body and record["response"] == first.response
    assert all(KEY not in f.read_text() for f in files if f.is_file())


def test_an_unreadable_cache_file_is_sent_again(tmp_path, caplog):
    body = _body()
    with MockChatServer() as server:
        client, _ = _client(server, tmp_path)
        key = client.complete(body).key
        (tmp_path / "cache" / key[:2] / f"{key}.json").write_text("{truncated")
        assert not client.complete(body).from_cache
    assert len(server.requests) == 2 and "unreadable cache file" in caplog.text


def test_complete_many_sends_identical_bodies_once_and_keeps_order(tmp_path):
    bodies = [_body("a"), _body("b"), _body("a"), _body("c")]
    seen = []
    with MockChatServer() as server:
        client, _ = _client(server, tmp_path)
        results = client.complete_many(bodies, progress=lambda done, total: seen.append((done, total)))
    assert len(server.requests) == 3
    assert [r.request for r in results] == bodies and results[0] is results[2]
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)


def test_at_most_max_concurrency_requests_are_in_flight(tmp_path):
    with MockChatServer(delay=0.05) as server:
        client, _ = _client(server, tmp_path, max_concurrency=2)
        client.complete_many([_body(str(i)) for i in range(6)])
    assert server.max_in_flight == 2 and len(server.requests) == 6


def test_a_failing_request_in_a_batch_raises_after_the_others_are_cached(tmp_path):
    with MockChatServer() as server:
        server.queue(400, {"error": {"message": "bad option"}})
        client, _ = _client(server, tmp_path, max_concurrency=1)
        with pytest.raises(ConfigError, match="bad option"):
            client.complete_many([_body("a"), _body("b")])


def test_rate_limiter_spaces_request_starts():
    now = [100.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)

    limiter = RateLimiter(120, clock=lambda: now[0], sleep=sleep)  # one start every 0.5 s
    for _ in range(3):
        limiter.acquire()
    assert waits == [0.5, 1.0]
    now[0] = 200.0
    limiter.acquire()  # after a pause, no wait
    assert waits == [0.5, 1.0]
    RateLimiter(None, sleep=sleep).acquire()
    assert len(waits) == 2


def test_an_api_base_that_is_not_http_is_refused():
    with pytest.raises(ConfigError, match="not an http"):
        ChatClient("api.openai.com/v1")


def test_redirects_are_refused_so_the_key_never_reaches_another_host(tmp_path):
    with MockChatServer() as elsewhere, MockChatServer() as server:
        server.queue(302, {}, headers={"Location": elsewhere.url + "/chat/completions"})
        client, _ = _client(server, tmp_path)
        with pytest.raises(ConfigError, match="302.*redirects"):
            client.complete(_body())
    assert elsewhere.requests == [] and len(server.requests) == 1
