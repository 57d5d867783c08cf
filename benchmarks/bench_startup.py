"""Benchmark start-up: whole-process wall time of quick commands, each run as a fresh ``python`` process.

    python benchmarks/bench_startup.py --file cells20k.h5ad --head heads/pca --run scdrugmap-runs/demo
    python benchmarks/bench_startup.py ... --src /tmp/base/src --src src        # before / after

Times, best of ``--repeat`` fresh processes (interleaved, so the machine's load falls on all alike):

- ``help``: ``scdrugmap --help``;
- ``read_h5ad``: a bare ``anndata.read_h5ad(FILE)`` (the floor ``check`` is compared with);
- ``check``: ``scdrugmap check FILE`` (for each ``--file``);
- ``predict``: ``scdrugmap predict FILE --model pca --head HEAD`` (``--head``: a pca head bundle from
  ``scdrugmap train FILE --model pca``; outputs go to a temporary folder);
- ``report``: ``scdrugmap report RUN --format html,png,svg,pdf`` (``--run``: a benchmark run folder,
  only read; the report goes to a temporary folder; ``--report-formats`` times other format sets too).

Each source tree given with ``--src`` is put first on ``PYTHONPATH`` (default: the installed package).
Prints the load average before and after, and a markdown table: per command and tree the fastest wall
seconds and the CPU seconds (user + system) of that process; ``check`` also as a ratio to ``read_h5ad``
of the same file, and with two trees the first tree's time over the others'.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Runs the command line of the package found first on PYTHONPATH (the console script may point elsewhere).
CLI = "import sys; from scdrugmap.cli import main; sys.argv[0] = 'scdrugmap'; main()"
READ = "import sys, anndata; anndata.read_h5ad(sys.argv[1])"


def commands(files: list[Path], head: Path | None, run: Path | None, out: Path,
             report_formats: list[str]) -> dict[str, list[str]]:
    """Return the argument lists (after ``python``) to time, by name."""
    timed: dict[str, list[str]] = {"help": ["-c", CLI, "--help"]}
    for file in files:
        timed[f"read_h5ad {file.name}"] = ["-c", READ, str(file)]
        timed[f"check {file.name}"] = ["-c", CLI, "check", str(file)]
    if head is not None:
        file = files[-1]
        timed[f"predict {file.name} (pca head)"] = ["-c", CLI, "predict", str(file), "--model", "pca", "--head",
                                                    str(head), "--out", str(out / "predicted.h5ad")]
    for formats in report_formats if run is not None else ():
        timed[f"report ({formats})"] = ["-c", CLI, "report", str(run), "--format", formats, "--out",
                                        str(out / f"report-{formats.replace(',', '-')}")]
    return timed


def time_process(arguments: list[str], src: str | None) -> tuple[float, float]:
    """Return the wall seconds and the CPU seconds (user + system) of one fresh ``python`` process."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve()), *filter(None, [env.get("PYTHONPATH")])])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *arguments], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, action="append", required=True,
                        help="an .h5ad for check and read_h5ad (repeat; predict uses the last)")
    parser.add_argument("--head", type=Path, default=None, help="a pca head bundle (times predict)")
    parser.add_argument("--run", type=Path, default=None, help="a benchmark run folder (times report)")
    parser.add_argument("--report-formats", default="html,png,svg,pdf",
                        help="report format sets to time, separated by ';' (e.g. 'html,png,svg,pdf;html,png')")
    parser.add_argument("--src", action="append", default=None,
                        help="a source tree to put first on PYTHONPATH (repeat to compare trees)")
    parser.add_argument("--only", default=None, help="time only commands whose name contains this text")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sources = args.src or [None]
    with tempfile.TemporaryDirectory() as scratch:
        timed = commands(args.file, args.head, args.run, Path(scratch), args.report_formats.split(";"))
        if args.only:
            timed = {name: a for name, a in timed.items() if args.only in name or name.startswith("read_h5ad")}
        for arguments in timed.values():  # once untimed: files in the page cache, bytecode compiled
            for src in sources:
                time_process(arguments, src)
        load_before = os.getloadavg()
        seconds: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(args.repeat):
            for name, arguments in timed.items():
                for src in sources:
                    seconds.setdefault((name, str(src)), []).append(time_process(arguments, src))
        load_after = os.getloadavg()
    best = {key: min(times) for key, times in seconds.items()}  # the fastest wall time, with its CPU time
    print(f"load average before {' '.join(f'{v:.2f}' for v in load_before)}, after "
          f"{' '.join(f'{v:.2f}' for v in load_after)} ({os.cpu_count()} CPUs); best of {args.repeat}\n")
    header = ["command", *(f"{src} wall s (cpu s)" for src in map(str, sources)), "vs read_h5ad"]
    if len(sources) > 1:
        header += [f"{sources[0]} / {src}" for src in map(str, sources[1:])]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in timed:
        cells = [f"{best[name, str(src)][0]:.2f} ({best[name, str(src)][1]:.2f})" for src in sources]
        ratio = ""
        if name.startswith("check "):
            floor = f"read_h5ad {name.removeprefix('check ')}"
            ratio = " / ".join(f"{best[name, str(src)][0] / best[floor, str(src)][0]:.2f}x" for src in sources)
        row = [name, *cells, ratio]
        if len(sources) > 1:
            row += [f"{best[name, str(sources[0])][0] / best[name, str(src)][0]:.2f}x" for src in sources[1:]]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
