"""Benchmark `scdrugmap check` on a simulated collection read backed from disk: wall time and peak memory.

    python benchmarks/bench_check.py --cells 100000               # a quick look
    python benchmarks/bench_check.py                              # the full primary collection, 326,751 x 20,000

Simulates the collection to ``--path`` (an ``.h5ad``) with `simulate_collection` when the file is missing,
in a child process of its own, so its memory is not counted. Then, in a fresh child process, opens the file
with ``read_h5ad(path, backed=True)`` and runs `check_adata` on it, as ``scdrugmap check`` does. Prints one
JSON object: wall and CPU seconds of open + check, cells/s, and the child's peak resident memory two ways
(``ru_maxrss``, and the largest ``VmRSS`` a thread read every 20 ms) next to its resident memory before the
check (interpreter and imports), so the growth is the check's. ``--mode memory`` reads the whole file into
memory first instead, for comparison.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

from _common import FULL_CELLS, FULL_GENES, rss_mib


def _simulate(cells: int, genes: int, seed: int, path: str) -> None:
    from scdrugmap.data.simulate import simulate_collection

    simulate_collection(n_cells=cells, n_genes=genes, seed=seed, out_path=path)


def _check(path: str, mode: str, chunk_rows: int, queue: multiprocessing.Queue) -> None:
    from scdrugmap.data.check import check_adata
    from scdrugmap.data.io import read_h5ad

    rss_before = rss_mib()
    peak = {"rss": rss_before}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak["rss"] = max(peak["rss"], rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started, cpu_started = time.perf_counter(), time.process_time()
    adata = read_h5ad(path, backed=mode == "backed")
    opened = time.perf_counter() - started
    report = check_adata(adata, source=path, n_folds=10, chunk_rows=chunk_rows)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    done.set()
    sampler.join()
    nnz = int(adata.X.group["indptr"][-1]) if mode == "backed" and hasattr(adata.X, "group") else None
    if mode == "backed":
        adata.file.close()
    queue.put({
        "cells": report.facts["shape"][0], "genes": report.facts["shape"][1], "nonzeros": nnz,
        "value_kind": report.facts.get("value_kind"), "errors": len(report.errors),
        "warnings": len(report.problems) - len(report.errors), "open_seconds": round(opened, 2),
        "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
        "cells_per_s": round(report.facts["shape"][0] / seconds, 1),
        "rss_before_mib": round(rss_before, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_vmrss_sampled_mib": round(max(peak["rss"], rss_mib()), 1),
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=FULL_CELLS)
    parser.add_argument("--genes", type=int, default=FULL_GENES)
    parser.add_argument("--path", type=Path, default=None,
                        help="the .h5ad to check; simulated there when missing (default: a file in the temp dir, "
                             "deleted afterwards)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-rows", type=int, default=10_000)
    parser.add_argument("--mode", choices=("backed", "memory"), default="backed",
                        help="backed: read X in row chunks from disk (as scdrugmap check does); memory: read it all")
    parser.add_argument("--keep", action="store_true", help="keep a file this run simulated")
    args = parser.parse_args()

    context = multiprocessing.get_context("spawn")
    path = args.path or Path(tempfile.gettempdir()) / f"bench_check_{args.cells}x{args.genes}.h5ad"
    simulated, simulate_seconds = False, None
    if not path.exists():
        started = time.perf_counter()
        child = context.Process(target=_simulate, args=(args.cells, args.genes, args.seed, str(path)))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"simulating {path} failed (exit code {child.exitcode})")
        simulated, simulate_seconds = True, round(time.perf_counter() - started, 1)

    queue = context.Queue()
    child = context.Process(target=_check, args=(str(path), args.mode, args.chunk_rows, queue))
    child.start()
    result = queue.get()
    child.join()
    result.update({"mode": args.mode, "chunk_rows": args.chunk_rows, "file_gib": round(path.stat().st_size / 2**30, 3),
                   "simulated_seconds": simulate_seconds, "cpu_count": os.cpu_count(),
                   "load_average": round(os.getloadavg()[0], 1)})
    if simulated and not args.keep:
        path.unlink()
    else:
        result["path"] = str(path)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
