"""Browser fixtures: a real uvicorn server in a thread, and Debian's headless Chromium through Playwright.

The tests skip (with the reason) where Chromium or the playwright package is missing, and fail
there instead when SCDRUGMAP_TEST_E2E=1 (CI). Playwright never downloads a browser here: it
drives /usr/bin/chromium. Screenshots go to SCDRUGMAP_TEST_ARTIFACTS (default: a
``scdrugmap-artifacts`` folder in the system temp folder).
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

E2E_ENV = "SCDRUGMAP_TEST_E2E"
ARTIFACTS_ENV = "SCDRUGMAP_TEST_ARTIFACTS"
#: Debian's Chromium; SCDRUGMAP_TEST_CHROMIUM names another binary.
CHROMIUM = os.environ.get("SCDRUGMAP_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _unavailable(reason: str) -> None:
    if os.environ.get(E2E_ENV) == "1":
        pytest.fail(f"{reason} (SCDRUGMAP_TEST_E2E=1 requires the browser tests to run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    folder = Path(os.environ.get(ARTIFACTS_ENV) or Path(tempfile.gettempdir()) / "scdrugmap-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def browser() -> Iterator:
    if not Path(CHROMIUM).is_file():
        _unavailable(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is missing (pip install playwright; no browser download needed)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    """A fresh page (1280 px wide) recording console errors, script errors and failed requests in ``page.problems``."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    new_page = context.new_page()
    problems: list[str] = []
    new_page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    new_page.on("pageerror", lambda error: problems.append(str(error)))
    new_page.on("response", lambda response: problems.append(f"{response.status} {response.url}")
                if response.status >= 400 else None)
    new_page.problems = problems
    yield new_page
    context.close()


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


@pytest.fixture
def server(request, db_url, tmp_path, bundle_root, results_dir) -> Iterator[str]:
    """A live server (worker running) on a free port; yields its base URL.

    Jobs run in their own processes, as in production; a test marked ``in_process_jobs`` runs them in
    the server's process instead, so that its monkeypatches reach them.
    """
    import uvicorn

    from scdrugmap.web import Settings, create_app

    isolation = "thread" if request.node.get_closest_marker("in_process_jobs") else "process"
    settings = Settings(db_url=db_url, data_dir=tmp_path / "web", bundle_dir=bundle_root, results=(results_dir,),
                        projection="pca", poll_seconds=0.1, job_isolation=isolation)
    port = _free_port()
    instance = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                             access_log=False, log_config=None))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not instance.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(15)
