import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from scdrugmap.cli import app
from tests_helpers import make_adata

runner = CliRunner()


def test_train_then_predict_writes_probabilities_and_csv(tmp_path):
    train_path, new_path = tmp_path / "train.h5ad", tmp_path / "new.h5ad"
    make_adata(n_cells=120, n_samples=12, seed=0).write_h5ad(train_path)
    make_adata(n_cells=40, n_samples=4, seed=1).write_h5ad(new_path)
    trained = runner.invoke(app, ["train", str(train_path), "--model", "pca", "--out", str(tmp_path / "bundle")])
    assert trained.exit_code == 0, trained.output
    predicted = runner.invoke(app, ["predict", str(new_path), "--model", "pca", "--head", str(tmp_path / "bundle")])
    assert predicted.exit_code == 0, predicted.output
    table = pd.read_csv(tmp_path / "new.predicted.csv", index_col=0)
    probability = table["scdrugmap_pca_prob_sensitive"]
    assert len(table) == 40 and probability.between(0, 1).all()
    assert set(table["scdrugmap_pca_prediction"]) <= {"sensitive", "resistant"}
    assert ((probability >= 0.5) == (table["scdrugmap_pca_prediction"] == "sensitive")).all()


def test_predict_refuses_a_head_of_another_model(tmp_path):
    path = tmp_path / "d.h5ad"
    make_adata().write_h5ad(path)
    assert runner.invoke(app, ["train", str(path), "--model", "pca", "--out", str(tmp_path / "b"),
                               "--head", "logistic"]).exit_code == 0
    result = runner.invoke(app, ["predict", str(path), "--model", "hvg", "--head", str(tmp_path / "b")])
    assert result.exit_code != 0
    assert "trained on pca" in str(result.exception)


def test_benchmark_command_prints_summary_and_resumes(tmp_path):
    path = tmp_path / "d.h5ad"
    make_adata(n_cells=120, n_samples=12).write_h5ad(path)
    args = ["-q", "benchmark", "--data", str(path), "--models", "majority,pca", "--folds", "2",
            "--categories", "tissue", "--out", str(tmp_path / "run"), "--permutations", "2"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "AUROC" in first.output and "results.parquet" in first.output
    second = runner.invoke(app, args)
    assert second.exit_code == 0
    results = pd.read_parquet(tmp_path / "run" / "results.parquet")
    cells = results[results["level"] == "cell"]
    assert cells["key"].is_unique and np.isfinite(cells.loc[cells.status == "done", "auroc"]).all()
    assert "vs majority" in first.output and "Findings" in first.output and "sample level" in first.output
    assert "perm. p" in first.output


def test_unknown_model_is_one_clear_error(tmp_path):
    result = runner.invoke(app, ["models", "info", "nonesuch"])
    assert result.exit_code != 0 and "known models" in str(result.exception)


def test_baseline_bundle_maps_new_data_into_the_training_space(tmp_path):
    """PCA fitted on the training data is stored in the bundle, so new cells get the same components."""
    import anndata as ad

    from scdrugmap.models.baselines import PCAEncoder

    train_data = make_adata(n_cells=120, n_samples=12, seed=0)
    train_path = tmp_path / "train.h5ad"
    train_data.write_h5ad(train_path)
    assert runner.invoke(app, ["train", str(train_path), "--model", "pca", "--out", str(tmp_path / "b")]).exit_code == 0
    # predicting the training cells themselves, with genes shuffled, gives the training-space embedding
    shuffled = train_data[:, np.random.default_rng(0).permutation(train_data.n_vars)].copy()
    shuffled.write_h5ad(tmp_path / "shuffled.h5ad")
    assert runner.invoke(app, ["predict", str(tmp_path / "shuffled.h5ad"), "--model", "pca", "--head",
                               str(tmp_path / "b")]).exit_code == 0
    again = runner.invoke(app, ["predict", str(train_path), "--model", "pca", "--head", str(tmp_path / "b")])
    assert again.exit_code == 0
    first = ad.read_h5ad(tmp_path / "shuffled.predicted.h5ad").obs["scdrugmap_pca_prob_sensitive"]
    second = ad.read_h5ad(tmp_path / "train.predicted.h5ad").obs["scdrugmap_pca_prob_sensitive"]
    np.testing.assert_allclose(first.to_numpy(), second.to_numpy(), atol=1e-5)
    fitted = PCAEncoder().fit(train_data)
    other = make_adata(n_cells=40, n_samples=4, seed=3)
    assert fitted.embed(other).shape == (40, 50)


def test_models_list_shows_sizes_inputs_and_weight_state():
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "scgpt" in line)
    assert "51.3 M" in row and "512" in row and "out_proj" in row and "downloadable" in row
    assert "built in" in next(line for line in result.output.splitlines() if " pca " in line)


