"""Benchmark grid throughput: the same grid on the local executor and on Ray, in jobs per second.

Each executor runs the grid into its own run folder from an empty store (embeddings are cached
first, so both time the heads, the store and the scheduling, not the embedding). Ray is either a
cluster started in this process (``--ray-address`` empty) or an existing one. Prints JSON.

    python benchmarks/bench_grid.py --cells 3000 --models pca,majority
    python benchmarks/bench_grid.py --ray-address 127.0.0.1:6379 --cpus-per-job 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path


def _run(config_values: dict, out: Path) -> dict:
    from scdrugmap.evaluate.grid import BenchmarkConfig
    from scdrugmap.evaluate.runner import run_benchmark

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    results = run_benchmark(BenchmarkConfig(out=str(out), **config_values))
    seconds = time.perf_counter() - start
    results = results[results["level"] == "cell"]  # one row per job (sample-level rows score the same jobs)
    scored = results[results["status"] == "done"]
    return {"jobs": len(results), "scored": len(scored), "seconds": round(seconds, 2),
            "jobs_per_second": round(len(results) / seconds, 2), "mean_auroc": round(float(scored["auroc"].mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--models", default="pca,majority")
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--cpus-per-job", type=float, default=1.0)
    parser.add_argument("--executors", default="local,ray")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="scdrugmap-bench-grid-"))
    os.environ.setdefault("SCDRUGMAP_HOME", str(home / "home"))
    values = {"data": "demo", "demo_cells": args.cells, "demo_genes": args.genes, "models": args.models.split(","),
              "folds": args.folds, "head": {"epochs": args.epochs}}
    facts: dict = {"cells": args.cells, "models": args.models, "folds": args.folds, "epochs": args.epochs,
                   "cpu_count": os.cpu_count(), "load_average_before": os.getloadavg()}
    warm = _run(values, home / "warm")  # simulates the data and fills the embedding cache
    facts["warm_up"] = warm
    for executor in args.executors.split(","):
        config = dict(values, executor=executor)
        if executor == "ray":
            from scdrugmap import cluster

            start = time.perf_counter()
            cluster.connect(args.ray_address)
            facts["ray_connect_seconds"] = round(time.perf_counter() - start, 2)
            config.update(ray_address=args.ray_address, cpus_per_job=args.cpus_per_job)
        facts[executor] = _run(config, home / executor)
    if "local" in facts and "ray" in facts:
        facts["ray_over_local"] = round(facts["ray"]["jobs_per_second"] / facts["local"]["jobs_per_second"], 2)
    facts["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    facts["load_average_after"] = os.getloadavg()
    print(json.dumps(facts, indent=1))
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
