"""The Ray executor and the sharded embedding, on a real local Ray cluster (`ray start --head` on 127.0.0.1).

Starting a cluster takes seconds and needs the ``ray`` extra, so these run when SCDRUGMAP_TEST_RAY=1
(CI sets it); the rest of the suite never imports Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scdrugmap.evaluate.grid import BenchmarkConfig
from scdrugmap.evaluate.runner import run_benchmark
from scdrugmap.evaluate.store import ResultStore
from tests_helpers import golden_case, make_adata

pytestmark = pytest.mark.skipif(os.environ.get("SCDRUGMAP_TEST_RAY") != "1",
                                reason="set SCDRUGMAP_TEST_RAY=1 to start a local Ray cluster (CI does)")

METRICS = ["f1", "auroc", "accuracy", "precision", "recall"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address():
    """Start `ray start --head --block` on 127.0.0.1 with this machine's CPUs; stop it after the module."""
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if ray_cli is None:
        pytest.fail("SCDRUGMAP_TEST_RAY=1 but the ray command is missing: pip install -e '.[ray]'")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    port = _free_port()
    # token auth (recent Ray's default) needs a token: a fresh machine has none, so the cluster and every
    # driver of this module share one made here (a user's ~/.ray/auth_token, if any, stays untouched)
    made_token = "RAY_AUTH_TOKEN" not in os.environ and not (Path.home() / ".ray" / "auth_token").exists()
    if made_token:
        import secrets

        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         f"--num-cpus={os.cpu_count()}", "--num-gpus=0", f"--temp-dir={temp_dir}", "--include-dashboard=false",
         "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while subprocess.run([ray_cli, "status", f"--address={address}"], env=env, capture_output=True).returncode:
        if head.poll() is not None or time.monotonic() > deadline:
            head.kill()
            pytest.fail(f"the local Ray cluster did not start (exit {head.poll()})")
        time.sleep(1)
    yield address
    import ray

    ray.shutdown()
    head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
    try:
        head.wait(60)
    except subprocess.TimeoutExpired:
        head.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)
    if made_token:
        del os.environ["RAY_AUTH_TOKEN"]


@pytest.fixture
def ray_env(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the cluster above asks for its token (~/.ray/auth_token)


def _config(out: Path, **changes) -> BenchmarkConfig:
    values = {"data": "demo", "demo_cells": 300, "out": str(out), "models": ["pca", "majority"],
              "categories": ["tissue", "therapy"], "folds": 3, "head": {"epochs": 3, "hidden": 32}}
    return BenchmarkConfig(**{**values, **changes})


def _assert_same_results(local: pd.DataFrame, other: pd.DataFrame, local_dir: Path, other_dir: Path) -> None:
    """Same jobs, same statuses and metrics; probabilities equal up to float summation order (threads)."""
    index = ["key", "level"] if "level" in local else ["key"]  # a scored job has a cell and a sample row
    a, b = local.set_index(index).sort_index(), other.set_index(index).sort_index()
    assert list(a.index) == list(b.index) and a.index.is_unique
    assert (a["status"] == b["status"]).all()
    pd.testing.assert_frame_equal(a[METRICS], b[METRICS])
    cells = [pd.read_parquet(d / "predictions.parquet").sort_values(["key", "cell"], ignore_index=True)
             for d in (local_dir, other_dir)]
    assert cells[0][["key", "cell", "label"]].equals(cells[1][["key", "cell", "label"]])
    np.testing.assert_allclose(cells[0]["probability"], cells[1]["probability"], atol=1e-6, rtol=0)


def test_ray_grid_gives_the_local_results(ray_address, ray_env, tmp_path):
    local = run_benchmark(_config(tmp_path / "local"))
    on_ray = run_benchmark(_config(tmp_path / "ray", executor="ray", ray_address=ray_address))
    assert len(local) > 60 and (local["status"] == "done").all()
    _assert_same_results(local, on_ray, tmp_path / "local", tmp_path / "ray")


def test_a_grid_begun_locally_is_finished_on_ray_without_recomputing(ray_address, ray_env, tmp_path):
    run_benchmark(_config(tmp_path / "run", models=["pca"]))
    first = ResultStore(tmp_path / "run").results()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "jobs").glob("*.parquet")}
    both = run_benchmark(_config(tmp_path / "run", executor="ray", ray_address=ray_address))
    assert not both.duplicated(["key", "level"]).any() and len(both) == 2 * len(first)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "jobs").glob("*.parquet")
            if p.name in mtimes} == mtimes  # pca's finished jobs were not run again
    reference = run_benchmark(_config(tmp_path / "local"))
    _assert_same_results(reference, both, tmp_path / "local", tmp_path / "run")


