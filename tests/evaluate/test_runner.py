import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

import scdrugmap.train.frozen as frozen
from scdrugmap.errors import ConfigError
from scdrugmap.evaluate.grid import BenchmarkConfig
from scdrugmap.evaluate.runner import run_benchmark, summary_table
from scdrugmap.evaluate.store import ResultStore, job_id, read_run
from tests_helpers import make_adata, write_tiny_h5ad


def _config(tmp_path, data, **changes):
    values = {"data": str(data), "out": str(tmp_path / "run"), "models": ["pca", "majority"], "folds": 2,
              "categories": ["tissue"], "splits": ["sample", "cell"], "head": {"epochs": 2, "hidden": 16}}
    values.update(changes)
    return BenchmarkConfig(**values)


def test_benchmark_writes_one_row_per_job_and_predictions(tmp_path):
    data = write_tiny_h5ad(tmp_path)
    everything = run_benchmark(_config(tmp_path, data))
    assert not everything.duplicated(["key", "level"]).any()
    results = everything[everything["level"] == "cell"]
    assert results["key"].is_unique
    assert set(results["split"]) == {"sample", "cell"}
    assert {"pooled", "cross"} <= set(results["scenario"])
    done = results[results["status"] == "done"]
    assert len(done) and done["auroc"].between(0, 1).all()
    predictions = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert set(predictions["key"]) == set(done["key"])
    assert predictions.groupby("key").size().to_dict() == done.set_index("key")["n_test"].to_dict()
    table = summary_table(everything)
    assert {"f1_mean", "auroc_mean", "auroc_sd", "n_folds"} <= set(table.columns)
    samples = everything[everything["level"] == "sample"]
    assert set(samples["key"]) == set(done["key"])  # every scored job is also scored per sample
    assert samples["auroc"].dropna().between(0, 1).all() and "auroc_fraction" in samples


def test_interrupted_benchmark_resumes_with_exactly_one_row_per_job(tmp_path, monkeypatch):
    data = write_tiny_h5ad(tmp_path)
    config = _config(tmp_path, data)
    real = frozen.fit_predict_frozen
    calls = {"n": 0}

    def dies_on_third_group(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # like a kill: nothing after this point is written
        return real(*args, **kwargs)

    monkeypatch.setattr(frozen, "fit_predict_frozen", dies_on_third_group)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(config)
    partial = len(list((tmp_path / "run" / "jobs").glob("*.parquet")))
    monkeypatch.setattr(frozen, "fit_predict_frozen", real)
    results = run_benchmark(config)
    assert 0 < partial < results["key"].nunique()
    assert not results.duplicated(["key", "level"]).any()
    assert not list((tmp_path / "run").rglob("*.tmp"))

    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(frozen, "fit_predict_frozen", counting)
    again = run_benchmark(config)
    assert counted["n"] == 0
    pd.testing.assert_frame_equal(again.reset_index(drop=True), results.reset_index(drop=True))


#: Columns of a job row that measure time, not results.
TIMINGS = ("seconds", "embed_seconds", "embed_cells_per_second")


def _comparable(results):
    return results.drop(columns=[c for c in TIMINGS if c in results]).reset_index(drop=True)


def test_a_resumed_run_equals_an_uninterrupted_one_when_part_of_a_batched_group_is_lost(tmp_path):
    """A kill inside a frozen group leaves some of its folds written: the rerun must not train the rest apart."""
    data = write_tiny_h5ad(tmp_path)
    whole = run_benchmark(_config(tmp_path, data, out=str(tmp_path / "whole"), splits=["cell"], folds=3))
    resumed_dir = tmp_path / "resumed"
    run_benchmark(_config(tmp_path, data, out=str(resumed_dir), splits=["cell"], folds=3))
    store = ResultStore(resumed_dir)
    group = [key for key in whole.loc[whole["level"] == "cell", "key"]
             if key.startswith("pca|frozen|mlp|pooled|tissue|Tumor tissue|")]
    assert len(group) == 3
    for key in group[:2]:  # as if the kill came after the first fold of the group was written
        (resumed_dir / "jobs" / f"{job_id(key)}.parquet").unlink()
    for stale in ("results.parquet", "predictions.parquet"):
        (resumed_dir / stale).unlink()
    resumed = run_benchmark(_config(tmp_path, data, out=str(resumed_dir), splits=["cell"], folds=3))
    pd.testing.assert_frame_equal(_comparable(resumed), _comparable(whole))
    assert store.status(group[2]) == "done"
    predictions = {name: pd.read_parquet(folder / "predictions.parquet").sort_values(["key", "cell"],
                                                                                  ignore_index=True)
                   for name, folder in (("whole", tmp_path / "whole"), ("resumed", resumed_dir))}
    pd.testing.assert_frame_equal(predictions["resumed"], predictions["whole"])


def test_every_model_sees_identical_folds(tmp_path):
    data = write_tiny_h5ad(tmp_path)
    results = run_benchmark(_config(tmp_path, data))
    done = results[results["status"] == "done"]
    sizes = done.pivot_table(index=["scenario", "value", "fold", "split"], columns="model", values="n_test")
    assert (sizes["pca"] == sizes["majority"]).all()


def test_run_folder_refuses_other_data(tmp_path):
    data = write_tiny_h5ad(tmp_path)
    run_benchmark(_config(tmp_path, data, models=["majority"]))
    other = write_tiny_h5ad(tmp_path, name="other.h5ad", seed=5)
    with pytest.raises(ConfigError, match="other data"):
        run_benchmark(_config(tmp_path, other, models=["majority"]))


def test_unknown_strategy_is_refused_with_choices(tmp_path):
    with pytest.raises(ConfigError, match="choose from frozen"):
        BenchmarkConfig(strategies=["magic"]).validate()


def test_leakage_shows_on_per_patient_labels(tmp_path, shared):
    """On GSE120575 (per-patient labels) cell-level splits score higher than patient-grouped ones."""
    data = shared("data", "GSE120575_melanoma_icb_tcells.h5ad")
    config = BenchmarkConfig(data=str(data), out=str(tmp_path / "run"), models=["pca"], folds=5,
                             categories=["tissue"], scenarios=["pooled"], splits=["sample", "cell"])
    results = run_benchmark(config)
    mean = results[results["status"] == "done"].groupby("split")["auroc"].mean()
    assert mean["cell"] > mean["sample"] + 0.05
    grouped = results[(results["split"] == "sample") & (results["status"] == "done")]
    assert (grouped["n_test_samples"] >= 1).all()
    assert np.isfinite(mean).all()


def test_the_ray_executor_without_ray_installed_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the ray extra were not installed
    config = BenchmarkConfig(data="demo", demo_cells=200, out=str(tmp_path / "run"), models=["majority"],
                             executor="ray")
    with pytest.raises(ConfigError, match=r'pip install "scdrugmap\[ray\]"'):
        run_benchmark(config)


def test_an_unknown_executor_or_device_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="--executor spark is not available; choose from local, ray"):
        run_benchmark(BenchmarkConfig(data="demo", demo_cells=200, out=str(tmp_path / "a"), executor="spark"))
    with pytest.raises(ConfigError, match="--device tpu is not a device"):
        run_benchmark(BenchmarkConfig(data="demo", demo_cells=200, out=str(tmp_path / "b"), models=["pca"],
                                      device="tpu"))


def _zscored_h5ad(folder):
    adata = make_adata(n_cells=120, n_samples=12, seed=0)
    dense = np.log1p(adata.X.toarray())
    adata.X = ((dense - dense.mean(axis=0)) / (dense.std(axis=0) + 1e-6)).astype(np.float32)
    path = folder / "zscored.h5ad"
    adata.write_h5ad(path)
    return path


