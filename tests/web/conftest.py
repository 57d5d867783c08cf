"""Fixtures of the web tests: a database (SQLite, or a real PostgreSQL), apps, uploads, bundles, results.

SQLite files are the default. With ``SCDRUGMAP_TEST_POSTGRES=1`` the same tests run against a
PostgreSQL server started for the session: Debian's postgresql (installed with apt-get when
missing), a fresh cluster in a temp folder on 127.0.0.1 and a free port, run as the
``postgres`` user when the tests run as root; every test gets empty tables.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

POSTGRES_ENV = "SCDRUGMAP_TEST_POSTGRES"
GENES = ["TP53", "EGFR", "KRAS", "BRAF", "MYC", "CD3E", "CD4", "CD8A", "PTPRC", "ACTB", "GAPDH", "MKI67", "TOP2A", "CDK1", "CCNB1", "ERBB2", "ESR1", "PGR", "AR", "VIM", "EPCAM", "KRT8", "KRT18", "KRT19", "CDH1", "CDH2", "SNAI1", "TWIST1", "ZEB1", "FN1", "COL1A1", "COL1A2", "SPARC", "PDGFRB", "ACTA2", "CD68", "CD14", "LYZ", "MS4A1", "CD19", "CD79A", "NKG7", "GNLY", "GZMB", "PRF1", "IFNG", "TNF", "IL2", "IL7R", "CCR7", "SELL", "FOXP3", "CTLA4", "PDCD1", "LAG3", "HAVCR2", "TIGIT"]


def tiny_adata(n_cells: int = 60, n_samples: int = 6, seed: int = 0, labelled: bool = True):
    """Return a small count AnnData in the data contract (per-sample labels, real gene symbols)."""
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    samples = np.arange(n_cells) % n_samples
    labels = (np.arange(n_samples) % 2)[samples]
    rate = rng.gamma(2.0, 1.0, len(GENES))
    shift = np.zeros(len(GENES))
    shift[:8] = 1.5
    counts = rng.poisson(rate[None, :] * np.exp(np.outer(labels, shift))).astype(np.float32)
    counts[:, 9] += 1  # every cell expresses ACTB
    obs = pd.DataFrame({"sample": [f"P{s}" for s in samples], "study": "GSE1", "tissue": "Tumor tissue"},
                       index=[f"cell{i}" for i in range(n_cells)])
    if labelled:
        obs["response"] = np.where(labels == 1, "sensitive", "resistant")
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=list(GENES)))


def h5ad_bytes(adata) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.h5ad"
        adata.write_h5ad(path)
        return path.read_bytes()


# --- databases ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (as the postgres user when run by root)."""

    def __init__(self) -> None:
        bin_dir = _postgres_bin()
        if bin_dir is None:  # Debian's package; refresh the package lists once if they are stale
            if subprocess.run(["apt-get", "install", "-y", "postgresql"], capture_output=True).returncode:
                subprocess.run(["apt-get", "update"], check=True, capture_output=True)
                subprocess.run(["apt-get", "install", "-y", "postgresql"], check=True, capture_output=True)
            bin_dir = _postgres_bin()
        if bin_dir is None:
            pytest.fail("postgresql is not installed and apt-get could not install it")
        self.bin_dir = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="scdrugmap-pg-"))
        self.data = self.folder / "data"
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.folder, user="postgres", group="postgres")

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> str:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "server.log"), "-w", "start")
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as connection:
            connection.execute("CREATE DATABASE scdrugmap_test")
        return f"postgresql://postgres@127.0.0.1:{self.port}/scdrugmap_test"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str | None]:
    """The URL of a session PostgreSQL server with SCDRUGMAP_TEST_POSTGRES=1, else None."""
    if os.environ.get(POSTGRES_ENV) != "1":
        yield None
        return
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def db_url(postgres_url, tmp_path) -> Iterator[str]:
    """A database with no tables: a new SQLite file, or the session PostgreSQL emptied after the test."""
    if postgres_url is None:
        yield f"sqlite:///{tmp_path / 'web.db'}"
        return
    yield postgres_url
    from scdrugmap.web.db import Base, make_engine

    engine = make_engine(postgres_url)
    Base.metadata.drop_all(engine)
    engine.dispose()


