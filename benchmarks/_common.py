"""Helpers shared by the benchmark scripts: the full collection's size, resident memory, and the matmul
peak every throughput figure is compared with."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: The paper's primary collection: cells x genes of the full-size benchmarks.
FULL_CELLS = 326_751
FULL_GENES = 20_000


def rss_mib() -> float:
    """Return this process's resident memory now (VmRSS), in MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def matmul_peak(device: torch.device | str | None = None, dtype: torch.dtype | None = None, size: int = 2048,
                repeats: int = 10) -> float:
    """Return the best GFLOP/s of a square ``size`` matmul on ``device`` (default CPU, float32), measured now."""
    import torch

    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def print_table(results: dict, float_format: str = ".4g") -> None:
    """Print ``results`` as aligned ``key  value`` lines, floats in ``float_format``."""
    width = max(map(len, results))
    for key, value in results.items():
        shown = f"{value:{float_format}}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
