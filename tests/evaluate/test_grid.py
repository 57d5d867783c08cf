"""The settings of a run are merged once (flags over the YAML file over the defaults); identical values run once."""

import pytest

from scdrugmap.errors import ConfigError
from scdrugmap.evaluate.grid import DEMO_SETTINGS, BenchmarkConfig, category_labels
from tests_helpers import make_adata

#: What the CLI passes when no option is given: every contract column under its own name.
CONTRACT_KEYS = {"response": "response", "study": "study", "sample": "sample", "tissue": "tissue",
                 "cancer_type": "cancer_type", "therapy": "therapy", "regimen": "regimen"}


def _yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_nothing_given_is_the_defaults_with_the_demos_own_where_it_runs_the_demo():
    demo = BenchmarkConfig(**DEMO_SETTINGS)
    assert BenchmarkConfig.resolve() == demo
    assert BenchmarkConfig.resolve(None, {"data": None, "folds": None}, CONTRACT_KEYS) == demo
    assert demo.splits == ["sample", "cell"] and demo.folds == 5
    real = BenchmarkConfig.resolve(overrides={"data": "cells.h5ad"})
    assert real.folds == 10 and real.splits == ["sample"] and real.head == {}  # the paper's head on real data
    assert BenchmarkConfig.resolve(overrides={"folds": 3}).folds == 3  # a flag wins over the demo's setting


def test_flags_win_over_the_file_and_the_file_over_the_defaults(tmp_path):
    path = _yaml(tmp_path, "data: cells.h5ad\nfolds: 5\nseed: 3\nmodels: [pca]\nweights: {scgpt: /w}\n")
    config = BenchmarkConfig.resolve(path, {"folds": 7, "seed": None, "models": None, "weights": {"uce": "/u"}})
    assert (config.data, config.folds, config.seed, config.models) == ("cells.h5ad", 7, 3, ["pca"])
    assert config.weights == {"uce": "/u"}  # a table given on the command line replaces the file's
    assert config.heads == ["mlp"] and config.out == "scdrugmap-runs/cells"


def test_prompt_and_lora_flags_change_single_entries_of_the_files_tables(tmp_path):
    path = _yaml(tmp_path, "prompt: {model: gpt-x, shots: 2}\nlora: {epochs: 3, rank: 4}\n")
    config = BenchmarkConfig.resolve(path, {"prompt": {"shots": 0, "model": None, "api_base": None},
                                            "lora": {"epochs": None}})
    assert config.prompt == {"model": "gpt-x", "shots": 0}
    assert config.lora == {"epochs": 3, "rank": 4}
    assert BenchmarkConfig.resolve(None, {"lora": {"epochs": 2}}).lora == {"epochs": 2}


def test_only_changed_column_names_are_kept_over_the_files(tmp_path):
    path = _yaml(tmp_path, "keys: {sample: patient, study: series}\n")
    config = BenchmarkConfig.resolve(path, {}, {**CONTRACT_KEYS, "study": "gse"})
    assert config.keys == {"sample": "patient", "study": "gse"}
    assert config.obs_keys().sample == "patient"


def test_out_defaults_to_a_folder_named_after_the_data(tmp_path):
    assert BenchmarkConfig.resolve(None, {"data": "/x/melanoma.h5ad"}).out == "scdrugmap-runs/melanoma"
    assert BenchmarkConfig.resolve(None, {"data": "demo"}).out == "scdrugmap-runs/demo"
    path = _yaml(tmp_path, "data: /x/melanoma.h5ad\nout: runs/m\n")
    assert BenchmarkConfig.resolve(path, {}).out == "runs/m"


def test_a_missing_file_or_an_unknown_setting_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        BenchmarkConfig.resolve(tmp_path / "nonesuch.yaml")
    with pytest.raises(ConfigError, match=r"unknown settings \['fold'\]; allowed: "):
        BenchmarkConfig.resolve(_yaml(tmp_path, "fold: 3\n"))


def test_category_values_selecting_the_same_cells_run_once_under_all_their_names(tmp_path):
    from scdrugmap.evaluate.runner import run_benchmark

    adata = make_adata(n_cells=120, n_samples=12, seed=0)  # one cancer type, therapy and regimen: the same cells
    data = tmp_path / "one.h5ad"
    adata.write_h5ad(data)
    config = BenchmarkConfig(data=str(data), out=str(tmp_path / "run"), models=["majority"], folds=2,
                             scenarios=["pooled"], splits=["sample"])
    results = run_benchmark(config)
    assert set(results["category"]) == {"tissue", "cancer_type"}  # tissue's two values differ from the rest
    melanoma = results[results["category"] == "cancer_type"]
    assert set(melanoma["also"]) == {"therapy=Immunotherapy; regimen=anti-PD1"}
    assert (melanoma["level"] == "cell").sum() == 2  # two folds, run once
    assert category_labels(results)[("pooled", "cancer_type")] == "cancer_type = regimen = therapy"
    assert category_labels(results)[("pooled", "tissue")] == "tissue"
