"""The weights manager against a real local HTTP server laid out like the Hugging Face hub.

The server (``http.server`` in a thread, ephemeral port on 127.0.0.1) serves
``/{owner}/{repo}/resolve/{rev}/{path}``, honours ``Range: bytes=N-`` (206 with
Content-Range, 416 past the end), and records every request, so tests can assert
what was asked for and count requests. ``HF_ENDPOINT`` points `hf_file` URLs at it.

"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import socket
import threading
from dataclasses import dataclass, field

import pytest

from scdrugmap.errors import CheckpointError, WeightsNotFoundError
from scdrugmap.models import weights
from scdrugmap.models.weights import (
    MANIFEST,
    WeightsSource,
    cache_path,
    download,
    hf_file,
    is_cached,
    resolve_weights,
)

REPO = "tiny-owner/tiny-model"
CONFIG = b'{"hidden_size": 4}\n'
WEIGHTS = bytes(range(256)) * 40  # 10,240 bytes


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Request:
    path: str
    headers: dict[str, str]


@dataclass
class FakeHub:
    """What the server holds and how it misbehaves; `requests` logs every GET."""

    files: dict[str, bytes] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)  # path -> error code to answer
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location
    truncate: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before hanging up
    ignore_range: bool = False
    requests: list[Request] = field(default_factory=list)
    url: str = ""

    def add(self, path: str, data: bytes, *, repo: str = REPO, revision: str = "main") -> str:
        url_path = f"/{repo}/resolve/{revision}/{path}"
        self.files[url_path] = data
        return url_path


def make_handler(hub: FakeHub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            hub.requests.append(Request(self.path, dict(self.headers.items())))
            if self.path in hub.status:
                self.send_error(hub.status[self.path])
                return
            if self.path in hub.redirects:
                self.send_response(302)
                self.send_header("Location", hub.redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path not in hub.files:
                self.send_error(404)
                return
            data = hub.files[self.path]
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if match and not hub.ignore_range:
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: hub.truncate.get(self.path, len(body))])
            self.wfile.flush()

    return Handler


@pytest.fixture
def start_hub():
    """Start fake hubs on ephemeral ports; all are shut down after the test."""
    servers = []

    def start() -> FakeHub:
        hub = FakeHub()
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(hub))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
        hub.url = f"http://127.0.0.1:{server.server_address[1]}"
        return hub

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hub(start_hub, monkeypatch) -> FakeHub:
    """A fake hub holding a config and a weights file, with HF_ENDPOINT pointing at it."""
    hub = start_hub()
    hub.add("config.json", CONFIG)
    hub.add("weights/model.bin", WEIGHTS)
    monkeypatch.setenv(weights.HF_ENDPOINT_ENV, hub.url + "/")  # a trailing slash must not matter
    monkeypatch.delenv("SCDRUGMAP_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return hub


def tiny_source(*, sha: str | None = None, size: int | None = None, token_env: str | None = None,
                name: str = "tiny-model") -> WeightsSource:
    return WeightsSource(
        name=name,
        files=(
            hf_file(REPO, "config.json", sha256=sha256(CONFIG), size=len(CONFIG)),
            hf_file(REPO, "weights/model.bin", filename="weights/model.bin", sha256=sha, size=size),
        ),
        homepage="https://example.org/tiny-model",
        token_env=token_env,
    )


# --- downloads land in the cache ---------------------------------------------------------------------------


def test_hf_file_url_resolves_against_hf_endpoint(hub):
    remote = hf_file(REPO, "weights/model.bin", revision="abc123")
    assert remote.filename == "model.bin"
    assert remote.resolved_url() == f"{hub.url}/{REPO}/resolve/abc123/weights/model.bin"


def test_download_writes_verified_files_and_a_manifest_into_the_cache(hub):
    source = tiny_source(sha=sha256(WEIGHTS), size=len(WEIGHTS))
    folder = download(source)
    assert folder == cache_path(source)
    assert (folder / "config.json").read_bytes() == CONFIG
    assert (folder / "weights" / "model.bin").read_bytes() == WEIGHTS
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest == {"config.json": sha256(CONFIG), "weights/model.bin": sha256(WEIGHTS)}
    assert not list(folder.rglob("*.part"))
    assert is_cached(source)
    assert [r.path for r in hub.requests] == [f"/{REPO}/resolve/main/config.json",
                                               f"/{REPO}/resolve/main/weights/model.bin"]
    assert all("Range" not in r.headers for r in hub.requests)


def test_download_records_the_digest_when_the_publisher_gives_none(hub):
    folder = download(tiny_source(sha=None, size=None))
    assert json.loads((folder / MANIFEST).read_text())["weights/model.bin"] == sha256(WEIGHTS)


def test_download_reports_progress_per_file(hub):
    seen = []
    download(tiny_source(), progress=lambda name, done, total: seen.append((name, done, total)))
    assert seen[-1] == ("weights/model.bin", len(WEIGHTS), len(WEIGHTS))
    assert ("config.json", len(CONFIG), len(CONFIG)) in seen


def test_second_resolve_uses_the_cache_without_any_request(hub):
    source = tiny_source(sha=sha256(WEIGHTS))
    first = resolve_weights(source)
    n_requests = len(hub.requests)
    assert n_requests == 2
    assert resolve_weights(source) == first
    assert download(source) == first
    assert len(hub.requests) == n_requests


def test_force_download_fetches_again(hub):
    source = tiny_source()
    download(source)
    download(source, force=True)
    assert len(hub.requests) == 4


# --- verification -------------------------------------------------------------------------------------------


def test_checksum_mismatch_raises_and_leaves_no_file(hub):
    source = tiny_source(sha="0" * 64)
    with pytest.raises(CheckpointError, match=r"model\.bin: sha256 .* does not match the published 0{64}") as info:
        download(source)
    assert info.type is CheckpointError  # not WeightsNotFoundError
    folder = cache_path(source)
    assert not (folder / "weights" / "model.bin").exists()
    assert not (folder / "weights" / "model.bin.part").exists()
    assert json.loads((folder / MANIFEST).read_text()) == {"config.json": sha256(CONFIG)}
    assert not is_cached(source)


def test_size_mismatch_raises_and_removes_the_partial_file(hub):
    source = tiny_source(size=len(WEIGHTS) + 1)
    with pytest.raises(CheckpointError, match=f"downloaded {len(WEIGHTS)} bytes, expected {len(WEIGHTS) + 1}"):
        download(source)
    weights_dir = cache_path(source) / "weights"
    assert list(weights_dir.iterdir()) == []


# --- resume -------------------------------------------------------------------------------------------------


def write_part(source: WeightsSource, data: bytes) -> None:
    part = cache_path(source) / "weights" / "model.bin.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data)


def test_partial_download_resumes_with_a_range_request(hub):
    source = tiny_source(sha=sha256(WEIGHTS), size=len(WEIGHTS))
    write_part(source, WEIGHTS[:3000])
    seen = []
    folder = download(source, progress=lambda name, done, total: seen.append((name, done, total)))
    assert (folder / "weights" / "model.bin").read_bytes() == WEIGHTS
    weights_requests = [r for r in hub.requests if r.path.endswith("model.bin")]
    assert [r.headers.get("Range") for r in weights_requests] == ["bytes=3000-"]
    assert seen[-1] == ("weights/model.bin", len(WEIGHTS), len(WEIGHTS))


def test_resume_starts_over_when_the_server_ignores_range(hub):
    hub.ignore_range = True
    source = tiny_source(sha=sha256(WEIGHTS), size=len(WEIGHTS))
    write_part(source, b"stale bytes that must not be kept")
    folder = download(source)
    assert (folder / "weights" / "model.bin").read_bytes() == WEIGHTS


def test_complete_part_file_is_accepted_on_416(hub):
    source = tiny_source(sha=sha256(WEIGHTS), size=len(WEIGHTS))
    write_part(source, WEIGHTS)
    folder = download(source)
    assert (folder / "weights" / "model.bin").read_bytes() == WEIGHTS
    assert [r.headers.get("Range") for r in hub.requests if r.path.endswith("model.bin")] == [f"bytes={len(WEIGHTS)}-"]


def test_resume_keeps_range_across_a_redirect(hub):
    hub.add("cdn/model.bin", WEIGHTS, repo="cdn-host")
    hub.redirects[f"/{REPO}/resolve/main/weights/model.bin"] = f"{hub.url}/cdn-host/resolve/main/cdn/model.bin"
    source = tiny_source(sha=sha256(WEIGHTS))
    write_part(source, WEIGHTS[:100])
    assert (download(source) / "weights" / "model.bin").read_bytes() == WEIGHTS
    assert hub.requests[-1].headers.get("Range") == "bytes=100-"


# --- failures that a user must act on ----------------------------------------------------------------------


def test_offline_mode_refuses_to_download_in_one_line(hub, monkeypatch):
    monkeypatch.setenv("SCDRUGMAP_OFFLINE", "1")
    source = tiny_source()
    for call in (lambda: download(source), lambda: resolve_weights(source)):
        with pytest.raises(WeightsNotFoundError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message
        assert "scdrugmap models download tiny-model" in message
    assert hub.requests == []


def test_hf_hub_offline_is_honoured_too(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="scdrugmap models download"):
        resolve_weights(tiny_source())
    assert hub.requests == []


def test_resolve_without_download_permission_refuses(hub):
    with pytest.raises(WeightsNotFoundError, match="not cached"):
        resolve_weights(tiny_source(), allow_download=False)
    assert hub.requests == []


def test_unreachable_server_says_how_to_get_the_weights(monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv(weights.HF_ENDPOINT_ENV, f"http://127.0.0.1:{port}")
    monkeypatch.delenv("SCDRUGMAP_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(WeightsNotFoundError, match=r"cannot reach the server .*scdrugmap models download"):
        download(tiny_source(), timeout=5)


def test_missing_file_on_the_server_names_the_http_status(hub):
    del hub.files[f"/{REPO}/resolve/main/weights/model.bin"]
    with pytest.raises(WeightsNotFoundError, match=r"weights/model\.bin: download failed with HTTP 404"):
        download(tiny_source())


@pytest.mark.parametrize("code", [401, 403])
def test_gated_model_denied_names_the_token_variable(hub, code):
    hub.status[f"/{REPO}/resolve/main/config.json"] = code
    with pytest.raises(WeightsNotFoundError, match=f"access denied \\({code}\\)") as info:
        download(tiny_source(token_env="TINY_TOKEN"))
    assert "set TINY_TOKEN to your access token" in str(info.value)
    assert "https://example.org/tiny-model" in str(info.value)


def test_gated_model_sends_the_token_as_bearer(hub, monkeypatch):
    monkeypatch.setenv("TINY_TOKEN", "secret-token")
    download(tiny_source(token_env="TINY_TOKEN"))
    assert {r.headers.get("Authorization") for r in hub.requests} == {"Bearer secret-token"}


def test_token_is_not_sent_for_sources_without_token_env(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    download(tiny_source())
    assert all("Authorization" not in r.headers for r in hub.requests)


def test_explicit_missing_path_is_an_error_naming_it(hub, tmp_path):
    missing = tmp_path / "no" / "weights"
    with pytest.raises(WeightsNotFoundError, match=re.escape(f"{missing}: no such file or folder")):
        resolve_weights(tiny_source(), missing)
    assert hub.requests == []


def test_explicit_existing_path_is_returned_without_requests(hub, tmp_path):
    assert resolve_weights(tiny_source(), tmp_path) == tmp_path
    assert hub.requests == []


# --- regressions: dropped connections, redirects, files copied by hand ---------------------------------------------------------------


def test_dropped_connection_without_published_checksum_is_not_accepted(hub):
    hub.truncate[f"/{REPO}/resolve/main/weights/model.bin"] = 1000
    with pytest.raises(WeightsNotFoundError):
        download(tiny_source(sha=None, size=None))


def test_dropped_connection_keeps_the_part_file_and_a_rerun_resumes(hub):
    path = f"/{REPO}/resolve/main/weights/model.bin"
    hub.truncate[path] = 1000
    source = tiny_source(sha=sha256(WEIGHTS), size=len(WEIGHTS))
    with pytest.raises(WeightsNotFoundError):
        download(source)
    assert (cache_path(source) / "weights" / "model.bin.part").stat().st_size == 1000
    del hub.truncate[path]
    assert (download(source) / "weights" / "model.bin").read_bytes() == WEIGHTS
    assert hub.requests[-1].headers.get("Range") == "bytes=1000-"


def test_token_is_not_forwarded_to_another_host_on_redirect(hub, start_hub, monkeypatch):
    cdn = start_hub()
    cdn.add("model.bin", WEIGHTS, repo="cdn")
    hub.redirects[f"/{REPO}/resolve/main/weights/model.bin"] = f"{cdn.url}/cdn/resolve/main/model.bin"
    monkeypatch.setenv("TINY_TOKEN", "secret-token")
    assert (download(tiny_source(token_env="TINY_TOKEN")) / "weights" / "model.bin").read_bytes() == WEIGHTS
    assert [r.headers.get("Authorization") for r in cdn.requests] == [None]


def test_files_copied_into_the_cache_folder_as_advised_are_used(monkeypatch):
    source = tiny_source(sha=sha256(WEIGHTS), size=len(WEIGHTS))
    folder = cache_path(source)
    (folder / "weights").mkdir(parents=True)
    (folder / "config.json").write_bytes(CONFIG)
    (folder / "weights" / "model.bin").write_bytes(WEIGHTS)
    monkeypatch.setenv("SCDRUGMAP_OFFLINE", "1")
    assert resolve_weights(source) == folder


def test_sha256_file_reads_in_chunks_and_weights_never_imports_the_encoder_base(tmp_path):
    import ast
    import inspect

    path = tmp_path / "blob.bin"
    path.write_bytes(WEIGHTS * 3)
    assert weights.sha256_file(path, chunk_size=7) == sha256(WEIGHTS * 3)
    # base imports weights (sha256_file, resolve_weights), never the other way round, not even inside a function
    tree = ast.parse(inspect.getsource(weights))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not any(name.startswith("scdrugmap.models.") for name in imported), imported
