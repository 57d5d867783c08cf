"""The benchmark grid: its settings, its jobs (model x strategy x head x fold) and its folds.

`BenchmarkConfig` is everything that defines a run; `BenchmarkConfig.resolve` is the one place where
command-line flags, a YAML file and the defaults are merged. `make_folds` turns a config and the
data into the folds every model shares, and each `Job` of the grid has a stable key. Nothing here
trains, embeds or touches a run folder: the runner does that (`scdrugmap.evaluate.runner`), through
the store (`scdrugmap.evaluate.store`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scdrugmap.data import schema
from scdrugmap.errors import ConfigError
from scdrugmap.evaluate.splits import Fold, split_cross_study, split_pooled
from scdrugmap.train.heads import HeadConfig

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

log = logging.getLogger(__name__)

STRATEGIES = ("frozen", "lora", "prompt")
SCENARIOS = ("pooled", "cross")
DEFAULT_MODELS = ("pca", "minilm", "majority")
DEMO_CELLS = 1500
DEMO_GENES = 2000
#: Settings that hold a table of options: a flag changes its entries, not the whole table.
NESTED_SETTINGS = ("prompt", "lora")
#: Where runs go when no ``out`` is given: ``<RUNS_DIR>/<data file stem>`` (``demo`` for the simulator).
RUNS_DIR = "scdrugmap-runs"


@dataclass
class BenchmarkConfig:
    """Everything that defines a benchmark run (kept with the run, see `scdrugmap.evaluate.store`)."""

    data: str = "demo"
    out: str = "scdrugmap-runs/demo"
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    strategies: list[str] = field(default_factory=lambda: ["frozen"])
    heads: list[str] = field(default_factory=lambda: ["mlp"])
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    categories: list[str] = field(default_factory=lambda: list(schema.CATEGORY_KINDS))
    splits: list[str] = field(default_factory=lambda: ["sample"])
    folds: int = 10
    seed: int = 0
    permutations: int = 0
    layer: str | None = None
    batch_size: int | None = None
    device: str = "auto"
    executor: str = "local"
    ray_address: str | None = None
    cpus_per_job: float = 1.0
    gpus_per_job: float = 0.0
    shard_cells: int = 20_000
    demo_cells: int = DEMO_CELLS
    demo_genes: int = DEMO_GENES
    weights: dict[str, str] = field(default_factory=dict)
    model_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    head: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    prompt: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def resolve(cls, config_path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                keys: Mapping[str, str] | None = None) -> BenchmarkConfig:
        """Return the settings of a run: command-line flags over the YAML file over the defaults.

        This is the only place where the three are merged.

        Parameters
        ----------
        config_path
            A YAML file of settings (the field names of `BenchmarkConfig`), or None.
        overrides
            Settings given on the command line; None means "not given" and leaves the file's value
            (or the default). ``prompt`` and ``lora`` are tables: their given entries replace the
            file's entries one by one, the others are kept.
        keys
            Obs column names by contract field (``response``, ``sample``, ...); only names that differ
            from the contract's own are kept, and they replace the file's.

        Returns
        -------
        The merged config. ``out`` defaults to ``scdrugmap-runs/<data file stem>`` (``.../demo`` for
        the simulated collection). It is not validated yet (`validate`, called by the runner).

        Raises
        ------
        ConfigError
            When the file is missing or holds a setting that is not a field.

        Examples
        --------
        >>> config = BenchmarkConfig.resolve(overrides={"data": "cells.h5ad", "folds": 5, "seed": None})
        >>> config.out, config.folds, config.seed
        ('scdrugmap-runs/cells', 5, 0)
        """
        values: dict[str, Any] = {}
        if config_path is not None:
            values = _read_yaml(Path(config_path), known={f.name for f in dataclasses.fields(cls)})
        for name, value in (overrides or {}).items():
            if name in NESTED_SETTINGS:
                given = {k: v for k, v in (value or {}).items() if v is not None}
                if given:
                    values[name] = {**values.get(name, {}), **given}
            elif value is not None:
                values[name] = value
        contract = dataclasses.asdict(schema.ObsKeys())  # only changed column names are kept
        values.setdefault("keys", {})
        values["keys"].update({k: v for k, v in (keys or {}).items() if v != contract[k]})
        if "out" not in values:
            stem = "demo" if values.get("data", "demo") == "demo" else Path(values["data"]).stem
            values["out"] = str(Path(RUNS_DIR) / stem)
        return cls(**values)

    def obs_keys(self) -> schema.ObsKeys:
        return schema.ObsKeys(**self.keys)

    def head_config(self) -> HeadConfig:
        return HeadConfig(**{"seed": self.seed, **self.head})

    def lora_config(self):
        from scdrugmap.train.lora import LoRAConfig

        return LoRAConfig(**{"seed": self.seed, **self.lora})

    def prompt_config(self):
        from scdrugmap.prompting import PromptConfig

        return PromptConfig.from_dict({"seed": self.seed, "layer": self.layer, **self.prompt})

    def validate(self) -> None:
        """Refuse unknown strategies, scenarios, categories or split policies, naming the allowed ones."""
        checks = (("strategies", self.strategies, STRATEGIES), ("scenarios", self.scenarios, SCENARIOS),
                  ("categories", self.categories, schema.CATEGORY_KINDS), ("splits", self.splits, ("sample", "cell")),
                  ("heads", self.heads, ("mlp", "logistic")))
        for name, chosen, allowed in checks:
            unknown = [c for c in chosen if c not in allowed]
            if unknown:
                msg = f"--{name} {','.join(unknown)} is not available; choose from {', '.join(allowed)}."
                raise ConfigError(msg)
        if self.permutations < 0:
            msg = f"--permutations {self.permutations}: give 0 (no null) or a positive number of permutations."
            raise ConfigError(msg)
        if self.folds < 2:
            msg = f"--folds {self.folds}: need at least 2 folds."
            raise ConfigError(msg)


def _read_yaml(path: Path, *, known: set[str]) -> dict[str, Any]:
    """Return the settings of a YAML run config, refusing names that are not settings."""
    import yaml

    if not path.exists():
        msg = f"{path}: no such config file."
        raise ConfigError(msg)
    values = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(values) - known)
    if unknown:
        msg = f"{path}: unknown settings {unknown}; allowed: {sorted(known)}."
        raise ConfigError(msg)
    return values


@dataclass(frozen=True)
class Job:
    """One cell of the grid: a model and strategy evaluated on one fold."""

    model: str
    strategy: str
    head: str
    fold: Fold

    @property
    def key(self) -> str:
        return f"{self.model}|{self.strategy}|{self.head}|{self.fold.key}"

    @property
    def group(self) -> tuple[str, ...]:
        """Jobs sharing a group train together (the folds of one category value)."""
        f = self.fold
        return (self.model, self.strategy, self.head, f.scenario, f.category, f.value, f.split)


def data_file(config: BenchmarkConfig) -> Path:
    """Return the benchmark's data file: ``config.data``, or the simulated demo collection (made once)."""
    if config.data != "demo":
        path = Path(config.data)
        if not path.exists():
            msg = f"--data {config.data}: no such file. Pass an .h5ad path, or demo for the simulated collection."
            raise ConfigError(msg)
        return path
    from scdrugmap import config as paths
    from scdrugmap.data.simulate import simulate_collection

    path = paths.home_dir() / "demo" / f"demo-{config.demo_cells}x{config.demo_genes}-seed{config.seed}.h5ad"
    if not path.exists():
        log.info("simulating the demo collection (%d cells x %d genes) into %s", config.demo_cells,
                 config.demo_genes, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        simulate_collection(n_cells=config.demo_cells, n_genes=config.demo_genes, seed=config.seed, out_path=path)
    return path


def make_folds(adata: ad.AnnData, labels: np.ndarray, config: BenchmarkConfig,
               saved: Mapping[str, npt.NDArray[np.int8]] | None = None
               ) -> tuple[list[Fold], dict[str, npt.NDArray[np.int8]]]:
    """Return every fold of the run, and the pooled fold assignments it made anew.

    Parameters
    ----------
    adata, labels
        The cells (only ``obs`` is read) and their labels (1 = sensitive).
    config
        The run's scenarios, categories, split policies, fold count and seed.
    saved
        Pooled test-fold numbers per cell from an earlier run of the same folder, by name
        (``<category>|<split>|k<folds>|seed<seed>``), reused so a resumed run has the same folds.

    Returns
    -------
    The folds, and the assignments not in ``saved`` (empty when every one was reused), to be kept
    with the run (`scdrugmap.evaluate.store.ResultStore.write_splits`).
    """
    saved = saved or {}
    keys = config.obs_keys()
    obs = adata.obs
    made: dict[str, npt.NDArray[np.int8]] = {}
    folds: list[Fold] = []
    for category in config.categories:
        column = keys.category(category)
        if column not in obs:
            log.warning("obs has no %r column; category %s is left out", column, category)
            continue
        if "pooled" in config.scenarios:
            for split in config.splits:
                name = f"{category}|{split}|k{config.folds}|seed{config.seed}"
                category_folds = split_pooled(obs, labels, category_column=column, category=category,
                                              sample_column=keys.sample, split=split, n_folds=config.folds,
                                              seed=config.seed, assignment=saved.get(name, made.get(name)))
                if name not in saved and name not in made:
                    assignment = np.full(adata.n_obs, -1, dtype=np.int8)
                    for fold in category_folds:
                        if fold.skipped is None:
                            assignment[fold.test] = int(fold.fold)
                    made[name] = assignment
                folds.extend(category_folds)
        if "cross" in config.scenarios:
            folds.extend(split_cross_study(obs, labels, category_column=column, category=category,
                                           study_column=keys.study))
    return merge_identical_values(folds, obs, keys), made


def merge_identical_values(folds: list[Fold], obs: pd.DataFrame, keys: schema.ObsKeys) -> list[Fold]:
    """Keep one set of folds per cell set: category values selecting the same cells run once.

    On a file of one study, tissue = Tumor tissue, cancer type = Melanoma and therapy =
    Immunotherapy often select the very same cells, so their folds (same cells, labels and seed)
    are identical. The first value in category order keeps its folds and names the others in
    `Fold.also`; theirs are dropped. Values are compared per scenario and split policy.
    """
    signatures: dict[tuple[str, str], str] = {}
    for category in dict.fromkeys(fold.category for fold in folds):
        values = obs[keys.category(category)].astype(str).to_numpy()
        for value in np.unique(values):
            rows = np.flatnonzero(values == value)
            signatures[(category, str(value))] = hashlib.sha1(rows.astype(np.int64).tobytes()).hexdigest()
    owner: dict[tuple[str, str, str], tuple[str, str]] = {}
    aliases: dict[tuple[str, str, str, str], list[str]] = {}
    kept = []
    for fold in folds:
        name = (fold.category, fold.value)
        first = owner.setdefault((fold.scenario, fold.split, signatures[name]), name)
        if first == name:
            kept.append(fold)
            continue
        covered = aliases.setdefault((fold.scenario, fold.split, *first), [])
        if f"{fold.category}={fold.value}" not in covered:
            covered.append(f"{fold.category}={fold.value}")
    for (scenario, split, category, value), covered in aliases.items():
        log.info("%s %s=%s (split %s) also stands for %s: the same cells, run once", scenario, category, value,
                 split, ", ".join(covered))
    return [dataclasses.replace(fold, also=tuple(aliases.get((fold.scenario, fold.split, fold.category,
                                                                fold.value), ())))
            for fold in kept]


def category_labels(results: pd.DataFrame) -> dict[str, str]:
    """Return, per category of ``results``, its name and the categories whose values it also stands for.

    ``{"tissue": "tissue = cancer_type = therapy", "regimen": "regimen"}`` when tissue's values
    select the same cells as all of cancer type's and therapy's (`merge_identical_values`), which
    then have no rows of their own; ``"tissue (+ cancer_type)"`` when only some of them do.
    """
    labels: dict[str, str] = {}
    also = results["also"].fillna("") if "also" in results else pd.Series("", index=results.index)
    present = set(results["category"].astype(str))
    for category, part in also.groupby(results["category"].astype(str), sort=False):
        covered = [set(a.split("=", 1)[0] for a in text.split("; ") if a) for text in part]
        every = set.intersection(*covered) if covered else set()
        some = set.union(*covered) if covered else set()
        if every and every == some and not every & present:
            labels[category] = " = ".join([category, *sorted(every)])
        elif some:
            labels[category] = f"{category} (+ {', '.join(sorted(some))})"
        else:
            labels[category] = category
    return labels
