"""One prediction job in its own process, under a memory limit: ``python -m scdrugmap.web.jobrun``.

The worker (`scdrugmap.web.worker.JobWorker`) starts this module for each job, so a job that needs
more memory than allowed, or crashes the interpreter, fails alone and never takes the server down.

Protocol: the job arrives as one JSON object on stdin (`run_prediction`'s arguments and
``memory_bytes``); the process first limits its own address space (``RLIMIT_AS``), then answers
with JSON lines on stdout: ``{"progress": [stage, fraction]}`` while it runs, and one outcome,
``{"done": summary}``, ``{"failed": message}``, ``{"memory": message}`` or ``{"crashed": traceback}``.
Anything a library prints goes to stderr (the server's log), never into the protocol.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback
from pathlib import Path
from typing import Any

#: Texts of errors that mean "out of memory" where Python raises something other than MemoryError.
OUT_OF_MEMORY_TEXTS = ("cannot allocate memory", "failed to map segment", "out of memory", "std::bad_alloc")


def memory_message(limit: int | None, *, likely: bool = False) -> str:
    """Say that a job needed more memory than one job may use, and what to do."""
    where = f" (each job may use {limit / 2**20:,.0f} MiB)" if limit else ""
    subject = "it most likely needed" if likely else "the prediction needed"
    return (f"{subject} more memory than this server allows one job{where}. Upload fewer cells (split the "
            "file), or ask the operator to raise job_memory_mb.")


def disk_message() -> str:
    return "the server's disk is full, so the results could not be written (nothing was kept); try again later."


def run(job: dict[str, Any], send) -> None:
    """Run one job and send its outcome through ``send(**message)``."""
    from scdrugmap.errors import ScDrugMapError, is_write_failure

    limit = job.get("memory_bytes")
    try:
        from scdrugmap.web.worker import run_prediction

        summary = run_prediction(Path(job["upload"]), Path(job["bundle"]), model=job["model"],
                                 weights=job.get("weights"), threshold=float(job["threshold"]),
                                 out_dir=Path(job["out_dir"]), projection=job["projection"],
                                 progress=lambda stage, fraction: send(progress=[stage, float(fraction)]),
                                 biomarkers=job.get("biomarkers"))
    except MemoryError:
        send(memory=memory_message(limit))
    except ScDrugMapError as err:
        send(failed=str(err))
    except (OSError, ImportError, RuntimeError) as err:
        text = str(err).lower()
        if isinstance(err, OSError) and is_write_failure(err):
            send(failed=disk_message())
        elif any(part in text for part in OUT_OF_MEMORY_TEXTS):
            send(memory=memory_message(limit))
        else:
            send(crashed="".join(traceback.format_exception(err)))
    except BaseException as err:  # reported to the worker, which logs it under a reference
        send(crashed="".join(traceback.format_exception(err)))
    else:
        send(done=summary)


def main() -> None:
    job = json.loads(sys.stdin.read())
    limit = job.get("memory_bytes")
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints of libraries go to stderr, never into the protocol

    def send(**message: Any) -> None:
        channel.write(json.dumps(message, default=str) + "\n")
        channel.flush()

    run(job, send)
    channel.close()


if __name__ == "__main__":
    main()
