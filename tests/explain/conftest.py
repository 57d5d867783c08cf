"""Fixtures of the explain tests: one BLAS and torch thread.

The machines that run these tests have two cores shared by many processes; pydeseq2's many tiny per-gene
fits and the small MLP heads run several times faster on one thread than on two contended ones.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1, user_api="blas"):
        yield
    torch.set_num_threads(threads)
