"""Where the benchmark grid's work runs: here, one unit after another, or as Ray tasks on a cluster.

The runner plans the grid, prepares each model's inputs once (`ModelInputs`: embeddings for frozen
heads, tokens for LoRA) and hands the executor units of work (`Unit`); the executor gives back one
`UnitOutcome` per unit as units finish, and the runner stores their jobs. Both executors call the
same `compute_unit`, so a grid gives the same results wherever it runs, and since only the runner
writes the store, a grid begun on one executor can be finished on the other.

A unit is the folds of one category value for frozen heads (they train as one batched network:
splitting them would change their initial weights and cost a pass over the data per fold) and one
job for LoRA. On Ray each unit is one task with ``--cpus-per-job`` / ``--gpus-per-job``; a task
whose worker dies is rerun (`scdrugmap.cluster.TASK_RETRIES`) and its jobs are written once, when a
run of it returns.
"""

from __future__ import annotations

import logging
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from scdrugmap import cluster
from scdrugmap.errors import ConfigError, ScDrugMapError

if TYPE_CHECKING:
    import numpy.typing as npt

    from scdrugmap.evaluate.grid import Job
    from scdrugmap.models.base import Encoder, TokenizedCells, TorchEncoder
    from scdrugmap.models.cache import EmbeddingFile
    from scdrugmap.models.sharded import EncoderSpec
    from scdrugmap.train.heads import HeadConfig
    from scdrugmap.train.lora import LoRAConfig

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
FoldSet = tuple["npt.NDArray[np.int64]", "npt.NDArray[np.int64]"]


@dataclass
class Unit:
    """Jobs computed together: the folds of one category value (frozen), or one LoRA job."""

    jobs: list[Job]
    fold_sets: list[FoldSet]

    @property
    def name(self) -> str:
        return self.jobs[0].key if len(self.jobs) == 1 else "|".join(self.jobs[0].group)


@dataclass
class ModelInputs:
    """What every unit of one model needs, prepared once per model and shipped once to a cluster.

    ``encoder`` is the loaded model when units run in this process; Ray workers load it from ``spec``.
    """

    model: str
    labels: npt.NDArray
    groups: npt.NDArray | None
    head_config: HeadConfig
    device: str
    embeddings: npt.NDArray[np.float32] | EmbeddingFile | None = None
    spec: EncoderSpec | None = None
    tokens: TokenizedCells | None = None
    lora_config: LoRAConfig | None = None
    encoder: Encoder | None = None


@dataclass
class UnitOutcome:
    """A unit's result: per-job ``(probability, info)`` when done, else the reason it was not scored."""

    status: Literal["done", "skipped", "failed"]
    predictions: list[tuple[npt.NDArray[np.float32], dict[str, Any]]] | None = None
    reason: str = ""
    seconds: float = 0.0


class NotApplicable(Exception):
    """A strategy does not apply to a model (e.g. LoRA on PCA); its jobs are stored as skipped."""


def compute_unit(inputs: ModelInputs, unit: Unit) -> UnitOutcome:
    """Train and predict the jobs of ``unit``; failures become outcomes, never exceptions."""
    start = time.perf_counter()
    strategy = unit.jobs[0].strategy
    try:
        if strategy == "frozen":
            predictions = _frozen(inputs, unit)
        elif strategy == "lora":
            predictions = _lora(inputs, unit)
        else:
            msg = f"strategy {strategy!r} does not run in an executor"
            raise ConfigError(msg)
    except NotApplicable as reason:
        return UnitOutcome("skipped", reason=str(reason))
    except (ScDrugMapError, ValueError, RuntimeError) as err:
        log.error("jobs of %s failed: %s", unit.name, err)
        return UnitOutcome("failed", reason="".join(traceback.format_exception(err)),
                           seconds=time.perf_counter() - start)
    return UnitOutcome("done", predictions=predictions, seconds=time.perf_counter() - start)


def _frozen(inputs: ModelInputs, unit: Unit) -> list[tuple[np.ndarray, dict[str, Any]]]:
    from scdrugmap.models.base import resolve_device
    from scdrugmap.train.frozen import fit_predict_frozen

    assert inputs.embeddings is not None  # the runner embeds every model that has frozen jobs
    # the paper's cell-level split holds out random cells for early stopping too; the other splits whole samples
    groups = None if unit.jobs[0].fold.split == "cell" else inputs.groups
    # an EmbeddingFile (the runner's cache, on one machine) stays on disk: training reads each batch's rows
    with warnings.catch_warnings():  # arrays from Ray's object store are read-only; heads never write to them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        predicted = fit_predict_frozen(inputs.embeddings, inputs.labels, groups, unit.fold_sets,
                                       head=unit.jobs[0].head, config=inputs.head_config,
                                       device=resolve_device(inputs.device))
    return [(p.probability, p.info) for p in predicted]


