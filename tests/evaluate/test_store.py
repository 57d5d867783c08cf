"""The run folder has one owner: `scdrugmap.evaluate.store` writes every file atomically and reads it back."""

import ast
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import scdrugmap
from scdrugmap.errors import ConfigError, SplitError
from scdrugmap.evaluate import store
from scdrugmap.evaluate.grid import BenchmarkConfig
from scdrugmap.evaluate.runner import run_benchmark
from scdrugmap.evaluate.store import ResultStore, read_run
from tests_helpers import write_tiny_h5ad

SRC = Path(scdrugmap.__file__).parent
RUN_FILES = (store.CONFIG, store.FINGERPRINT, store.SPLITS, store.CELLS, store.RESULTS, store.PREDICTIONS,
             store.MODELS)
#: Other files that happen to share a run file's name, by the part of src/scdrugmap holding them.
OTHER_FILES = {store.CONFIG: ("models/",),  # the official checkpoints' config.json
               store.PREDICTIONS: ("web/",)}  # a web prediction job's output (web/results.py reads runs)
#: Where run folders are written or read: no path joins to their sub-folders either.
RUN_READERS = ("evaluate/", "report/", "web/results.py", "commands.py", "cli.py")
RUN_DIRS = (store.JOBS_DIR, store.PREDICTIONS_DIR, store.EMBEDDINGS_DIR, store.BIOMARKERS_DIR)


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def _joined_names(tree: ast.AST) -> list[tuple[int, str]]:
    """Return the string constants on the right of a ``/`` (a path join)."""
    return [(node.lineno, node.right.value) for node in ast.walk(tree)
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
            and isinstance(node.right, ast.Constant) and isinstance(node.right.value, str)]


