"""The corpus of broken inputs: every command refuses each with one line, no traceback, nothing written.

Kinds (tests/broken_inputs.py) x check, embed, benchmark, predict (and ``datasets import`` for the
TSV kinds). Each run goes through `scdrugmap.cli.main` (the entry point a user runs) in this process,
its peak memory measured with /proc (VmHWM, reset per case). The declared-size bombs also run in a
fresh interpreter under an address-space limit, measured with ``getrusage``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import resource
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from broken_inputs import COUNTS_MODEL_KINDS, H5AD_KINDS, KIND_OPTIONS, TSV_KINDS, write_tsv_folder
from tests_helpers import make_adata

COMMANDS = ("check", "embed", "benchmark", "predict")
#: Kinds that declare more than this machine holds: run in a child process under an address-space limit.
DECLARED_KINDS = {"memory bomb 25,000 x 20,000", "4 TB declared", "unwritten values in uns"}
#: Most a refused input may add to this process's peak resident memory.
MAX_GROWTH_MB = 200
#: Address-space limit of the child processes (a regression fails with MemoryError, not a swapping machine).
CHILD_ADDRESS_SPACE = 6 << 30
SRC = Path(__file__).resolve().parents[1] / "src"


@dataclass
class Outcome:
    code: int | None
    stdout: str
    stderr: str
    crash: str | None
    growth_mb: float | None

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if "error:" in line]


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return False
    return True


def run_main(*args: str) -> Outcome:
    """Run ``scdrugmap ARGS`` through `main` in this process; report exit code, output, crash and peak growth."""
    from scdrugmap.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    resettable = _reset_peak()
    before = _rss_kb("VmRSS")
    code, crash = None, None
    argv = sys.argv
    sys.argv = ["scdrugmap", "-q", *args]
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    except BaseException as err:  # a traceback a user would see
        import traceback

        crash = "".join(traceback.format_exception(err))
    finally:
        sys.argv = argv
    peak = _rss_kb("VmHWM")
    growth = (peak - before) / 1024 if resettable and peak and before else None
    return Outcome(code, stdout.getvalue(), stderr.getvalue(), crash, growth)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: (size, mtime in ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory) -> Path:
    """A PCA head bundle (logistic); training it also imports what a refused command might import late."""
    import scdrugmap as sdm
    from scdrugmap.registry import input_kind

    input_kind("scbert")
    folder = tmp_path_factory.mktemp("head") / "pca"
    sdm.tl.train(make_adata(n_cells=120, n_samples=12), "pca", head="logistic").save(folder)
    return folder


def command_args(command: str, path: Path, kind: str, work: Path, head: Path) -> list[str]:
    counts_model = kind in COUNTS_MODEL_KINDS
    extra = KIND_OPTIONS.get(kind, [])
    if command == "check":
        return ["check", str(path), *(["--model", "scbert"] if counts_model else []), *extra]
    if command == "embed":
        return ["embed", str(path), "--model", "scbert" if counts_model else "pca", *extra]
    if command == "benchmark":
        return ["benchmark", "--data", str(path), "--models", "scbert" if counts_model else "majority",
                "--folds", "2", "--categories", "tissue", "--out", str(work / "run"), *extra]
    return ["predict", str(path), "--model", "pca", "--head", str(head), *extra]


CASES = [pytest.param(kind, command, id=f"{command}-{kind}") for kind, (_, commands) in H5AD_KINDS.items()
         for command in COMMANDS if (commands == "all" or command in commands) and kind not in DECLARED_KINDS]


def assert_refused(outcome: Outcome, *, files_before: dict, files_after: dict, expect: str | None = None) -> None:
    assert outcome.crash is None, f"a traceback:\n{outcome.crash}"
    assert outcome.code not in (0, None), f"exit 0 for a broken input:\n{outcome.stdout}\n{outcome.stderr}"
    assert "Traceback" not in outcome.stderr + outcome.stdout
    assert len(outcome.error_lines) == 1, f"not one error line:\n{outcome.stderr}"
    assert files_after == files_before, "a file was written, changed or left behind"
    if expect is not None:
        assert expect in outcome.stderr, outcome.stderr
    if outcome.growth_mb is not None:
        assert outcome.growth_mb < MAX_GROWTH_MB, f"peak memory grew by {outcome.growth_mb:.0f} MB"


@pytest.mark.parametrize(("kind", "command"), CASES)
def test_every_command_refuses_each_broken_input_with_one_line(kind, command, tmp_path, head_dir):
    maker, _ = H5AD_KINDS[kind]
    data = tmp_path / "data"
    data.mkdir()
    path = maker(data)
    before = snapshot(tmp_path)
    outcome = run_main(*command_args(command, path, kind, tmp_path, head_dir))
    expect = "[/x]" if "[/x]" in kind else None  # escaped: shown as text, never read as markup
    assert_refused(outcome, files_before=before, files_after=snapshot(tmp_path), expect=expect)
    assert not (tmp_path / "run").exists(), "the benchmark left a run folder"


@pytest.mark.parametrize("kind", list(TSV_KINDS))
def test_datasets_import_refuses_each_broken_file_and_writes_nothing(kind, tmp_path):
    source = write_tsv_folder(tmp_path / "dist", kind)
    before = snapshot(tmp_path)
    outcome = run_main("datasets", "import", str(source), "--out", str(tmp_path / "out"))
    assert_refused(outcome, files_before=before, files_after=snapshot(tmp_path), expect="B_broken.tsv")
    assert not (tmp_path / "out").exists(), "the good file was imported alone"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.import-")], "a staging folder was left"
    if kind not in {"empty TSV", "TSV without Condition", "duplicate TSV gene column", "unknown TSV label",
                    "duplicate TSV cell id", "header-only TSV"}:
        assert "line " in outcome.stderr, outcome.stderr


def test_datasets_import_converts_every_good_file(tmp_path):
    from broken_inputs import GOOD_TSV

    source = tmp_path / "dist"
    source.mkdir()
    (source / "A.tsv").write_text(GOOD_TSV)
    (source / "B.tsv").write_text(GOOD_TSV.replace("c1", "c9"))
    outcome = run_main("datasets", "import", str(source), "--out", str(tmp_path / "out"))
    assert outcome.code == 0, outcome.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["A.h5ad", "B.h5ad"]


# --- refused writes: a full disk, no permission -------------------------------------------------------------

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("command", ["predict", "embed", "benchmark", "import"])
def test_a_full_disk_is_one_line_naming_the_path_and_leaves_nothing(command, tmp_path, head_dir, monkeypatch):
    import anndata
    import numpy as np
    import pandas as pd

    from broken_inputs import GOOD_TSV

    path = tmp_path / "cells.h5ad"
    make_adata(n_cells=120, n_samples=12).write_h5ad(path)
    before = snapshot(tmp_path)
    if command == "predict":  # the output is the input copied, its obs and uns written again
        import h5py

        monkeypatch.setattr(h5py.Group, "copy", _no_space)
        args = ["predict", str(path), "--model", "pca", "--head", str(head_dir), "--out", str(tmp_path / "o.h5ad")]
        named = tmp_path / "o.h5ad"
    elif command == "embed":
        monkeypatch.setattr(np, "save", _no_space)
        args = ["embed", str(path), "--model", "pca", "--out", str(tmp_path / "e.npy")]
        named = tmp_path / "e.npy"
    elif command == "benchmark":
        monkeypatch.setattr(pd.DataFrame, "to_parquet", _no_space)
        args = ["benchmark", "--data", str(path), "--models", "majority", "--folds", "2", "--categories", "tissue",
                "--out", str(tmp_path / "run")]
        named = tmp_path / "run"
    else:
        (tmp_path / "dist").mkdir()
        (tmp_path / "dist" / "A.tsv").write_text(GOOD_TSV)
        before = snapshot(tmp_path)
        monkeypatch.setattr(anndata.AnnData, "write_h5ad", _no_space)
        args = ["datasets", "import", str(tmp_path / "dist"), "--out", str(tmp_path / "out")]
        named = tmp_path / "out"
    outcome = run_main(*args)
    assert_refused(outcome, files_before=before, files_after=snapshot(tmp_path),
                   expect=f"{named}: no space left on device")
    assert not named.exists()


def test_an_unreadable_file_is_one_line(tmp_path, head_dir, monkeypatch):
    """As root nothing is unreadable, so the refusal of ``open`` is simulated."""
    import builtins

    path = tmp_path / "cells.h5ad"
    make_adata().write_h5ad(path)
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    before = snapshot(tmp_path)
    for command in COMMANDS:
        outcome = run_main(*command_args(command, path, "unreadable", tmp_path, head_dir))
        assert_refused(outcome, files_before=before, files_after=snapshot(tmp_path), expect="permission denied")


def test_an_unwritable_output_folder_is_one_line(tmp_path, head_dir, monkeypatch):
    import tempfile

    path = tmp_path / "cells.h5ad"
    make_adata().write_h5ad(path)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    before = snapshot(tmp_path)
    outcome = run_main("predict", str(path), "--model", "pca", "--head", str(head_dir), "--out",
                       str(tmp_path / "o.h5ad"))
    assert_refused(outcome, files_before=before, files_after=snapshot(tmp_path), expect="permission denied")


def test_a_benchmark_failing_before_its_first_job_leaves_no_run_folder(tmp_path, monkeypatch):
    from scdrugmap.evaluate import runner

    path = tmp_path / "cells.h5ad"
    make_adata(n_cells=120, n_samples=12).write_h5ad(path)

    def broken(*args, **kwargs):
        raise runner.ConfigError("the folds cannot be made (simulated)")

    monkeypatch.setattr(runner, "make_folds", broken)  # after the run folder got its config, before any job
    outcome = run_main("benchmark", "--data", str(path), "--models", "pca", "--folds", "2", "--categories",
                       "tissue", "--out", str(tmp_path / "run"))
    assert outcome.code == 1 and outcome.crash is None and "simulated" in outcome.stderr
    assert not (tmp_path / "run").exists()


# --- declared-size bombs: a fresh interpreter, under an address-space limit ---------------------------------

def run_child(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``scdrugmap ARGS`` in a fresh interpreter; return (result, peak RSS in MB, seconds)."""
    script = textwrap.dedent(f"""
        import atexit, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({CHILD_ADDRESS_SPACE}, {CHILD_ADDRESS_SPACE}))
        def peak():  # VmHWM: this image's own peak (ru_maxrss may carry the parent's across exec)
            try:
                lines = open("/proc/self/status").read().splitlines()
                return int(next(l for l in lines if l.startswith("VmHWM:")).split()[1])
            except (OSError, StopIteration):
                return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        atexit.register(lambda: sys.stderr.write("PEAK_KB=%d\\n" % peak()))
        sys.argv = ["scdrugmap", "-q", *sys.argv[1:]]
        from scdrugmap.cli import main
        main()
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)
    seconds = time.perf_counter() - start
    peak = [line for line in done.stderr.splitlines() if line.startswith("PEAK_KB=")]
    done.stderr = "\n".join(line for line in done.stderr.splitlines() if not line.startswith("PEAK_KB="))
    return done, int(peak[-1].split("=")[1]) / 1024 if peak else float("nan"), seconds


@pytest.fixture(scope="module")
def declared(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("declared")
    return {kind: H5AD_KINDS[kind][0](folder) for kind in DECLARED_KINDS}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", sorted(DECLARED_KINDS))
def test_declared_bombs_are_refused_in_bounded_memory(kind, command, declared, tmp_path, head_dir):
    path = declared[kind]
    before = snapshot(path.parent) | snapshot(tmp_path)
    done, peak_mb, seconds = run_child(*command_args(command, path, kind, tmp_path, head_dir))
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in done.stderr, done.stderr
    assert snapshot(path.parent) | snapshot(tmp_path) == before
    assert peak_mb < 1024, f"{command} on {kind}: peak RSS {peak_mb:.0f} MB"
    print(f"{command} on {kind}: refused in {seconds:.2f} s, peak RSS {peak_mb:.0f} MB")


def test_predict_on_the_memory_bomb_stays_under_2_gb_and_check_on_4_tb_answers_within_5_s(declared, tmp_path,
                                                                                          head_dir):
    """The acceptance figures of issue 16, measured in fresh interpreters."""
    bomb, huge = declared["memory bomb 25,000 x 20,000"], declared["4 TB declared"]
    assert bomb.stat().st_size < 2_000_000
    done, peak_mb, _ = run_child("predict", str(bomb), "--model", "pca", "--head", str(head_dir))
    assert done.returncode == 1 and peak_mb < 2048, (peak_mb, done.stderr)
    assert "never written" in done.stderr
    done, peak_mb, seconds = run_child("check", str(huge))
    assert done.returncode == 1 and seconds < 5, (seconds, done.stderr)
    assert "no command can hold it" in done.stderr, done.stderr


def test_rlimit_is_available():
    """The child processes rely on RLIMIT_AS (Linux and macOS)."""
    assert resource.getrlimit(resource.RLIMIT_AS)
