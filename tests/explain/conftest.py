"""Fixtures of the explain tests: one BLAS and torch thread.

The machines that run these tests have two cores shared by many processes; pydeseq2's many tiny per-gene
fits and the small MLP heads run several times faster on one thread than on two contended ones.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every explain module on one thread (`one_thread` of tests/conftest.py)."""
    yield
