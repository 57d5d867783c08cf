"""A small run directory built in code: the results store a benchmark writes, with known quirks.

Models pca, scgpt and majority; frozen MLP heads for all, LoRA for scgpt (LoRA jobs of
pca and majority are skipped); four categories (cancer type and regimen with three values);
both pooled splits (sample, cell) with three folds; a cross-study scenario over two studies.
Planted on purpose: one pca fold with NaN F1/AUROC, Breast under split=sample skipped,
one failed scgpt job, cross-study jobs of single-study values skipped (see the `planted`
fixture).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

MODELS = ("pca", "scgpt", "majority")
STUDIES = ("GSE1", "GSE2")
#: sample -> (study, tissue, cancer type, therapy, regimen)
SAMPLES = {
    "P0": ("GSE1", "Tumor", "Melanoma", "Immunotherapy", "anti-PD1"),
    "P1": ("GSE1", "Tumor", "Melanoma", "Immunotherapy", "anti-PD1"),
    "P2": ("GSE2", "Tumor", "Melanoma", "Immunotherapy", "anti-CTLA4"),
    "P3": ("GSE2", "Tumor", "Melanoma", "Immunotherapy", "anti-CTLA4"),
    "P4": ("GSE1", "Tumor", "Lung", "Targeted", "erlotinib"),
    "P5": ("GSE2", "Tumor", "Lung", "Targeted", "erlotinib"),
    "P6": ("GSE1", "PBMC", "Lung", "Targeted", "erlotinib"),
    "P7": ("GSE2", "PBMC", "Lung", "Targeted", "erlotinib"),
    "P8": ("GSE1", "PBMC", "Breast", "Immunotherapy", "anti-PD1"),
    "P9": ("GSE1", "PBMC", "Breast", "Immunotherapy", "anti-PD1"),
}
CATEGORIES = ("tissue", "cancer_type", "therapy", "regimen")
FOLDS = 3
BASE_F1 = {"pca": 0.6, "scgpt": 0.72, "majority": 0.3}
CELL_SPLIT_BONUS = 0.15
NAN_FOLD = ("pca", "frozen", "cancer_type", "Melanoma", "2", "sample")
FAILED_JOB = ("scgpt", "frozen", "regimen", "erlotinib", "1", "sample")
SKIPPED_VALUE = ("cancer_type", "Breast", "sample")


def make_cells(cells_per_sample: int = 12, seed: int = 0) -> pd.DataFrame:
    """Return cells.parquet's frame: 120 cells over 10 samples, half sensitive per sample."""
    rng = np.random.default_rng(seed)
    rows = []
    for sample, (study, tissue, cancer, therapy, regimen) in SAMPLES.items():
        responses = rng.permutation(["sensitive", "resistant"] * (cells_per_sample // 2))
        for index, response in enumerate(responses):
            rows.append({"cell": f"{sample}_c{index}", "response": response, "study": study, "sample": sample,
                         "dataset": f"D-{study}", "tissue": tissue, "cancer_type": cancer, "therapy": therapy,
                         "regimen": regimen})
    return pd.DataFrame(rows)


def _key(model, strategy, head, scenario, category, value, fold, split):
    return f"{model}|{strategy}|{head}|{scenario}|{category}|{value}|{fold}|{split}"


def _row(model, strategy, scenario, category, value, fold, split, status, metrics=None, reasons=None, seconds=0.0,
         n_train=0, n_test=0):
    metrics = metrics or {}
    return {"key": _key(model, strategy, "mlp", scenario, category, value, fold, split), "model": model,
            "strategy": strategy, "head": "mlp", "scenario": scenario, "category": category, "value": value,
            "fold": fold, "split": split, "status": status, "n_train": n_train, "n_test": n_test,
            "n_train_samples": 0, "n_test_samples": 0, "seconds": seconds, "reasons": json.dumps(reasons or {}),
            **{name: metrics.get(name, np.nan) for name in ("f1", "auroc", "accuracy", "precision", "recall")},
            "embed_seconds": 1.0, "embed_cells_per_second": 120.0}


def _settings(model):
    yield "frozen", None
    yield "lora", (None if model == "scgpt" else f"{model} has no network to adapt; LoRA applies to foundation models")


def make_results_and_predictions(cells: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (results, predictions) of the fixture grid with the planted NaN, skipped and failed jobs."""
    rng = np.random.default_rng(seed)
    rows, predictions = [], []

    def done(model, strategy, scenario, category, value, fold, split, test_cells):
        shift = CELL_SPLIT_BONUS if split == "cell" else 0.0
        shift += 0.05 if strategy == "lora" else 0.0
        f1 = float(np.clip(BASE_F1[model] + shift + rng.normal(0, 0.05), 0, 1))
        metrics = {"f1": f1, "auroc": float(np.clip(f1 + 0.1, 0, 1)), "accuracy": f1, "precision": f1, "recall": f1}
        reasons = {}
        if (model, strategy, category, value, fold, split) == NAN_FOLD:
            metrics.update(f1=np.nan, auroc=np.nan, precision=np.nan)
            reasons = {"f1": "no sensitive cell in the fold and none predicted", "auroc": "one class"}
        row = _row(model, strategy, scenario, category, value, fold, split, "done", metrics, reasons,
                   seconds=0.5 if strategy == "frozen" else 4.0, n_train=80, n_test=len(test_cells))
        rows.append(row)
        labels = (test_cells["response"] == "sensitive").to_numpy().astype(np.int64)
        strength = {"pca": 1.0, "scgpt": 2.0, "majority": 0.0}[model]
        logits = strength * (labels - 0.5) * 2 + rng.normal(0, 1, labels.size)
        predictions.append(pd.DataFrame({"cell": test_cells["cell"].to_numpy(), "label": labels,
                                         "probability": (1 / (1 + np.exp(-logits))).astype(np.float32),
                                         "key": row["key"]}))

    for model in MODELS:
        for strategy, not_applicable in _settings(model):
            for category in CATEGORIES:
                for value in sorted(set(cells[category])):
                    members = cells[cells[category] == value]
                    for split in ("sample", "cell"):
                        if not_applicable or (category, value, split) == SKIPPED_VALUE:
                            reason = not_applicable or "2 samples, fewer than 3 folds"
                            rows.append(_row(model, strategy, "pooled", category, value, "all", split, "skipped",
                                             reasons={"skipped": reason}))
                            continue
                        for fold in range(FOLDS):
                            if (model, strategy, category, value, str(fold), split) == FAILED_JOB:
                                rows.append(_row(model, strategy, "pooled", category, value, str(fold), split,
                                                 "failed", reasons={"error": "Traceback ...\nValueError: one class"},
                                                 seconds=0.1))
                                continue
                            test = members.iloc[fold::FOLDS]
                            done(model, strategy, "pooled", category, value, str(fold), split, test)
                    studies = sorted(set(members["study"]))
                    if not_applicable or len(studies) < 2:
                        reason = not_applicable or f"only one study ({studies[0]}); leave-one-study-out needs two or more"
                        rows.append(_row(model, strategy, "cross", category, value, "all", "sample", "skipped",
                                         reasons={"skipped": reason}))
                        continue
                    for study in studies:
                        done(model, strategy, "cross", category, value, study, "sample",
                             members[members["study"] == study])
    results = pd.DataFrame(rows).sort_values("key", ignore_index=True)
    return results, pd.concat(predictions, ignore_index=True)


def build_run(folder: Path, *, simulated: bool = True, seed: int = 0) -> Path:
    """Write a complete run directory into ``folder`` and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    cells = make_cells(seed=seed)
    results, predictions = make_results_and_predictions(cells, seed=seed)
    results.to_parquet(folder / "results.parquet", index=False)
    predictions.to_parquet(folder / "predictions.parquet", index=False)
    cells.to_parquet(folder / "cells.parquet", index=False)
    rng = np.random.default_rng(seed)
    (folder / "embeddings").mkdir(exist_ok=True)
    response = (cells["response"] == "sensitive").to_numpy()[:, None]
    for model, dim in (("pca", 10), ("scgpt", 16)):
        embedding = (rng.normal(size=(len(cells), dim)) + 2.0 * response).astype(np.float32)
        np.savez_compressed(folder / "embeddings" / f"{model}.npz", embedding=embedding,
                            cell=cells["cell"].to_numpy().astype(str))
    models = {
        "pca": {"seconds": 0.5, "cells_per_second": 240.0, "n_cells": 120, "dim": 10, "cache": "miss",
                "family": "baseline", "input": "any", "embedding_dim": 10, "lora_targets": []},
        "scgpt": {"seconds": 6.0, "cells_per_second": 20.0, "n_cells": 120, "dim": 16, "cache": "miss",
                  "family": "foundation", "input": "counts", "embedding_dim": 16, "lora_targets": ["out_proj"],
                  "parameters": 51_000_000},
        "majority": {"seconds": 1e-5, "cells_per_second": 1.2e7, "n_cells": 120, "dim": 0, "cache": "miss",
                     "family": "baseline", "input": "any", "embedding_dim": 0, "lora_targets": []},
    }
    (folder / "models.json").write_text(json.dumps(models, indent=1))
    config = {"config": {"data": "demo" if simulated else "/data/real.h5ad", "out": str(folder),
                         "models": list(MODELS), "strategies": ["frozen", "lora"], "heads": ["mlp"],
                         "scenarios": ["pooled", "cross"], "categories": list(CATEGORIES),
                         "splits": ["sample", "cell"], "folds": FOLDS, "seed": seed},
              "environment": {"python": "3.11.7", "platform": "Linux-test", "packages": {"scdrugmap": "0.1.0"}}}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


@pytest.fixture(scope="session")
def planted() -> SimpleNamespace:
    """The quirks planted in the fixture run: (model, strategy, category, value, fold, split) tuples."""
    return SimpleNamespace(nan_fold=NAN_FOLD, failed_job=FAILED_JOB, skipped_value=SKIPPED_VALUE, folds=FOLDS)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A simulated run directory (config.data == "demo"), shared read-only by the report tests."""
    return build_run(tmp_path_factory.mktemp("report_run") / "run")


@pytest.fixture(scope="session")
def real_run_dir(tmp_path_factory) -> Path:
    """The same run, but from a real data file (no SIMULATED banner)."""
    return build_run(tmp_path_factory.mktemp("report_run") / "real", simulated=False)


@pytest.fixture(scope="session")
def run(run_dir):
    """The fixture run read back through `scdrugmap.report.run.read_run_data`."""
    from scdrugmap.report.run import read_run_data

    return read_run_data(run_dir)


@pytest.fixture(scope="session")
def colours(run):
    from scdrugmap.report.style import model_colours

    return model_colours(run.model_list)


@pytest.fixture(scope="session")
def run_builder():
    """`build_run`, for tests that need a run folder of their own (to add files to it)."""
    return build_run
