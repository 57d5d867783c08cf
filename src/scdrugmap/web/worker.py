"""The job worker: runs queued predictions in background threads, outside any request.

Jobs live in the database, so they outlast the server. A worker claims a queued job with one
conditional UPDATE (``status='queued'`` -> ``running``, so two servers never run one job),
marks its running jobs alive every few seconds, and writes the outcome only while it still
owns the job. At start it resumes queued jobs and marks running jobs whose worker is gone (a
dead process on this host, or no heartbeat for ``stale_seconds``) as ``interrupted``; a
graceful stop marks its own unfinished jobs the same way. An interrupted job can be submitted
again from its page.

Each job runs in its own process (``python -m scdrugmap.web.jobrun``) under an address-space limit
(``Settings.job_memory_mb``), so a job that needs too much memory fails alone with a clear message.
Outputs are written into a partial folder and renamed into place only when every file is written:
a failed write leaves nothing. Every ``cleanup_seconds`` the worker deletes jobs older than the
retention time (their upload, outputs and uploaded bundle) and, over the disk quota, the oldest
finished or unsubmitted jobs first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sqlalchemy import delete, select, update

from scdrugmap.errors import ScDrugMapError, is_write_failure
from scdrugmap.report.projection import project_embedding
from scdrugmap.report.serialise import make_json_safe
from scdrugmap.web.bundles import bundle_folder
from scdrugmap.web.db import ACTIVE_STATES, HeadBundle, PredictionJob, utcnow
from scdrugmap.web.jobs import BIOMARKERS_DIR, PREDICTIONS_CSV, PREDICTIONS_H5AD, PREDICTIONS_PARQUET

if TYPE_CHECKING:
    from sqlalchemy.orm import sessionmaker

    from scdrugmap.web.settings import Settings
    from scdrugmap.web.storage import Storage

log = logging.getLogger(__name__)

INTERRUPTED_MESSAGE = ("the server stopped while this job ran, so it did not finish; submit it again to rerun it "
                       "from the start.")
#: Seconds between two progress writes of one job.
PROGRESS_INTERVAL = 0.5
#: Threads each job process may use for BLAS/OpenMP (unless the server's environment sets them).
JOB_THREADS = "4"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class JobFailed(ScDrugMapError):
    """A job process reported a failure the user can act on (its message is shown as it is)."""


class JobCrashed(RuntimeError):
    """A job process crashed on a bug; its traceback goes to the server's log only."""


class JobStopped(Exception):
    """The server stopped while the job's process ran; `JobWorker.stop` marks the job interrupted."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker_gone(worker_id: str | None) -> bool:
    """Return True when ``worker_id`` names a process of this host that no longer runs it."""
    if not worker_id:
        return True
    parts = worker_id.split("|")
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    host, pid = parts[0], int(parts[1])
    if host != socket.gethostname():
        return False
    return pid == os.getpid() or not _pid_alive(pid)


def find_biomarkers(adata: Any, head: Any, *, probability_key: str, threshold: float, weights: str | None,
                    out_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Find the genes that separate the job's predicted-resistant from its predicted-sensitive cells.

    Calls `scdrugmap.tl.biomarkers` on the job's own predictions (``obs[probability_key]`` at the job's
    ``threshold``): the Wilcoxon test, and pseudobulk DESeq2 with the sample as a blocking factor where
    the upload names samples (and holds counts); attribution and deletion of the head for the models in
    ``options["attribute_models"]``, bounded by ``max_cells`` and ``max_genes``. Writes the biomarker
    folder ``out_dir`` (`scdrugmap.tl.Biomarkers.write`).

    Returns
    -------
    The summary's ``biomarkers`` entry: ``status`` (``done``, ``skipped`` with the ``reason``), and when
    done the tests, the cells per group and ``seconds``.
    """
    import time

    from scdrugmap import tl
    from scdrugmap.data import schema

    start = time.perf_counter()
    probability = adata.obs[probability_key].to_numpy(dtype=np.float64)
    finite = probability[np.isfinite(probability)]
    counts = {"resistant": int((finite < threshold).sum()), "sensitive": int((finite >= threshold).sum())}
    if min(counts.values()) < 2:
        return {"status": "skipped", "reason": f"the head predicted {counts['resistant']} resistant and "
                f"{counts['sensitive']} sensitive cells; comparing them needs at least 2 of each."}
    has_samples = schema.SAMPLE in adata.obs
    found = tl.biomarkers(adata, head=head, probability_key=probability_key, threshold=threshold,
                          comparisons=["predicted"], sample_key=schema.SAMPLE if has_samples else None,
                          test="both" if has_samples else "wilcoxon", non_counts="wilcoxon",
                          gene_sets=options.get("gene_sets"), top_k=10, max_cells=int(options["max_cells"]),
                          max_genes=int(options["max_genes"]),
                          attribute=head.model in options.get("attribute_models", ()),
                          n_bootstrap=int(options["n_bootstrap"]), n_permutations=200, weights=weights,
                          device="auto", seed=0)
    found.write(out_dir)
    return {"status": "done", "tests": found.facts["tests"].get("predicted", []),
            "cells": found.facts["groups"]["predicted"]["cells"], "seconds": round(time.perf_counter() - start, 2)}


