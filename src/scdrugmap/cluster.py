"""Ray, behind the few calls the benchmark and the sharded embedding need.

Ray is an optional extra (``pip install "scdrugmap[ray]"``): nothing here imports it until a
Ray executor is asked for, and then a missing install is one clear error. Work is shipped as
plain functions of picklable arguments; large arrays travel once through the object store
(`put`) and tasks read them zero-copy.

Workers see the driver's ``SCDRUGMAP_*`` and Hugging Face cache settings (passed as the job's
runtime environment), so the weights and embedding caches are the same folders on every node:
on a multi-node cluster, point ``SCDRUGMAP_HOME`` at storage every node mounts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from scdrugmap.errors import ConfigError

log = logging.getLogger(__name__)

#: Environment variables a worker must share with the driver (caches, offline mode, tokens).
SHARED_ENVIRONMENT = ("SCDRUGMAP_HOME", "SCDRUGMAP_OFFLINE", "HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN",
                      "TRANSFORMERS_OFFLINE")
#: How often Ray reruns a task whose worker process died (the job is recorded once, when one run returns).
TASK_RETRIES = 2


def require_ray() -> Any:
    """Import Ray, or say how to install it."""
    try:
        import ray
    except ImportError:
        msg = ('--executor ray needs Ray, which is an optional extra: pip install "scdrugmap[ray]" '
               "(or use --executor local).")
        raise ConfigError(msg) from None
    return ray


@dataclass(frozen=True)
class Resources:
    """What one task asks the cluster for."""

    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.cpus <= 0 or self.gpus < 0:
            msg = f"--cpus-per-job {self.cpus} / --gpus-per-job {self.gpus}: CPUs must be > 0 and GPUs >= 0."
            raise ConfigError(msg)


def connect(address: str | None = None) -> Any:
    """Connect to the Ray cluster at ``address`` (``auto``, ``HOST:PORT``, ``ray://...``), or start one here.

    A second call with the same address and environment reuses the connection; a different one
    reconnects, so workers never read another run's caches. Returns the ``ray`` module.
    """
    ray = require_ray()
    env = {name: os.environ[name] for name in SHARED_ENVIRONMENT if name in os.environ}
    wanted = (address or None, tuple(sorted(env.items())))
    if ray.is_initialized():
        if _CONNECTED.get("to") == wanted:
            return ray
        ray.shutdown()
    options = {} if address else {"include_dashboard": False}  # only a new cluster takes node settings
    try:
        ray.init(address=address or None, runtime_env={"env_vars": env} if env else None,
                 logging_level=logging.WARNING, **options)
    except Exception as err:  # Ray raises ConnectionError, RuntimeError, ValueError or its AuthenticationError
        where = address or "a new local cluster"
        hint = ("the cluster asks for its token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or the token file "
                "~/.ray/auth_token)" if "auth" in str(err).lower() else
                "start one with `ray start --head` or check --ray-address")
        msg = f"could not connect to Ray at {where}: {str(err).splitlines()[0]}. {hint[0].upper()}{hint[1:]}."
        raise ConfigError(msg) from err
    _CONNECTED["to"] = wanted
    resources = ray.cluster_resources()
    log.info("connected to Ray at %s: %s CPUs, %s GPUs", address or "a new local cluster",
             resources.get("CPU", 0), resources.get("GPU", 0))
    return ray


_CONNECTED: dict[str, Any] = {}


def put(value: Any) -> Any:
    """Store ``value`` once in the object store and return its reference (tasks receive it zero-copy)."""
    return require_ray().put(value)


def submit(function: Callable[..., Any], *args: Any, resources: Resources, name: str,
           retries: int = TASK_RETRIES) -> Any:
    """Run ``function(*args)`` as a Ray task with ``resources``; return its reference.

    A task whose worker dies is rerun up to ``retries`` times; an exception raised by ``function``
    itself is not retried (it is an answer, not a crash).
    """
    ray = require_ray()
    remote = ray.remote(function).options(num_cpus=resources.cpus, num_gpus=resources.gpus, name=name,
                                          max_retries=retries, retry_exceptions=False)
    return remote.remote(*args)


def as_completed(refs: Iterable[Any], *, wait: bool = True) -> Iterator[tuple[Any, Any]]:
    """Yield ``(ref, result)`` as tasks finish; a result is the task's exception when it failed for good.

    With ``wait=False``, stop at the first moment no further task has finished instead of waiting.
    """
    ray = require_ray()
    waiting = list(refs)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1, timeout=None if wait else 0)
        if not ready:
            return
        for ref in ready:
            try:
                yield ref, ray.get(ref)
            except ray.exceptions.RayError as err:
                yield ref, err


def task_threads() -> int:
    """Return the CPUs Ray gave the current task (torch should use that many threads)."""
    ray = require_ray()
    try:
        assigned = ray.get_runtime_context().get_assigned_resources()
    except Exception:  # noqa: BLE001 - outside a task
        return os.cpu_count() or 1
    return max(1, int(assigned.get("CPU", 1)))