def test_lora_and_frozen_jobs_of_a_foundation_model_run_on_ray(ray_address, ray_env, shared, tmp_path,
                                                              monkeypatch):
    adata, weights, options = golden_case(shared, "geneformer")
    data = tmp_path / "data.h5ad"
    adata.write_h5ad(data)
    config = {"data": str(data), "models": ["geneformer"], "strategies": ["frozen", "lora"], "scenarios": ["pooled"],
              "categories": ["tissue"], "folds": 2, "weights": {"geneformer": weights},
              "model_options": {"geneformer": options}, "head": {"epochs": 2, "hidden": 16},
              "lora": {"epochs": 1, "hidden": 16, "batch_size": 8}}
    on_ray = run_benchmark(BenchmarkConfig(out=str(tmp_path / "ray"), executor="ray", ray_address=ray_address,
                                           shard_cells=7, **config))
    facts = json.loads((tmp_path / "ray" / "models.json").read_text())["geneformer"]
    assert facts["cache"] == "miss"  # embedded on the cluster, in shards of 7 cells
    monkeypatch.setenv("SCDRUGMAP_HOME", str(tmp_path / "other-home"))  # the local run embeds again, here
    local = run_benchmark(BenchmarkConfig(out=str(tmp_path / "local"), **config))
    assert json.loads((tmp_path / "local" / "models.json").read_text())["geneformer"]["cache"] == "miss"
    assert set(on_ray["strategy"]) == {"frozen", "lora"} and (on_ray["status"] == "done").all()
    _assert_same_results(local, on_ray, tmp_path / "local", tmp_path / "ray")


def _task_processes(prefix: str) -> list[int]:
    """Return pids of Ray workers now running a task whose name starts with ``prefix`` (their process title)."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in listing.splitlines()
            if line.split(None, 1)[1:] and line.split(None, 1)[1].startswith(f"ray::{prefix}")]


def test_a_task_killed_mid_grid_is_retried_and_recorded_once(ray_address, ray_env, tmp_path):
    args = ["--data", "demo", "--demo-cells", "600", "--models", "pca", "--categories", "tissue,therapy,regimen",
            "--scenarios", "pooled", "--folds", "5"]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    config_file = tmp_path / "config.yaml"
    config_file.write_text("head:\n  epochs: 40\n  patience: 40\n")  # units long enough to be caught running
    scdrugmap = [str(Path(sys.executable).parent / "scdrugmap"), "-q", "benchmark", "--config", str(config_file), *args]
    run = subprocess.Popen([*scdrugmap, "--out", str(tmp_path / "ray"), "--executor", "ray", "--ray-address",
                            ray_address], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and run.poll() is None and time.monotonic() < deadline:
        running = _task_processes("pca|frozen")
        if running:
            os.kill(running[0], signal.SIGKILL)
            killed = running[0]
        time.sleep(0.02)
    output, _ = run.communicate(timeout=300)
    assert killed is not None, f"no task was seen running to kill:\n{output}"
    assert run.returncode == 0, output
    results = ResultStore(tmp_path / "ray").results()
    assert not results.duplicated(["key", "level"]).any() and results["key"].nunique() >= 3 * 5
    assert (results["status"] != "failed").all(), results[["key", "status", "reasons"]]  # the retry succeeded
    local = subprocess.run([*scdrugmap, "--out", str(tmp_path / "local")], env=env, capture_output=True, text=True)
    assert local.returncode == 0, local.stdout + local.stderr
    _assert_same_results(ResultStore(tmp_path / "local").results(), results, tmp_path / "local", tmp_path / "ray")


def test_sharded_embedding_writes_cells_in_order_like_a_local_embedding(ray_address, ray_env, tmp_path):
    from typer.testing import CliRunner

    from scdrugmap.cli import app

    adata = make_adata(n_cells=45)
    data = tmp_path / "cells.h5ad"
    adata.write_h5ad(data)
    runner = CliRunner()
    local = runner.invoke(app, ["embed", str(data), "--model", "minilm", "--out", str(tmp_path / "local.npy")])
    assert local.exit_code == 0, local.output
    sharded = runner.invoke(app, ["embed", str(data), "--model", "minilm", "--out", str(tmp_path / "ray.h5ad"),
                                  "--executor", "ray", "--ray-address", ray_address, "--shard-cells", "10"])
    assert sharded.exit_code == 0, sharded.output
    written = ad.read_h5ad(tmp_path / "ray.h5ad")
    expected = np.load(tmp_path / "local.npy")
    assert written.obsm["X_minilm"].shape == expected.shape == (45, 384)
    np.testing.assert_allclose(written.obsm["X_minilm"], expected, atol=1e-5, rtol=0)
    assert written.uns["scdrugmap"]["X_minilm"]["model"] == "minilm"
    local_h5ad = runner.invoke(app, ["embed", str(data), "--model", "minilm", "--out", str(tmp_path / "local.h5ad")])
    assert local_h5ad.exit_code == 0, local_h5ad.output
    np.testing.assert_array_equal(written.obs["minilm_gene_overlap"],  # per-cell overlap, also in cell order
                                  ad.read_h5ad(tmp_path / "local.h5ad").obs["minilm_gene_overlap"])
    np.testing.assert_array_equal(written.X.toarray(), adata.X.toarray())  # the rest of the file is untouched