def _golden_scgpt(shared, tmp_path):
    """The scGPT golden cells (labelled), a copy with every other gene renamed to no known gene, and the weights."""
    from tests_helpers import golden_case

    adata, weights, _ = golden_case(shared, "scgpt")
    renamed = adata.copy()
    names = np.array(renamed.var_names, dtype=object)  # a copy: the Index is shared with adata
    names[::2] = [f"NOT_A_GENE_{j}" for j in range(0, names.size, 2)]
    renamed.var_names = names.astype(str)
    paths = tmp_path / "cells.h5ad", tmp_path / "renamed.h5ad"
    adata.write_h5ad(paths[0])
    renamed.write_h5ad(paths[1])
    return *paths, weights


def test_embed_writes_each_cells_gene_overlap_and_warns_about_low_overlap(shared, tmp_path):
    import anndata as ad

    from scdrugmap.commands import LOW_OVERLAP
    from scdrugmap.models.base import load_encoder

    cells, renamed, weights = _golden_scgpt(shared, tmp_path)
    result = runner.invoke(app, ["--quiet", "embed", str(renamed), "--model", "scgpt", "--weights", weights,
                                 "--out", str(tmp_path / "embedded.h5ad")])
    assert result.exit_code == 0, result.output
    written = ad.read_h5ad(tmp_path / "embedded.h5ad")
    encoder = load_encoder("scgpt", weights)
    expected = encoder.embed(ad.read_h5ad(renamed))
    np.testing.assert_allclose(written.obsm["X_scgpt"], expected, atol=1e-6)
    np.testing.assert_array_equal(written.obs["scgpt_gene_overlap"].to_numpy(), encoder.gene_overlap_)
    assert list(written.obs.columns[:-1]) == list(ad.read_h5ad(renamed).obs.columns), "other columns are kept"
    low = int((encoder.gene_overlap_ < LOW_OVERLAP).sum())
    assert 0 < low < written.n_obs
    median = float(np.median(encoder.gene_overlap_))
    line = f"{low} of {written.n_obs} cells have less than 50% of their expressed genes in scgpt's vocabulary"
    assert line in result.output and f"(median overlap {median:.2f};" in result.output, result.output

    clean = runner.invoke(app, ["--quiet", "embed", str(cells), "--model", "scgpt", "--weights", weights])
    assert clean.exit_code == 0, clean.output
    assert "0 of 48 cells have less than 50%" in clean.output
    assert ad.read_h5ad(cells).obs["scgpt_gene_overlap"].min() > 0.8


def test_embed_with_a_baseline_writes_no_gene_overlap(tmp_path):
    import anndata as ad

    path = tmp_path / "cells.h5ad"
    make_adata(n_cells=40).write_h5ad(path)
    result = runner.invoke(app, ["--quiet", "embed", str(path), "--model", "pca"])
    assert result.exit_code == 0, result.output
    assert "pca_gene_overlap" not in ad.read_h5ad(path).obs and "vocabulary" not in result.output


@pytest.mark.parametrize("strategy", ["frozen", "lora"])
def test_predict_adds_gene_overlap_to_obs_and_csv(strategy, shared, tmp_path):
    import anndata as ad

    cells, renamed, weights = _golden_scgpt(shared, tmp_path)
    trained = runner.invoke(app, ["train", str(cells), "--model", "scgpt", "--weights", weights, "--strategy",
                                  strategy, "--head", "logistic" if strategy == "frozen" else "mlp",
                                  "--out", str(tmp_path / "bundle")])
    assert trained.exit_code == 0, trained.output
    predicted = runner.invoke(app, ["predict", str(renamed), "--model", "scgpt", "--weights", weights,
                                    "--head", str(tmp_path / "bundle")])
    assert predicted.exit_code == 0, predicted.output
    table = pd.read_csv(tmp_path / "renamed.predicted.csv", index_col=0)
    written = ad.read_h5ad(tmp_path / "renamed.predicted.h5ad")
    overlap = written.obs["scgpt_gene_overlap"].to_numpy()
    np.testing.assert_allclose(table["gene_overlap"].to_numpy(), overlap, rtol=1e-6)
    assert ((overlap > 0) & (overlap < 1)).all()
    low = int((overlap < 0.5).sum())
    assert f"{low} of 48 cells have less than 50% of their expressed genes in scgpt's vocabulary" in predicted.output


# --- start-up: commands that run no network import no torch ---------------------------------------------------------

#: Runs the command line in a fresh interpreter and writes, at exit, whether torch, scikit-learn and pydantic were
#: imported (typer 0.29 and newer import pydantic to coerce every option: 0.2 s of each command's start).
TORCH_PROBE = ("import atexit, sys\n"
               "atexit.register(lambda: sys.stderr.write(f\"torch imported: {'torch' in sys.modules}\\n\"\n"
               "                                         f\"sklearn imported: {'sklearn' in sys.modules}\\n\"\n"
               "                                         f\"pydantic imported: {'pydantic' in sys.modules}\\n\"))\n"
               "from scdrugmap.cli import main\n"
               "sys.argv = ['scdrugmap', *sys.argv[1:]]\n"
               "main()\n")