def run_prediction(upload_path: Path, bundle_path: Path, *, model: str, weights: str | None, threshold: float,
                   out_dir: Path, projection: str, progress: Any,
                   biomarkers: dict[str, Any] | None = None) -> dict[str, Any]:
    """Predict every cell of ``upload_path`` with the head in ``bundle_path`` (through `scdrugmap.tl.predict`).

    Writes ``predictions.parquet`` (cell, probability, prediction, x, y, sample, observed), ``predictions.csv``
    and ``predictions.h5ad`` (the upload with obs columns ``scdrugmap_<model>_prob_sensitive`` and
    ``scdrugmap_<model>_prediction``, obsm ``X_<model>`` and its 2-D view) into ``out_dir``, then, with
    ``biomarkers`` (`Settings.biomarker_options`), the biomarkers of the predicted groups into
    ``out_dir/biomarkers`` (`find_biomarkers`).

    Returns
    -------
    The summary shown on the results page (counts, mean probability, agreement with observed labels, and
    ``biomarkers``: done, skipped or failed with the reason; a failure there never fails the job).
    """
    from scdrugmap import read_head, tl
    from scdrugmap.data import schema
    from scdrugmap.data.gate import validate_input
    from scdrugmap.data.io import read_h5ad, write_h5ad_atomic

    progress("reading the data", 0.02)
    validate_input(upload_path)  # the gate, against this process's memory (its RLIMIT_AS included)
    adata = read_h5ad(upload_path)
    head = read_head(bundle_path)
    if head.model != model:
        msg = f"the head bundle was trained on {head.model} embeddings, not {model}; choose a {model} head."
        raise ScDrugMapError(msg)

    def embed_progress(done: int, total: int) -> None:
        progress("embedding cells", 0.1 + 0.6 * done / max(total, 1))

    progress("embedding and predicting", 0.1)
    key, basis = tl.prediction_key(model), tl.embedding_key(model)
    tl.predict(adata, head, weights=weights, threshold=threshold, embedding_key=basis, device="auto",
               progress=embed_progress)
    probability = adata.obs[tl.probability_column(key)].to_numpy(dtype=np.float32)
    embeddings = np.asarray(adata.obsm[basis]) if basis in adata.obsm else np.zeros((adata.n_obs, 0), np.float32)
    progress("projecting to 2-D", 0.8)
    xy, method = project_embedding(embeddings, method="auto" if projection == "umap" else "pca")  # "umap": PCA fallback
    progress("writing results", 0.9)
    prediction = adata.obs[tl.label_column(key)].astype(object).to_numpy()
    prediction[np.isnan(probability)] = None  # cells the model could not read
    frame = pd.DataFrame({"cell": adata.obs_names.astype(str), "probability": probability,
                          "prediction": pd.array(prediction, dtype="string"),
                          "set": pd.array(adata.obs[f"{key}_set"].astype(object).to_numpy(), dtype="string"),
                          "ood": adata.obs[f"{key}_ood"].to_numpy(dtype=bool),
                          "ood_score": adata.obs[f"{key}_ood_score"].to_numpy(dtype=np.float32),
                          "prob_raw": adata.obs[f"{key}_prob_raw"].to_numpy(dtype=np.float32),
                          "x": np.nan if xy is None else xy[:, 0], "y": np.nan if xy is None else xy[:, 1]})
    obs = adata.obs
    if schema.SAMPLE in obs:
        frame["sample"] = obs[schema.SAMPLE].astype(str).to_numpy()
    facts = adata.uns["scdrugmap"][key]
    summary: dict[str, Any] = {
        **tl.prediction_summary(adata, key, label_key=schema.RESPONSE),
        "projection": method, "embedding_dim": int(embeddings.shape[1]), "alpha": facts.get("alpha"),
        "gene_overlap": facts.get("gene_overlap"), "warnings": list(facts.get("warnings", [])),
    }
    if "scored" in summary:  # the page's "agreement with observed labels"
        frame["observed"] = np.where(schema.encode_labels(obs[schema.RESPONSE].to_numpy()) == 1, schema.SENSITIVE,
                                     schema.RESISTANT)
        summary["agreement"] = {k: v for k, v in summary["scored"].items() if k not in {"unit", "n"}}
        summary["agreement_notes"] = summary.pop("scored_notes", {})
    summary = make_json_safe(summary)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    frame.to_parquet(out_dir / PREDICTIONS_PARQUET, index=False)
    csv = frame.drop(columns=["x", "y"]).rename(columns={"probability": "prob_sensitive"})
    csv.to_csv(out_dir / PREDICTIONS_CSV, index=False)
    if basis in adata.obsm and not embeddings.shape[1]:
        del adata.obsm[basis]
    if xy is not None:
        adata.obsm[f"{basis}_{method}"] = xy
    write_h5ad_atomic(adata, out_dir / PREDICTIONS_H5AD)
    if biomarkers is not None:
        progress("finding biomarkers", 0.93)
        try:
            summary["biomarkers"] = find_biomarkers(adata, head, probability_key=tl.probability_column(key),
                                                    threshold=threshold, weights=weights,
                                                    out_dir=out_dir / BIOMARKERS_DIR, options=biomarkers)
        except ScDrugMapError as err:  # the predictions stand; the page says why there are no biomarkers
            log.warning("biomarkers of a job failed: %s", err)
            summary["biomarkers"] = {"status": "failed", "reason": str(err)}
        except (ValueError, RuntimeError, np.linalg.LinAlgError) as err:  # a numerical library gave up
            log.exception("biomarkers of a job stopped on an internal error")
            summary["biomarkers"] = {"status": "failed", "reason": f"the biomarker analysis stopped on an internal "
                                     f"error ({type(err).__name__}); the predictions are complete."}
    else:
        summary["biomarkers"] = {"status": "skipped", "reason": "this server does not look for biomarkers."}
    return make_json_safe(summary)


