"""Shared fixtures: tiny AnnData built in code, and the one door to ../shared.

Tests that need ../shared skip where it is absent (a user's clone); CI sets
SCDRUGMAP_REQUIRE_SHARED=1, which turns that skip into a failure.
"""

from __future__ import annotations

import pytest

from tests_helpers import make_adata, shared_path


@pytest.fixture
def shared() -> type:
    """Give tests `shared("golden", "scgpt")` -> Path, skipping where ../shared is absent."""
    return shared_path


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep every test's cache (weights, embeddings) out of the user's home."""
    monkeypatch.setenv("SCDRUGMAP_HOME", str(tmp_path_factory.mktemp("scdrugmap_home")))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one BLAS and one torch thread (restored after it).

    The machines that run the tests have two cores shared by many processes; pydeseq2's many tiny per-gene
    fits and small MLP heads run several times faster on one thread than on two contended ones.
    """
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1, user_api="blas"):
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def adata():
    """A fresh tiny AnnData per test (80 cells, 8 samples, 2 studies, 2 tissues)."""
    return make_adata()


@pytest.fixture(autouse=True)
def _restore_logging():
    """Undo the CLI's logging set-up (it configures the root logger, as a program should) after each test."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers
