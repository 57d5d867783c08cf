"""A bounded load test of a real server on 127.0.0.1 (issue 16, item 5).

A server is started in its own process (uvicorn, as ``scdrugmap serve`` runs it) on a free port of
127.0.0.1, and stopped at the end. Twenty clients upload the memory bomb at once (1.8 MB declaring
25,000 x 20,000 values), then twenty upload a real file at once. The server's resident memory is
read from /proc (VmHWM, reset between the two rounds). Nothing leaves 127.0.0.1; every request has a
timeout and the whole test a deadline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from broken_inputs import memory_bomb

HOST = "127.0.0.1"
CLIENTS = 20
#: Each request's timeout, and the whole test's deadline (seconds).
REQUEST_TIMEOUT = 120.0
DEADLINE = 300.0
MAX_SERVER_RSS_MB = 1024
SRC = Path(__file__).resolve().parents[2] / "src"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads server memory from /proc")]


def _free_port() -> int:
    import socket

    with socket.socket() as handle:
        handle.bind((HOST, 0))
        return handle.getsockname()[1]


def _memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.fixture
def server(tmp_path, bundle_root):
    """A server process on 127.0.0.1 (its own SQLite file and folders); yields (base URL, pid)."""
    import httpx

    port = _free_port()
    script = textwrap.dedent(f"""
        from pathlib import Path
        from scdrugmap.web import serve
        serve("sqlite:///{tmp_path / 'load.db'}", host="{HOST}", port={port}, data_dir=Path(r"{tmp_path / 'web'}"),
              bundle_dir=Path(r"{bundle_root}"), run_worker=False,
              rate_limits={{"upload": ({CLIENTS * 4}, 60.0)}})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "the server did not start"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not answer within 60 s"
            time.sleep(0.2)
        yield base, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _upload_all(base: str, content: bytes, name: str) -> tuple[list[int], float]:
    import httpx

    def one(_: int) -> int:
        with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
            return client.post(f"{base}/api/jobs", files={"file": (name, content, "application/octet-stream")}
                               ).status_code

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        codes = list(pool.map(one, range(CLIENTS)))
    return codes, time.perf_counter() - start


def test_twenty_bomb_uploads_keep_the_server_small_and_twenty_real_uploads_all_finish(server, tmp_path,
                                                                                      adata_factory, to_h5ad):
    base, pid = server
    started = time.monotonic()
    bomb = memory_bomb(tmp_path).read_bytes()
    real = to_h5ad(adata_factory(n_cells=3000, seed=4))
    idle_mb = _memory_kb(pid, "VmRSS") / 1024

    _reset_peak(pid)
    codes, seconds = _upload_all(base, bomb, "bomb.h5ad")
    bomb_peak_mb = _memory_kb(pid, "VmHWM") / 1024
    assert codes == [422] * CLIENTS, codes
    assert bomb_peak_mb < MAX_SERVER_RSS_MB, f"server peak RSS {bomb_peak_mb:.0f} MB under 20 bomb uploads"

    _reset_peak(pid)
    real_codes, real_seconds = _upload_all(base, real, "cells.h5ad")
    real_peak_mb = _memory_kb(pid, "VmHWM") / 1024
    assert real_codes == [201] * CLIENTS, real_codes
    assert real_peak_mb < MAX_SERVER_RSS_MB
    assert time.monotonic() - started < DEADLINE
    print(f"\nserver idle {idle_mb:.0f} MB; 20 bomb uploads ({len(bomb) / 1e6:.1f} MB each): all 422 in "
          f"{seconds:.1f} s, peak RSS {bomb_peak_mb:.0f} MB; 20 real uploads ({len(real) / 1e6:.2f} MB each): "
          f"all 201 in {real_seconds:.1f} s, peak RSS {real_peak_mb:.0f} MB")