def _lora(inputs: ModelInputs, unit: Unit) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Fine-tune LoRA adapters per fold on the model's tokens (tokenized once per model)."""
    from scdrugmap.train.lora import fit_predict_lora

    if inputs.tokens is None:
        msg = f"{inputs.model} has no network to adapt; LoRA applies to foundation models"
        raise NotApplicable(msg)
    if inputs.encoder is not None:
        loaded = inputs.encoder
    else:
        assert inputs.spec is not None  # the runner gives every model's inputs its spec
        loaded = inputs.spec.load()
    # tokens are only made for a TorchEncoder (`scdrugmap.evaluate.runner._prepare_model`)
    encoder = cast("TorchEncoder", loaded)
    if encoder.bfloat16_mode == "autocast":  # --dtype sets the frozen strategy's embeddings: LoRA trains as before
        encoder.use_dtype("auto")  # (a language model loaded in bfloat16 stays so: its float32 weights are gone)
    tokens = inputs.tokens
    position = np.full(inputs.labels.shape[0], -1, dtype=np.int64)
    position[tokens.cell_index] = np.arange(tokens.n_cells)
    cell_split = unit.jobs[0].fold.split == "cell"  # early stopping on random cells, as the paper's cell-level split
    token_groups = None if inputs.groups is None or cell_split else inputs.groups[tokens.cell_index]
    token_folds = [(position[train][position[train] >= 0], position[test][position[test] >= 0])
                   for train, test in unit.fold_sets]
    fitted = fit_predict_lora(encoder, tokens, inputs.labels[tokens.cell_index], token_groups, token_folds,
                              inputs.lora_config)
    results = []
    for (_, test), (probability, info) in zip(unit.fold_sets, fitted, strict=True):
        full = np.full(test.size, np.nan, dtype=np.float32)  # cells the model could not tokenize stay missing
        full[position[test] >= 0] = probability
        results.append((full, info))
    return results


class LocalExecutor:
    """Run units in this process, one after another, in the order given."""

    name = "local"

    def __init__(self) -> None:
        self._queue: list[tuple[ModelInputs, Unit]] = []

    def share(self, inputs: ModelInputs) -> ModelInputs:
        return inputs

    def submit(self, shared: ModelInputs, unit: Unit) -> None:
        self._queue.append((shared, unit))

    def finished(self, *, wait: bool) -> Iterator[tuple[Unit, UnitOutcome]]:
        """Run the queued units and yield each outcome as soon as it is known."""
        while self._queue:
            inputs, unit = self._queue.pop(0)
            yield unit, compute_unit(inputs, unit)


def _compute_unit_task(inputs: ModelInputs, unit: Unit) -> UnitOutcome:
    """`compute_unit` inside a Ray task, with torch using the CPUs the task was given."""
    import torch

    torch.set_num_threads(cluster.task_threads())
    return compute_unit(inputs, unit)


class RayExecutor:
    """Run each unit as a Ray task with its resource request; outcomes stream back as tasks finish."""

    name = "ray"

    def __init__(self, address: str | None = None, resources: cluster.Resources | None = None) -> None:
        self.resources = resources or cluster.Resources()
        cluster.connect(address)
        self._running: dict[Any, Unit] = {}

    def share(self, inputs: ModelInputs) -> Any:
        """Put a model's inputs in the object store once; its units' tasks all read that copy."""
        return cluster.put(replace(inputs, encoder=None))  # workers load the model from inputs.spec

    def submit(self, shared: Any, unit: Unit) -> None:
        ref = cluster.submit(_compute_unit_task, shared, unit, resources=self.resources, name=unit.name[:120])
        self._running[ref] = unit

    def finished(self, *, wait: bool) -> Iterator[tuple[Unit, UnitOutcome]]:
        """Yield outcomes of finished tasks: all of them when ``wait``, else those done by now."""
        for ref, outcome in cluster.as_completed(list(self._running), wait=wait):
            unit = self._running.pop(ref)
            if isinstance(outcome, BaseException):  # the worker died on every try
                log.error("task %s failed on the cluster: %s", unit.name, outcome)
                outcome = UnitOutcome("failed", reason=f"the Ray task failed after {cluster.TASK_RETRIES} "
                                                       f"retries: {outcome}")
            yield unit, outcome


def make_executor(name: str, *, address: str | None = None, cpus_per_job: float = 1.0,
                  gpus_per_job: float = 0.0) -> LocalExecutor | RayExecutor:
    """Return the executor called ``name`` (``local`` or ``ray``)."""
    if name == "local":
        if address:
            msg = "--ray-address only applies with --executor ray."
            raise ConfigError(msg)
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, cluster.Resources(cpus=cpus_per_job, gpus=gpus_per_job))
    msg = f"--executor {name} is not available; choose from {', '.join(EXECUTORS)}."
    raise ConfigError(msg)