def test_only_the_store_names_the_files_of_a_run_folder():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        where = path.relative_to(SRC).as_posix()
        if where == "evaluate/store.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, text in _strings(tree):
            for name in (name for name in RUN_FILES if name in text):
                if not where.startswith(OTHER_FILES.get(name, ())) or where.startswith(RUN_READERS):
                    found.append(f"{where}:{line} names {name}")
            if where.startswith(RUN_READERS) and store.EMBEDDING_SUFFIX in text:
                found.append(f"{where}:{line} names the {store.EMBEDDING_SUFFIX} embedding samples")
        if where.startswith(RUN_READERS):
            found += [f"{where}:{line} joins the run sub-folder {name!r}" for line, name in _joined_names(tree)
                      if name.split("/")[0] in RUN_DIRS]
    assert not found, "run folder files are named outside evaluate/store.py:\n" + "\n".join(found)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A small benchmark run (pca, majority; tissue; patient-grouped folds) and its returned results."""
    folder = tmp_path_factory.mktemp("store")
    data = write_tiny_h5ad(folder)
    config = BenchmarkConfig(data=str(data), out=str(folder / "run"), models=["pca", "majority"], folds=2,
                             categories=["tissue"], head={"epochs": 2, "hidden": 16})
    return folder / "run", run_benchmark(config)


def test_read_run_reads_back_every_file_the_benchmark_wrote(finished):
    run_dir, results = finished
    run = read_run(run_dir)
    assert "predictions" not in vars(run) and "results" not in vars(run)  # read on first use
    pd.testing.assert_frame_equal(run.results, results)
    done = results[results["status"] == "done"]
    assert set(run.predictions["key"]) == set(done["key"])
    assert {"cell", "label", "probability", "key"} <= set(run.predictions.columns)
    assert len(run.cells) == run.splits.shape[0] and {"cell", "response", "sample", "tissue"} <= set(run.cells)
    assert run.config["models"] == ["pca", "majority"] and run.config["folds"] == 2
    assert {"python", "platform", "packages"} <= set(run.environment)
    assert set(run.models) == {"pca", "majority"} and run.models["pca"]["cache"] in {"hit", "miss"}
    assert run.fingerprint and len(run.fingerprint) >= 16
    assert list(run.splits.columns) == ["tissue|sample|k2|seed0"] and run.splits.index.name == "cell"
    assert run.model_list == ["pca", "majority"] and not run.simulated
    assert run.embedding_models() == ["pca"]  # majority has no embedding
    embedding, cells = run.embedding("pca")
    assert embedding.dtype == np.float32 and embedding.shape[0] == cells.size == len(run.cells)
    assert not list(run_dir.rglob("*.tmp"))


def test_read_run_refuses_a_missing_folder_and_one_without_results(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        read_run(tmp_path / "nonesuch")
    with pytest.raises(ConfigError, match="no results found"):
        read_run(tmp_path)


def test_a_run_cut_short_is_read_from_its_job_files(tmp_path):
    result_store = ResultStore(tmp_path)
    for key in ("b|frozen", "a|frozen"):
        result_store.write_job({"key": key, "model": key[0], "status": "done", "reasons": {}, "f1": 0.5},
                               pd.DataFrame({"cell": ["c1"], "label": [1], "probability": [0.7]}))
    run = read_run(tmp_path)
    assert list(run.results["key"]) == ["a|frozen", "b|frozen"]
    assert run.predictions is None and run.cells is None and run.config == {} and run.models == {}


def test_saved_splits_round_trip_and_refuse_other_cells(tmp_path):
    cells = pd.Index([f"c{i}" for i in range(12)])
    assignment = np.arange(12, dtype=np.int8) % 3
    result_store = ResultStore(tmp_path)
    assert result_store.read_splits(cells) == {}
    result_store.write_splits(cells, {"tissue|sample": assignment})
    assert np.array_equal(result_store.read_splits(cells)["tissue|sample"], assignment)
    with pytest.raises(SplitError, match="other cells"):
        result_store.read_splits(pd.Index([f"x{i}" for i in range(12)]))


def test_model_facts_are_merged_and_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    result_store = ResultStore(tmp_path)
    result_store.write_model_facts({"pca": {"dim": 50}})
    result_store.write_model_facts({"hvg": {"dim": 20}})
    assert store.RunFolder(tmp_path).models == {"pca": {"dim": 50}, "hvg": {"dim": 20}}

    def interrupted(src, dst):
        raise KeyboardInterrupt  # killed between writing the temporary file and renaming it

    monkeypatch.setattr(store.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        result_store.write_model_facts({"pca": {"dim": 10}})
    assert store.RunFolder(tmp_path).models == {"pca": {"dim": 50}, "hvg": {"dim": 20}}


def test_the_embedding_sample_is_capped_and_a_leftover_temporary_file_is_no_model(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "EMBEDDING_SAMPLE", 10)
    result_store = ResultStore(tmp_path)
    embeddings = np.arange(60, dtype=np.float32).reshape(30, 2)
    names = pd.Index([f"c{i}" for i in range(30)])
    result_store.save_embedding_sample("pca", embeddings, names, seed=0)
    folder = tmp_path / store.EMBEDDINGS_DIR
    (folder / f"scgpt{store.EMBEDDING_SUFFIX}.tmp").write_bytes(b"half a file")
    for model in ("pca", "scgpt"):
        result_store.write_job({"key": model, "model": model, "status": "done"})
    run = read_run(tmp_path)
    assert run.embedding_models() == ["pca"]
    embedding, cells = run.embedding("pca")
    assert embedding.shape == (10, 2) and list(cells) == sorted(cells, key=lambda c: int(c[1:]))
    np.testing.assert_array_equal(embedding[:, 0] // 2, [int(c[1:]) for c in cells])


def test_config_holds_the_resolved_settings_and_the_environment(tmp_path):
    result_store = ResultStore(tmp_path)
    result_store.write_config({"data": "demo", "models": ["pca"]})
    facts = json.loads((tmp_path / store.CONFIG).read_text())
    assert list(facts) == ["config", "environment"]
    run = store.RunFolder(tmp_path)
    assert run.config == {"data": "demo", "models": ["pca"]} and run.simulated
    assert run.environment["packages"]["numpy"] == np.__version__


def test_consolidated_predictions_are_the_done_jobs_parts_in_order_without_holding_them_together(tmp_path):
    """Streamed part by part: equal to concatenating the parts, a column one part lacks is NaN there."""
    writer = ResultStore(tmp_path)
    rng = np.random.default_rng(0)
    frames = {}
    for index, status in enumerate(["done", "done", "failed", "done"]):
        key = f"pca|frozen|mlp|pooled|tissue|T{index}|0|sample"
        row = {"key": key, "level": "cell", "status": status, "reasons": {}}
        cells = pd.DataFrame({"cell": [f"c{index}-{i}" for i in range(5)], "label": rng.integers(0, 2, 5),
                              "probability": rng.random(5).astype(np.float32)})
        if index != 1:  # a job whose head gave no calibrated probability
            cells["calibrated"] = rng.random(5).astype(np.float32)
        writer.write_job(row, cells if status == "done" else None)
        if status == "done":
            frames[store.job_id(key)] = cells.assign(key=key)
    writer.consolidate()
    expected = pd.concat([frames[name] for name in sorted(frames)], ignore_index=True)
    got = pd.read_parquet(tmp_path / store.PREDICTIONS)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    assert got["probability"].dtype == np.float32 and got["calibrated"].isna().sum() == 5


def test_maps_added_after_the_jobs_equal_maps_made_with_the_sample_and_are_added_once(tmp_path):
    """The runner saves samples without a map and adds them at the end (or when a run cut short resumes)."""
    rng = np.random.default_rng(2)
    embeddings = rng.standard_normal((40, 5)).astype(np.float32)
    cells = pd.Index([f"c{i}" for i in range(40)])
    (tmp_path / "direct").mkdir()
    (tmp_path / "later").mkdir()
    direct, later = ResultStore(tmp_path / "direct"), ResultStore(tmp_path / "later")
    direct.save_embedding_sample("pca", embeddings, cells, seed=3, projection="pca")
    later.save_embedding_sample("pca", embeddings, cells, seed=3, projection=None)
    assert read_run_folder(later).embedding_map("pca") is None
    assert later.add_embedding_maps(seed=3, projection="pca") == ["pca"]
    assert later.add_embedding_maps(seed=3, projection="pca") == []  # already there
    made, added = read_run_folder(direct).embedding_map("pca"), read_run_folder(later).embedding_map("pca")
    np.testing.assert_array_equal(added.coordinates, made.coordinates)
    assert (added.method, added.seed) == (made.method, made.seed) == ("pca", 3)
    np.testing.assert_array_equal(read_run_folder(later).embedding("pca")[0], embeddings)


def read_run_folder(result_store):
    return store.RunFolder(result_store.run_dir)
