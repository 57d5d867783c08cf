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
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from scdrugmap.data import schema
from scdrugmap.errors import ConfigError
from scdrugmap.evaluate.splits import Fold, split_cross_study, split_external, split_pooled
from scdrugmap.train.heads import HeadConfig

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

    from scdrugmap.evaluate.splits import SplitPolicy

log = logging.getLogger(__name__)

STRATEGIES = ("frozen", "lora", "prompt")
SCENARIOS = ("pooled", "cross", "external")
DEFAULT_SCENARIOS = ("pooled", "cross")
#: External validation: the test file must share at least this many genes with --data (all of them when it has
#: fewer), and this share of them.
MIN_SHARED_GENES = 200
MIN_SHARED_FRACTION = 0.2
#: Below this share of --data's genes the models read the test cells over part of their training genes: logged.
WARN_SHARED_FRACTION = 0.5
#: obs column of a combined (--data + --test-data) file: True for the test file's cells.
TEST_ORIGIN = "scdrugmap_test_data"
#: Prefix of the test file's cell names in a combined file (cell names must be unique).
TEST_PREFIX = "test:"
DEFAULT_MODELS = ("pca", "minilm", "majority")
DEMO_CELLS = 1500
DEMO_GENES = 2000
#: Settings of the demo (``--data demo``, the default) where neither a flag nor the YAML file gives them:
#: the PCA baseline and the majority reference (embedding with MiniLM alone takes minutes on a CPU: add it
#: with --models pca,minilm,majority), both split policies side by side (the cell-level split's inflation is part of the lesson), 5 folds, and a
#: narrower MLP head that learns faster (hidden 128, learning rate 1e-3: 10x less work per step than the
#: paper's 512 units at 1e-4, which underfit in the demo's 10 epochs), so the whole grid runs in a few minutes
#: on two CPU cores. Real data keeps the general defaults (the paper's head, 10 folds).
DEMO_SETTINGS: dict[str, Any] = {"models": ["pca", "majority"], "folds": 5, "splits": ["sample", "cell"],
                                 "head": {"hidden": 128, "learning_rate": 1e-3}}
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
    scenarios: list[str] = field(default_factory=lambda: list(DEFAULT_SCENARIOS))
    categories: list[str] = field(default_factory=lambda: list(schema.CATEGORY_KINDS))
    splits: list[str] = field(default_factory=lambda: ["sample"])
    folds: int = 10
    seed: int = 0
    permutations: int = 0
    test_data: str | None = None
    layer: str | None = None
    batch_size: int | None = None
    device: str = "auto"
    dtype: str = "auto"
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
        the simulated collection, which also takes `DEMO_SETTINGS` where nothing else gives them). It
        is not validated yet (`validate`, called by the runner).

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
        if values.get("data", "demo") == "demo":
            for name, value in DEMO_SETTINGS.items():
                values.setdefault(name, value)
        if "out" not in values:
            stem = "demo" if values.get("data", "demo") == "demo" else Path(values["data"]).stem
            values["out"] = str(Path(RUNS_DIR) / stem)
        return cls(**values)

    def __post_init__(self) -> None:
        if self.test_data and "external" not in self.scenarios:  # a test file is scored in its own scenario
            self.scenarios = [*self.scenarios, "external"]

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
        if "external" in self.scenarios and not self.test_data:
            msg = "--scenarios external needs --test-data FILE: the labelled file to score."
            raise ConfigError(msg)
        if self.permutations < 0:
            msg = f"--permutations {self.permutations}: give 0 (no null) or a positive number of permutations."
            raise ConfigError(msg)
        if self.folds < 2:
            msg = f"--folds {self.folds}: need at least 2 folds."
            raise ConfigError(msg)
        self.validate_dtypes()

    def validate_dtypes(self) -> None:
        """Refuse an unknown ``dtype`` and bfloat16 for any model that refuses it, before anything runs.

        A model's ``model_options`` may give its own ``dtype`` (e.g. ``float32`` for one model of a bfloat16
        run). Names the registry does not know are left to the runner, which reports them.
        """
        from scdrugmap.models.base import get_encoder_class, registry
        from scdrugmap.models.precision import resolve_dtype

        known = registry()
        for model in self.models:
            dtype = self.model_options.get(model, {}).get("dtype", self.dtype)
            if model.lower() in known:
                resolve_dtype(get_encoder_class(model), dtype, "cpu")  # refusals do not depend on the device


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
    from scdrugmap.data.simulate import simulate_collection, simulator_version

    name = f"demo-{config.demo_cells}x{config.demo_genes}-seed{config.seed}-{simulator_version()}.h5ad"
    path = paths.home_dir() / "demo" / name
    if not path.exists():
        log.info("simulating the demo collection (%d cells x %d genes) into %s", config.demo_cells,
                 config.demo_genes, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        simulate_collection(n_cells=config.demo_cells, n_genes=config.demo_genes, seed=config.seed, out_path=path)
    return path


def _value_kind_class(kind: str) -> str:
    """Group value kinds by how models read them: counts-like are normalised, log and z-scores used as they are."""
    return {"counts": "counts-like", "tpm": "counts-like", "normalised": "counts-like", "log": "log"}.get(kind, kind)


def external_file(config: BenchmarkConfig, data_path: Path) -> Path:
    """Return one file holding the cells of ``--data`` and of ``--test-data`` on their shared genes (made once).

    The test file's cells are named ``test:<name>`` and marked in ``obs[TEST_ORIGIN]``; models embed
    both files together (baselines fit genes and components on all cells, without labels, as in the
    other scenarios), and the external folds train on the data's cells and test on the test file's.

    Raises
    ------
    ConfigError
        When the test file is missing or has no label column, when the files share fewer than
        `MIN_SHARED_GENES` genes or `MIN_SHARED_FRACTION` of the data's genes, or when their values are
        of different kinds (e.g. counts and z-scores), the same guards `scdrugmap predict` applies.
    """
    import anndata as ad

    from scdrugmap import config as paths
    from scdrugmap.data.io import read_h5ad

    test_path = Path(str(config.test_data))
    if not test_path.exists():
        msg = f"--test-data {test_path}: no such file. Pass a labelled .h5ad to score the trained heads on."
        raise ConfigError(msg)
    keys = config.obs_keys()
    stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in (data_path, test_path))
    stamp += f"|{config.layer}|{sorted(config.keys.items())}"
    path = paths.home_dir() / "external" / f"{hashlib.sha1(stamp.encode()).hexdigest()[:16]}.h5ad"
    if path.exists():
        return path
    data, test = read_h5ad(data_path), read_h5ad(test_path)
    if keys.response not in test.obs:
        msg = f"--test-data {test_path}: obs has no {keys.response!r} column; the test file must be labelled."
        raise ConfigError(msg)
    data_genes = data.var_names.astype(str)
    shared = data_genes[data_genes.isin(test.var_names.astype(str))]
    fraction = shared.size / max(1, data_genes.size)
    needed = min(MIN_SHARED_GENES, data_genes.size)
    if shared.size < needed or fraction < MIN_SHARED_FRACTION:
        examples = f"{list(data_genes[:2])} against {list(test.var_names.astype(str)[:2])}"
        hint = (f"The files name genes differently (e.g. {examples}): use one kind of gene id in both."
                if fraction < 0.05 else "The test file measures too few of the genes the models read in --data.")
        msg = (f"--test-data {test_path} shares {shared.size} of the {data_genes.size} genes of --data {data_path} "
               f"({fraction:.0%}); at least {needed} genes and {MIN_SHARED_FRACTION:.0%} of them are needed to score "
               f"heads trained on --data there. {hint}")
        raise ConfigError(msg)
    if fraction < WARN_SHARED_FRACTION:
        log.warning("--test-data shares %d of the %d genes of --data (%.0f%%): models read both on these genes only",
                    shared.size, data_genes.size, 100 * fraction)
    kinds = [schema.detect_value_kind(schema.expression_matrix(a, config.layer)) for a in (data, test)]
    if _value_kind_class(kinds[0]) != _value_kind_class(kinds[1]):
        msg = (f"--data {data_path} holds {kinds[0]} values but --test-data {test_path} holds {kinds[1]}; a head "
               f"trained on one cannot score the other. Give both files the same kind of values (e.g. --layer counts).")
        raise ConfigError(msg)
    columns = [c for c in dataclasses.asdict(keys).values() if c in data.obs and c in test.obs]
    parts = []
    for part, is_test in ((data, False), (test, True)):
        part = part[:, shared].copy()
        part.obs = part.obs[columns].astype(str).assign(**{TEST_ORIGIN: is_test})
        if is_test:
            part.obs_names = [f"{TEST_PREFIX}{name}" for name in part.obs_names.astype(str)]
        part.uns, part.obsm, part.varm, part.obsp = {}, {}, {}, {}
        if config.layer:
            part.layers = {config.layer: part.layers[config.layer]}
        else:
            part.layers = {}
        parts.append(part)
    combined = ad.concat(parts, join="inner", merge="first")
    combined.obs[TEST_ORIGIN] = combined.obs[TEST_ORIGIN].astype(bool)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.h5ad")
    combined.write_h5ad(tmp)
    tmp.replace(path)
    log.info("external validation: %d cells of %s and %d of %s on %d shared genes in %s", data.n_obs, data_path,
             test.n_obs, test_path, shared.size, path)
    return path