def run_fresh(*args: str) -> subprocess.CompletedProcess:
    """Run ``scdrugmap ARGS`` in a fresh interpreter, so no test has imported torch into it."""
    return subprocess.run([sys.executable, "-c", TORCH_PROBE, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture
def small_h5ad(tmp_path):
    path = tmp_path / "cells.h5ad"
    make_adata().write_h5ad(path)
    return path


@pytest.mark.parametrize("args", [("--help",), ("check", "{h5ad}"), ("datasets", "list"), ("datasets", "show", "P07"),
                                  ("datasets", "simulate", "--cells", "60", "--genes", "40", "--out", "{tmp}/sim")],
                         ids=["help", "check", "datasets-list", "datasets-show", "datasets-simulate"])
def test_commands_without_a_network_never_import_torch(args, small_h5ad, tmp_path):
    args = [a.format(h5ad=small_h5ad, tmp=tmp_path) for a in args]
    done = run_fresh(*args)
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stderr and "pydantic imported: False" in done.stderr, done.stderr


@pytest.fixture(scope="module")
def pca_head(tmp_path_factory):
    """A pca head bundle (mlp, the default) with its calibration, conformal sets and OOD reference."""
    import scdrugmap as sdm

    folder = tmp_path_factory.mktemp("head") / "pca"
    sdm.tl.train(make_adata(n_cells=160, n_samples=16), "pca").save(folder)
    return folder


def test_predict_with_a_baseline_head_imports_neither_torch_nor_scikit_learn(pca_head, tmp_path):
    path = tmp_path / "new.h5ad"
    make_adata(n_cells=60, n_samples=6, seed=3).write_h5ad(path)
    done = run_fresh("predict", str(path), "--model", "pca", "--head", str(pca_head))
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stderr and "sklearn imported: False" in done.stderr, done.stderr
    assert "pydantic imported: False" in done.stderr, done.stderr
    assert len(pd.read_csv(tmp_path / "new.predicted.csv")) == 60


def test_predict_in_numpy_equals_scikit_learn_neighbours_and_crepes_sets(pca_head, monkeypatch):
    """The frozen-head path's numpy kNN and conformal p-values give what scikit-learn and crepes gave."""
    crepes = pytest.importorskip("crepes")
    from sklearn.neighbors import NearestNeighbors

    import scdrugmap as sdm
    from scdrugmap.train import conformal, ood

    adata = make_adata(n_cells=300, n_samples=10, seed=5)
    numpy_run = sdm.tl.predict(adata, str(pca_head), copy=True).obs

    def sklearn_distances(queries, reference, k):
        return NearestNeighbors(n_neighbors=k, algorithm="brute").fit(reference).kneighbors(queries)[0]

    def crepes_p_values(self, probabilities):
        p = conformal.class_probabilities(probabilities)
        out = np.full(p.shape, np.nan)
        finite = np.isfinite(p[:, 1])
        classifier = crepes.ConformalClassifier().fit(self.scores_, bins=self.labels_)
        for k in range(2):
            out[finite, k] = classifier.predict_p(1.0 - p[finite, k], bins=np.full(finite.sum(), k), smoothing=False)
        return out

    monkeypatch.setattr(ood, "nearest_distances", sklearn_distances)
    monkeypatch.setattr(conformal.MondrianConformal, "p_values", crepes_p_values)
    reference_run = sdm.tl.predict(adata, str(pca_head), copy=True).obs
    for column in numpy_run.columns[numpy_run.columns.str.startswith("scdrugmap_pca")]:
        if numpy_run[column].dtype.kind == "f":
            np.testing.assert_allclose(numpy_run[column], reference_run[column], rtol=0, atol=1e-6)
        else:
            assert (numpy_run[column].astype(str) == reference_run[column].astype(str)).all(), column


# --- imports with the garbage collector paused -----------------------------------------------------------------

def test_imports_settled_pauses_the_collector_then_freezes_what_was_imported(monkeypatch):
    import gc

    from scdrugmap import startup

    monkeypatch.setitem(startup.SETTLED, "done", False)
    frozen = gc.get_freeze_count()
    try:
        with startup.imports_settled():
            assert not gc.isenabled()
            made = [[] for _ in range(1000)]  # objects the imports would have made
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(made)
        frozen = gc.get_freeze_count()
        with startup.imports_settled():  # once per process: later commands import nothing new
            assert gc.isenabled()
            made = [[] for _ in range(1000)]
        assert gc.get_freeze_count() <= frozen  # nothing more frozen
        monkeypatch.setitem(startup.SETTLED, "done", False)
        gc.disable()
        with startup.imports_settled():
            pass
        assert not gc.isenabled()  # a collector paused by the caller stays paused
    finally:
        gc.enable()
        gc.unfreeze()