# --- apps --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def bundle_root(tmp_path_factory) -> Path:
    """A bundle folder with one head trained on PCA embeddings of a tiny data set (logistic, instant)."""
    import scdrugmap as sdm

    root = tmp_path_factory.mktemp("bundles")
    sdm.tl.train(tiny_adata(seed=1), "pca", head="logistic").save(root / "pca-demo")
    return root


def make_results_store(run_dir: Path) -> Path:
    """Write a small results store: 3 models x 2 heads x 3 categories (7 values) x 3 folds; one fold skipped."""
    from scdrugmap.evaluate.store import ResultStore

    rng = np.random.default_rng(0)
    store = ResultStore(run_dir)
    values = {"tissue": ("Tumor tissue", "Cell line"), "regimen": ("anti-PD1", "erlotinib", "cisplatin"),
              "cancer_type": ("Melanoma", "Lung cancer")}
    quality = {"pca": 0.8, "hvg": 0.7, "majority": 0.5}
    for model, level in quality.items():
        for strategy, head in (("frozen", "mlp"), ("frozen", "logistic")):
            for category, names in values.items():
                for value in names:
                    for fold in range(3):
                        key = f"{model}|{strategy}|{head}|pooled|{category}|{value}|{fold}|sample"
                        skipped = model == "majority" and value == "erlotinib" and fold == 2
                        f1 = float(np.clip(level + rng.normal(0, 0.05), 0, 1))
                        store.write_job({
                            "key": key, "model": model, "strategy": strategy, "head": head, "scenario": "pooled",
                            "category": category, "value": value, "fold": str(fold), "split": "sample",
                            "status": "skipped" if skipped else "done", "n_train": 40, "n_test": 10,
                            "seconds": 0.1, "reasons": {"skipped": "one class"} if skipped else {},
                            "f1": float("nan") if skipped else f1, "auroc": float("nan") if skipped else f1 + 0.05,
                            "accuracy": 0.5, "precision": 0.5, "recall": 0.5})
    store.consolidate()
    (run_dir / "config.json").write_text('{"config": {"data": "tiny.h5ad", "folds": 3}}')
    return run_dir


@pytest.fixture(scope="session")
def results_dir(tmp_path_factory) -> Path:
    return make_results_store(tmp_path_factory.mktemp("run") / "tiny-run")


@pytest.fixture
def make_client(db_url, tmp_path, bundle_root) -> Iterator:
    """Build a TestClient (lifespan entered) on the test's database and folders; settings may be overridden."""
    from fastapi.testclient import TestClient

    from scdrugmap.web import Settings, create_app

    clients = []

    def build(**overrides):
        # jobs run in the test's process (monkeypatches reach them); tests of the job process ask for it
        # biomarkers are off unless a test asks for them: they would add seconds to every job of every test
        options = {"db_url": db_url, "data_dir": tmp_path / "web", "bundle_dir": bundle_root, "run_worker": False,
                   "projection": "pca", "job_isolation": "thread", "biomarkers": False, **overrides}
        client = TestClient(create_app(Settings(**options)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in reversed(clients):
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture(scope="session")
def good_h5ad() -> bytes:
    return h5ad_bytes(tiny_adata(seed=2))


def _upload(client, content: bytes, *, name: str = "cells.h5ad", content_type: str = "application/octet-stream"):
    return client.post("/api/jobs", files={"file": (name, io.BytesIO(content), content_type)})


def _wait_for(predicate, timeout: float = 20.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"not reached within {timeout}s")


@pytest.fixture
def upload():
    """``upload(client, content, name=..., content_type=...)`` posts a file to /api/jobs."""
    return _upload


@pytest.fixture
def wait_for():
    """``wait_for(predicate, timeout)`` polls until the predicate holds."""
    return _wait_for


@pytest.fixture
def adata_factory():
    """``adata_factory(n_cells=60, seed=0, labelled=True)`` builds a tiny AnnData."""
    return tiny_adata


@pytest.fixture
def to_h5ad():
    """``to_h5ad(adata)`` returns the bytes of ``adata`` written as .h5ad."""
    return h5ad_bytes