def test_a_model_that_cannot_read_the_data_is_skipped_with_the_reason_and_the_others_go_on(tmp_path):
    data = _zscored_h5ad(tmp_path)
    config = _config(tmp_path, data, models=["pca", "minilm", "majority"], splits=["sample"])
    results = run_benchmark(config)
    results = results[results["level"] == "cell"]
    minilm = results[results["model"] == "minilm"]
    assert len(minilm) and set(minilm["status"]) == {"skipped"}
    unreadable = minilm["reasons"].str.contains("minilm cannot read this data")
    pca = results[results["model"] == "pca"]
    assert unreadable.sum() == (pca["status"] == "done").sum()  # every job pca could run
    assert minilm.loc[unreadable, "reasons"].str.contains("non-negative").all()
    assert (results.loc[results["model"] == "pca", "status"] == "done").any()
    facts = read_run(tmp_path / "run").models
    assert {"pca", "majority", "minilm"} <= set(facts) and "non-negative" in facts["minilm"]["unavailable"]


def test_a_model_that_crashes_while_embedding_fails_alone_and_is_retried(tmp_path, monkeypatch):
    from scdrugmap.models.baselines import PCAEncoder

    data = write_tiny_h5ad(tmp_path)
    config = _config(tmp_path, data, splits=["sample"], scenarios=["pooled"])

    def crash(self, *args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(PCAEncoder, "embedding_blocks", crash)  # what embed and the streamed cache miss run
    results = run_benchmark(config)
    pca = results[(results["model"] == "pca") & (results["status"] != "skipped")]
    assert set(pca["status"]) == {"failed"} and pca["reasons"].str.contains("out of memory").all()
    assert (results.loc[results["model"] == "majority", "status"] == "done").any()
    from scdrugmap.config import embeddings_cache_dir

    assert not list(embeddings_cache_dir().glob("pca-*"))  # no half-written cache entry is left
    monkeypatch.undo()
    again = run_benchmark(config)
    assert (again.loc[again["model"] == "pca", "status"] == "done").any()


def test_model_facts_are_kept_when_a_run_is_resumed(tmp_path):
    data = write_tiny_h5ad(tmp_path)
    config = _config(tmp_path, data, splits=["sample"], scenarios=["pooled"])
    run_benchmark(config)
    (tmp_path / "run" / "models.json").unlink()  # as if killed before the facts were written
    run_benchmark(config)
    facts = read_run(tmp_path / "run").models
    assert {"pca", "majority"} <= set(facts) and facts["pca"]["cache"] == "hit"


def test_auroc_within_cell_types_and_studies_is_in_the_results(tmp_path):
    adata = make_adata(n_cells=120, n_samples=12, seed=0, n_studies=3)  # studies that hold both labels
    adata.obs["cell_type"] = np.where(np.arange(120) % 3 == 0, "T cell", "malignant")
    data = tmp_path / "typed.h5ad"
    adata.write_h5ad(data)
    results = run_benchmark(_config(tmp_path, data, splits=["cell"], scenarios=["pooled"]))
    done = results[(results["status"] == "done") & (results["level"] == "cell") & (results["model"] == "pca")]
    assert done["auroc_within_cell_type"].between(0, 1).all() and done["auroc_within_study"].between(0, 1).all()
    majority = results[(results["status"] == "done") & (results["model"] == "majority") & (results["level"] == "cell")]
    assert (majority["auroc_within_cell_type"] == 0.5).all()
    cells = read_run(tmp_path / "run").cells
    assert "cell_type" in cells


def test_external_validation_trains_on_the_data_and_scores_the_same_value_of_the_test_file(tmp_path):
    data = write_tiny_h5ad(tmp_path)
    test = write_tiny_h5ad(tmp_path, name="other.h5ad", seed=1)
    config = _config(tmp_path, data, test_data=str(test), splits=["sample"], scenarios=["pooled"])
    assert config.scenarios == ["pooled", "external"]
    results = run_benchmark(config)
    cell = results[results["level"] == "cell"]
    external = cell[(cell["scenario"] == "external") & (cell["model"] == "pca") & (cell["status"] == "done")]
    assert set(external["value"]) == {"Cell line", "Tumor tissue"}
    assert (external["n_train"] == 60).all() and (external["n_test"] == 60).all()
    pooled = cell[(cell["scenario"] == "pooled") & (cell["status"] == "done") & (cell["model"] == "pca")]
    assert pooled["n_test"].sum() == 120  # the pooled folds hold the data's own cells only
    predictions = read_run(tmp_path / "run").predictions
    tested = predictions[predictions["key"].isin(external["key"])]
    assert tested["cell"].str.startswith("test:").all()


def test_external_validation_refuses_a_test_file_sharing_too_few_genes_or_other_values(tmp_path):
    data = write_tiny_h5ad(tmp_path)
    few = make_adata(n_cells=40, n_samples=4, seed=1)[:, :10].copy()
    few.write_h5ad(tmp_path / "few.h5ad")
    with pytest.raises(ConfigError, match=r"shares 10 of the 75 genes of --data .*at least 75 genes"):
        run_benchmark(_config(tmp_path, data, test_data=str(tmp_path / "few.h5ad"), scenarios=["pooled"]))
    zscored = _zscored_h5ad(tmp_path)
    with pytest.raises(ConfigError, match="holds counts values but --test-data .* holds zscore"):
        run_benchmark(_config(tmp_path, data, test_data=str(zscored), scenarios=["pooled"], out=str(tmp_path / "z")))
    with pytest.raises(ConfigError, match="--scenarios external needs --test-data"):
        BenchmarkConfig(scenarios=["external"]).validate()


@pytest.mark.parametrize("head", ["mlp", "logistic"])
@pytest.mark.parametrize("split", ["sample", "cell"])
def test_a_unit_reading_its_cells_from_the_cache_file_scores_exactly_as_from_the_whole_array(tmp_path, head, split):
    """The local runner keeps embeddings on disk; a unit reads the cells of its folds and numbers them from 0."""
    from scdrugmap.evaluate.executors import ModelInputs, Unit, compute_unit
    from scdrugmap.evaluate.grid import Job
    from scdrugmap.evaluate.splits import Fold
    from scdrugmap.models.cache import EmbeddingFile
    from scdrugmap.train.heads import HeadConfig

    rng = np.random.default_rng(5)
    embeddings = rng.standard_normal((300, 6)).astype(np.float32)
    labels = rng.integers(0, 2, 300)
    embeddings[:, 0] += labels
    groups = np.repeat([f"s{i}" for i in range(30)], 10)
    unit_cells = rng.permutation(np.flatnonzero(np.arange(300) % 3 != 0))  # a value's cells, in no order
    jobs, fold_sets = [], []
    for k, test in enumerate(np.array_split(unit_cells, 3)):
        train = np.setdiff1d(unit_cells, test)
        fold = Fold("pooled", "tissue", "T", str(k), split, train, test)
        jobs.append(Job("pca", "frozen", head, fold))
        fold_sets.append((train, test))
    np.save(tmp_path / "e.npy", embeddings)
    unit = Unit(jobs, fold_sets)
    inputs = ModelInputs("pca", labels, groups, HeadConfig(epochs=3, hidden=8), "cpu", embeddings=embeddings)
    whole = compute_unit(inputs, unit)
    from_file = compute_unit(replace(inputs, embeddings=EmbeddingFile(tmp_path / "e.npy")), unit)
    assert whole.status == from_file.status == "done"
    for (p_whole, info_whole), (p_file, info_file) in zip(whole.predictions, from_file.predictions, strict=True):
        np.testing.assert_array_equal(p_file, p_whole)
        assert {k: v for k, v in info_file.items() if k != "trust"} == {k: v for k, v in info_whole.items()
                                                                        if k != "trust"}
