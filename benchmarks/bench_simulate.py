"""Benchmark the simulator streaming a catalog-shaped collection to .h5ad: throughput and peak memory.

    python benchmarks/bench_simulate.py --cells 20000            # a quick look
    python benchmarks/bench_simulate.py                          # the full primary collection, 326,751 x 20,000

Prints one JSON object: cells/s by wall clock and by this process's CPU time (the fair figure on a shared
machine; the load average is printed beside it), genes, non-zeros, file size, and the process's peak
resident memory (``ru_maxrss``) next to its resident memory before simulating, so the growth is the
simulator's. The simulator is single-threaded numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from _common import FULL_CELLS, FULL_GENES, rss_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=FULL_CELLS)
    parser.add_argument("--genes", type=int, default=FULL_GENES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=8192)
    parser.add_argument("--compression", default=None, help="h5py compression of X (gzip, lzf); none by default")
    parser.add_argument("--catalog", type=Path, default=None, help="datasets.csv (default: the package's)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the .h5ad (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the file written in the temp dir")
    args = parser.parse_args()

    import anndata as ad

    from scdrugmap.data.simulate import simulate_collection

    workdir = None
    out = args.out
    if out is None:
        workdir = tempfile.TemporaryDirectory(prefix="bench_simulate_")
        out = Path(workdir.name) / "simulated.h5ad"
    rss_before = rss_mib()
    load_before = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), time.process_time()
    simulate_collection(args.cells, n_genes=args.genes, seed=args.seed, catalog_path=args.catalog, out_path=out,
                        chunk_size=args.chunk_size, compression=args.compression)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    load_after = os.getloadavg()[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    backed = ad.read_h5ad(out, backed="r")
    last_row = backed.X[backed.n_obs - 1: backed.n_obs]
    nnz = int(backed.X.group["indptr"][-1])
    result = {
        "cells": backed.n_obs,
        "genes": backed.n_vars,
        "seconds": round(seconds, 1),
        "cells_per_s": round(backed.n_obs / seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "cells_per_cpu_s": round(backed.n_obs / cpu_seconds, 1),
        "load_average": [round(load_before, 1), round(load_after, 1)],
        "cpu_count": os.cpu_count(),
        "nonzeros": nnz,
        "nonzeros_per_cell": round(nnz / backed.n_obs, 1),
        "last_row_umis": float(last_row.sum()),
        "file_gib": round(out.stat().st_size / 2**30, 3),
        "rss_before_mib": round(rss_before, 1),
        "peak_rss_mib": round(peak, 1),
        "chunk_size": args.chunk_size,
        "compression": args.compression,
    }
    backed.file.close()
    if workdir is not None and not args.keep:
        workdir.cleanup()
    elif workdir is not None:
        result["path"] = str(out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