class JobWorker:
    """Runs queued jobs, at most ``settings.max_concurrent_jobs`` at once, in daemon threads."""

    def __init__(self, settings: Settings, sessions: sessionmaker, storage: Storage) -> None:
        self.settings = settings
        self.sessions = sessions
        self.storage = storage
        self.worker_id = f"{socket.gethostname()}|{os.getpid()}|{secrets.token_hex(4)}"
        self._running: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._last_beat = 0.0
        self._last_clean = 0.0
        self._processes: dict[int, subprocess.Popen] = {}

    # --- lifecycle -------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._loop_thread is not None and self._loop_thread.is_alive()

    def start(self) -> None:
        """Recover jobs left by a previous server, then poll for queued jobs in a background thread."""
        self.recover(at_start=True)
        self._stop.clear()
        self._loop_thread = threading.Thread(target=self._loop, name="scdrugmap-worker", daemon=True)
        self._loop_thread.start()
        log.info("worker started", extra={"worker": self.worker_id,
                                          "max_concurrent_jobs": self.settings.max_concurrent_jobs})

    def stop(self, timeout: float = 5.0) -> None:
        """Stop claiming jobs; jobs still running are marked interrupted (their threads die with the process)."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            processes = list(self._processes.values())
        for process in processes:  # the jobs' processes end with the server; their jobs read as interrupted
            self._kill(process)
        if self._loop_thread is not None:
            self._loop_thread.join(timeout)
        with self._lock:
            threads = list(self._running.values())
        for thread in threads:
            thread.join(max(0.0, timeout / max(1, len(threads))))
        with self.sessions() as session:
            result = session.execute(
                update(PredictionJob)
                .where(PredictionJob.status == "running", PredictionJob.worker_id == self.worker_id)
                .values(status="interrupted", message=INTERRUPTED_MESSAGE, finished_at=utcnow(), stage="interrupted"))
            session.commit()
        if result.rowcount:
            log.warning("stopped with jobs running; marked interrupted", extra={"jobs": result.rowcount})
        log.info("worker stopped", extra={"worker": self.worker_id})

    def wake(self) -> None:
        """Look for queued jobs now rather than at the next poll."""
        self._wake.set()

    def recover(self, *, at_start: bool = False) -> int:
        """Mark running jobs whose worker is gone as interrupted; return how many."""
        cutoff = utcnow().timestamp() - self.settings.stale_seconds
        marked = 0
        with self.sessions() as session:
            for job in session.scalars(select(PredictionJob).where(PredictionJob.status == "running")).all():
                if job.worker_id == self.worker_id:
                    continue
                beat = job.heartbeat_at or job.started_at
                stale = beat is None or beat.timestamp() < cutoff
                if stale or (at_start and _worker_gone(job.worker_id)):
                    result = session.execute(
                        update(PredictionJob)
                        .where(PredictionJob.id == job.id, PredictionJob.status == "running",
                               PredictionJob.worker_id == job.worker_id)
                        .values(status="interrupted", message=INTERRUPTED_MESSAGE, finished_at=utcnow(),
                                stage="interrupted"))
                    marked += result.rowcount
            session.commit()
        if marked:
            log.warning("marked interrupted jobs", extra={"jobs": marked})
        return marked

    # --- claiming and running --------------------------------------------------------------------------

    def claim(self) -> int | None:
        """Take the oldest queued job for this worker; return its id, or None when none is waiting."""
        with self.sessions() as session:
            candidates = session.scalars(select(PredictionJob.id).where(PredictionJob.status == "queued")
                                         .order_by(PredictionJob.queued_at, PredictionJob.id).limit(5)).all()
            for job_id in candidates:
                now = utcnow()
                result = session.execute(
                    update(PredictionJob).where(PredictionJob.id == job_id, PredictionJob.status == "queued")
                    .values(status="running", worker_id=self.worker_id, started_at=now, heartbeat_at=now,
                            stage="starting", progress=0.0))
                session.commit()
                if result.rowcount == 1:
                    return job_id
        return None

    def run_pending(self) -> int:
        """Run queued jobs one after another in this thread until none is left; return how many ran."""
        count = 0
        while (job_id := self.claim()) is not None:
            self.execute(job_id)
            count += 1
        return count

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # a database hiccup must not end the worker
                log.exception("worker loop error")
            self._wake.wait(self.settings.poll_seconds)
            self._wake.clear()

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= self.settings.heartbeat_seconds:
            self._last_beat = now
            self._beat()
            self.recover()
        if now - self._last_clean >= self.settings.cleanup_seconds:
            self.clean()
        while not self._stop.is_set():
            with self._lock:
                self._running = {k: t for k, t in self._running.items() if t.is_alive()}
                if len(self._running) >= self.settings.max_concurrent_jobs:
                    return
            job_id = self.claim()
            if job_id is None:
                return
            thread = threading.Thread(target=self.execute, args=(job_id,), name=f"scdrugmap-job-{job_id}",
                                      daemon=True)
            with self._lock:
                self._running[job_id] = thread
            thread.start()

    def _beat(self) -> None:
        with self._lock:
            ids = list(self._running)
        if not ids:
            return
        with self.sessions() as session:
            session.execute(update(PredictionJob).where(PredictionJob.id.in_(ids), PredictionJob.status == "running",
                                                        PredictionJob.worker_id == self.worker_id)
                            .values(heartbeat_at=utcnow()))
            session.commit()

    def _update(self, job_id: int, **values: Any) -> bool:
        """Write ``values`` to a job this worker still runs; return False when it no longer owns it."""
        with self.sessions() as session:
            result = session.execute(update(PredictionJob)
                                     .where(PredictionJob.id == job_id, PredictionJob.status == "running",
                                            PredictionJob.worker_id == self.worker_id)
                                     .values(heartbeat_at=utcnow(), **values))
            session.commit()
        return result.rowcount == 1

    def execute(self, job_id: int) -> None:
        """Run one claimed job and store its outcome: done with a summary, or failed with a message."""
        with self.sessions() as session:
            job = session.get(PredictionJob, job_id)
            bundle = session.get(HeadBundle, job.bundle_id) if job and job.bundle_id else None
        if job is None or job.status != "running" or job.worker_id != self.worker_id:
            return
        start = time.perf_counter()
        last = [0.0]

        def progress(stage: str, fraction: float) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_INTERVAL or fraction >= 0.9:
                last[0] = now
                self._update(job_id, stage=stage, progress=min(max(fraction, 0.0), 0.99))

        upload_path = self.storage.upload_path(job.upload_name)
        output_name = self.storage.new_name()
        hidden: list[str] = [str(upload_path)]
        try:
            if bundle is None or not bundle.available:
                raise ScDrugMapError("the head bundle of this job is no longer available; choose another one.")
            bundle_path = bundle_folder(bundle, self.storage)
            hidden.append(str(bundle_path))
            log.info("job started", extra={"job": job_id, "model": job.model, "cells": job.n_cells,
                                           "isolation": self.settings.job_isolation})
            arguments = {"upload": str(upload_path), "bundle": str(bundle_path), "model": str(job.model),
                         "weights": self.settings.weights.get(str(job.model)), "threshold": job.threshold,
                         "out_dir": str(self.storage.partial_output_dir(output_name)),
                         "projection": self.settings.projection,
                         "biomarkers": self.settings.biomarker_options()}
            if self.settings.job_isolation == "process":
                summary = self._run_in_process(job_id, arguments, progress)
            else:
                summary = run_prediction(upload_path, bundle_path, model=arguments["model"],
                                         weights=arguments["weights"], threshold=job.threshold,
                                         out_dir=Path(arguments["out_dir"]), projection=arguments["projection"],
                                         progress=progress, biomarkers=arguments["biomarkers"])
            self.storage.publish_output(output_name)
        except JobStopped:
            self.storage.remove_output(output_name)
            return  # stop() marks the job interrupted
        except ScDrugMapError as err:
            self.storage.remove_output(output_name)
            message = str(err)
            for secret in sorted(hidden, key=len, reverse=True):
                message = message.replace(secret, job.display_name if secret == hidden[0] else "the head bundle")
            self._update(job_id, status="failed", message=message, stage="failed", finished_at=utcnow())
            log.warning("job failed", extra={"job": job_id, "error": message})
            return
        except OSError as err:
            self.storage.remove_output(output_name)
            if not is_write_failure(err):
                self._crashed(job_id, err)
                return
            from scdrugmap.web.jobrun import disk_message

            self._update(job_id, status="failed", message=disk_message(), stage="failed", finished_at=utcnow())
            log.error("job failed: disk full or not writable", extra={"job": job_id, "error": str(err)})
            return
        except Exception as err:
            self.storage.remove_output(output_name)
            self._crashed(job_id, err)
            return
        summary["seconds"] = round(time.perf_counter() - start, 2)
        if self._update(job_id, status="done", stage="done", progress=1.0, summary=summary, output_name=output_name,
                        finished_at=utcnow()):
            log.info("job done", extra={"job": job_id, "seconds": summary["seconds"]})
        else:  # the job was taken away (interrupted, expired): its outputs belong to nobody
            self.storage.remove_output(output_name)

    def _crashed(self, job_id: int, err: BaseException) -> None:
        reference = secrets.token_hex(4)
        log.error("job crashed", exc_info=err, extra={"job": job_id, "reference": reference})
        self._update(job_id, status="failed", stage="failed", finished_at=utcnow(),
                     message=f"the prediction stopped on an internal error (reference {reference}); "
                             "the server's log has the details.")

    # --- one job, one process --------------------------------------------------------------------------

    def _run_in_process(self, job_id: int, arguments: dict[str, Any], progress: Any) -> dict[str, Any]:
        """Run a job in ``python -m scdrugmap.web.jobrun`` under the memory limit; return its summary.

        Raises
        ------
        JobFailed
            With the message to show: the job's own failure, memory, the time limit, or a process
            that ended without an answer.
        JobCrashed
            When the job hit a bug (the child's traceback is in the message, for the log).
        """
        import scdrugmap

        limit = self.settings.job_memory_bytes
        env = dict(os.environ)
        for name in THREAD_VARIABLES:
            env.setdefault(name, JOB_THREADS)
        package_root = str(Path(scdrugmap.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        process = subprocess.Popen([sys.executable, "-m", "scdrugmap.web.jobrun"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=None, env=env, text=True,
                                   start_new_session=True)
        with self._lock:
            self._processes[job_id] = process
        timed_out = threading.Event()

        def stop_it() -> None:
            timed_out.set()
            self._kill(process)

        timer = threading.Timer(self.settings.job_timeout_seconds, stop_it)
        timer.daemon = True
        timer.start()
        outcome: dict[str, Any] | None = None
        try:
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(json.dumps({**arguments, "memory_bytes": limit}))
            process.stdin.close()
            for line in process.stdout:
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "progress" in message:
                    stage, fraction = message["progress"]
                    progress(str(stage), float(fraction))
                else:
                    outcome = message
            process.wait()
        finally:
            timer.cancel()
            with self._lock:
                self._processes.pop(job_id, None)
            if process.poll() is None:
                self._kill(process)
        if outcome is None:
            from scdrugmap.web.jobrun import memory_message

            if timed_out.is_set():
                hours = self.settings.job_timeout_seconds / 3600
                raise JobFailed(f"the prediction took longer than this server allows one job ({hours:g} h) and "
                                "was stopped. Upload fewer cells.")
            if self._stop.is_set():
                raise JobStopped
            code = process.returncode
            name = signal.Signals(-code).name if code is not None and code < 0 else f"exit code {code}"
            log.error("job process ended without an answer", extra={"job": job_id, "returncode": code})
            raise JobFailed(f"the prediction process ended without an answer ({name}): "
                            + memory_message(limit, likely=True))
        if "done" in outcome:
            return dict(outcome["done"])
        if "crashed" in outcome:
            raise JobCrashed(f"the job process crashed:\n{outcome['crashed']}")
        raise JobFailed(str(outcome.get("failed") or outcome.get("memory")))

    @staticmethod
    def _kill(process: subprocess.Popen) -> None:
        """Kill a job's process group (the job and anything it started)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    # --- retention and quota ---------------------------------------------------------------------------

    def remove_job(self, session: Any, job: PredictionJob) -> None:
        """Delete a job's upload, outputs and uploaded bundle, then the job itself (its token reads as unknown)."""
        for bundle in session.scalars(select(HeadBundle).where(HeadBundle.owner_job_id == job.id,
                                                               HeadBundle.public.is_(False))).all():
            self.storage.remove_bundle(bundle.location)
            session.delete(bundle)
        self.storage.remove_upload(job.upload_name)
        self.storage.remove_output(job.output_name)
        session.execute(delete(PredictionJob).where(PredictionJob.id == job.id))

    def clean(self) -> dict[str, int]:
        """Apply retention and the disk quota: delete expired jobs, then the oldest idle ones while over quota.

        Jobs queued or running are never removed. Stale staging files and partial outputs go too.

        Returns
        -------
        ``{"expired": n, "over_quota": n, "stale_files": n}``.
        """
        counts = {"expired": 0, "over_quota": 0, "stale_files": 0}
        cutoff = utcnow() - timedelta(hours=self.settings.retention_hours)
        with self.sessions() as session:
            expired = session.scalars(select(PredictionJob).where(PredictionJob.created_at < cutoff,
                                                                  PredictionJob.status.not_in(ACTIVE_STATES))).all()
            for job in expired:
                self.remove_job(session, job)
                counts["expired"] += 1
            session.commit()
            quota = self.settings.disk_quota_mb * 2**20
            if self.storage.usage_bytes() > quota:
                idle = session.scalars(select(PredictionJob).where(PredictionJob.status.not_in(ACTIVE_STATES))
                                       .order_by(PredictionJob.created_at, PredictionJob.id)).all()
                for job in idle:
                    if self.storage.usage_bytes() <= quota:
                        break
                    self.remove_job(session, job)
                    session.commit()
                    counts["over_quota"] += 1
        with self._lock:
            running = set(self._running)
        with self.sessions() as session:
            keep = {str(name) for name in session.scalars(select(PredictionJob.output_name)
                                                          .where(PredictionJob.id.in_(running)))}
        counts["stale_files"] = self.storage.clean_stale(keep=keep)
        if any(counts.values()):
            log.info("cleaned storage", extra=counts)
        self._last_clean = time.monotonic()
        return counts