def _shifted(folds: list[Fold], rows: npt.NDArray[np.int64]) -> list[Fold]:
    """Return folds made on a subset of cells with their positions mapped back to the whole data."""
    return [dataclasses.replace(f, train=rows[f.train], test=rows[f.test]) for f in folds]


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
        Pooled test-fold numbers per cell of the data (not of a test file's cells, see
        `external_file`) from an earlier run of the same folder, by name
        (``<category>|<split>|k<folds>|seed<seed>``), reused so a resumed run has the same folds.

    Returns
    -------
    The folds, and the assignments not in ``saved`` (empty when every one was reused), to be kept
    with the run (`scdrugmap.evaluate.store.ResultStore.write_splits`).
    """
    saved = saved or {}
    keys = config.obs_keys()
    everything = adata.obs
    origin = (everything[TEST_ORIGIN].to_numpy(dtype=bool) if TEST_ORIGIN in everything
              else np.zeros(adata.n_obs, dtype=bool))
    rows = np.flatnonzero(~origin)  # pooled and cross-study folds use the data's own cells only
    obs, data_labels = everything.iloc[rows], labels[rows]
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
                category_folds = split_pooled(obs, data_labels, category_column=column, category=category,
                                              sample_column=keys.sample, split=cast("SplitPolicy", split), n_folds=config.folds,
                                              seed=config.seed, assignment=saved.get(name, made.get(name)))
                if name not in saved and name not in made:
                    assignment = np.full(rows.size, -1, dtype=np.int8)
                    for fold in category_folds:
                        if fold.skipped is None:
                            assignment[fold.test] = int(fold.fold)
                    made[name] = assignment
                folds.extend(_shifted(category_folds, rows))
        if "cross" in config.scenarios:
            folds.extend(_shifted(split_cross_study(obs, data_labels, category_column=column, category=category,
                                                    study_column=keys.study), rows))
        if "external" in config.scenarios and origin.any():
            folds.extend(split_external(everything, labels, category_column=column, category=category,
                                        origin=origin))
    return merge_identical_values(folds, everything, keys, origin=origin), made


def merge_identical_values(folds: list[Fold], obs: pd.DataFrame, keys: schema.ObsKeys,
                           origin: npt.NDArray[np.bool_] | None = None) -> list[Fold]:
    """Keep one set of folds per cell set: category values selecting the same cells run once.

    On a file of one study, tissue = Tumor tissue, cancer type = Melanoma and therapy =
    Immunotherapy often select the very same cells, so their folds (same cells, labels and seed)
    are identical. The first value in category order keeps its folds and names the others in
    `Fold.also`; theirs are dropped. Values are compared per scenario and split policy, over the
    data's own cells for the pooled and cross-study folds and over both files' (``origin`` marks a
    test file's) for the external ones.
    """
    origin = np.zeros(len(obs), dtype=bool) if origin is None else origin
    signatures: dict[tuple[str, str, bool], str] = {}
    for category in dict.fromkeys(fold.category for fold in folds):
        values = obs[keys.category(category)].astype(str).to_numpy()
        for value in np.unique(values):
            for external in (False, True):
                rows = np.flatnonzero((values == value) & (~origin | external))
                signatures[(category, str(value), external)] = hashlib.sha1(rows.astype(np.int64).tobytes()).hexdigest()
    owner: dict[tuple[str, str, str], tuple[str, str]] = {}
    aliases: dict[tuple[str, str, str, str], list[str]] = {}
    kept = []
    for fold in folds:
        name = (fold.category, fold.value)
        signature = signatures[(*name, fold.scenario == "external")]
        first = owner.setdefault((fold.scenario, fold.split, signature), name)
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


def category_labels(results: pd.DataFrame) -> dict[tuple[str, str], str]:
    """Return, per scenario and category of ``results``, the category's name and those it also stands for.

    ``{("pooled", "tissue"): "tissue = cancer_type = therapy", ("pooled", "regimen"): "regimen"}`` when,
    in the pooled scenario, every scored tissue value selects the same cells as values of cancer type
    and therapy (`merge_identical_values`); ``"tissue (+ cancer_type)"`` when only some do.
    """
    labels: dict[tuple[str, str], str] = {}
    frame = results.assign(also=results["also"].fillna("") if "also" in results else "")
    if "status" in frame:
        frame = frame[frame["status"] == "done"] if (frame["status"] == "done").any() else frame
    for (scenario, category), part in frame.groupby(["scenario", "category"], sort=False, observed=True):
        covered = [{a.split("=", 1)[0] for a in text.split("; ") if a} for text in part["also"]]
        every = set.intersection(*covered) if covered else set()
        some = set.union(*covered) if covered else set()
        if every and every == some:
            labels[(scenario, category)] = " = ".join([category, *sorted(every)])
        elif some:
            labels[(scenario, category)] = f"{category} (+ {', '.join(sorted(some))})"
        else:
            labels[(scenario, category)] = category
    return labels
