"""Benchmark `scdrugmap report`: whole-process wall time per output format, each run in a fresh process.

    python benchmarks/bench_report.py --run scdrugmap-runs/demo
    python benchmarks/bench_report.py --run scdrugmap-runs/demo --src /tmp/base/src --src src   # before / after

Runs ``scdrugmap report RUN --format F --out TMP`` as a fresh ``python`` process for each format
set (``html``, ``png``, ``svg``, ``pdf`` and all four together) and each source tree given with
``--src`` (put first on ``PYTHONPATH``; default: the installed package), ``--repeat`` times,
interleaving the trees so that the machine's load falls on them alike. Prints one JSON object:
the load average before and after, and per tree and format set the fastest and the median wall
seconds and CPU seconds (user + system of the process: on a loaded machine, closer to what an
idle one's wall clock shows). The run folder is only read; reports go to temporary folders.

``--strip-maps`` first copies the run and removes the 2-D maps stored with its embedding samples
(a run written before they were stored), so the report computes them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMAT_SETS = ("html", "png", "svg", "pdf", "html,png,svg,pdf")
#: Runs the command line of the package found first on PYTHONPATH.
CLI = "import sys; from scdrugmap.cli import main; sys.argv[0] = 'scdrugmap'; main()"


def strip_maps(run_dir: Path, into: Path) -> Path:
    """Copy a run folder and drop the stored 2-D maps from its embedding samples; return the copy."""
    import numpy as np

    copy = into / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report"))
    for path in (copy / "embeddings").glob("*.npz"):
        with np.load(path, allow_pickle=False) as saved:
            kept = {name: saved[name] for name in ("embedding", "cell")}
        with path.open("wb") as handle:
            np.savez_compressed(handle, **kept)
    return copy


def time_report(src: str | None, run_dir: Path, formats: str, projection: str) -> tuple[float, float]:
    """Return the wall seconds and the CPU seconds (user + system) of one ``scdrugmap report`` process."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve()), *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-c", CLI, "report", str(run_dir), "--format", formats, "--out", out,
                   "--projection", projection]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _summary(times: list[tuple[float, float]]) -> dict[str, float]:
    walls, cpus = [t[0] for t in times], [t[1] for t in times]
    return {"wall_min": round(min(walls), 2), "wall_median": round(statistics.median(walls), 2),
            "cpu_min": round(min(cpus), 2), "cpu_median": round(statistics.median(cpus), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("scdrugmap-runs/demo"), help="a benchmark run folder")
    parser.add_argument("--src", action="append", default=None,
                        help="a source tree to put first on PYTHONPATH (repeat to compare trees)")
    parser.add_argument("--formats", default=";".join(FORMAT_SETS), help="format sets, separated by ';'")
    parser.add_argument("--projection", default="auto", choices=("auto", "umap", "pca"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--strip-maps", action="store_true", help="report on a copy without stored 2-D maps")
    args = parser.parse_args()
    sources = args.src or [None]
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = strip_maps(args.run, Path(scratch)) if args.strip_maps else args.run
        # one untimed report per tree first: a first-ever UMAP compiles numba's cache, and files get cached
        for src in sources:
            time_report(src, run_dir, "png", args.projection)
        load_before = os.getloadavg()
        format_sets = args.formats.split(";")
        seconds: dict[str, dict[str, list[tuple[float, float]]]] = {str(s): {f: [] for f in format_sets}
                                                                     for s in sources}
        for _ in range(args.repeat):
            for formats in format_sets:
                for src in sources:
                    seconds[str(src)][formats].append(time_report(src, run_dir, formats, args.projection))
        load_after = os.getloadavg()
    result = {
        "run": str(args.run), "projection": args.projection, "stored_maps_removed": args.strip_maps,
        "repeat": args.repeat, "cpus": os.cpu_count(), "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "seconds": {src: {formats: _summary(times) for formats, times in by_format.items()}
                    for src, by_format in seconds.items()},
    }
    if len(sources) > 1:
        first, *others = (str(s) for s in sources)
        result["speedup_vs_first"] = {
            other: {f: {kind: round(min(t[i] for t in seconds[first][f]) / min(t[i] for t in seconds[other][f]), 2)
                        for i, kind in enumerate(("wall", "cpu"))} for f in seconds[other]}
            for other in others}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
