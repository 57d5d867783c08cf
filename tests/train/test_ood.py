import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from scdrugmap.data.simulate import simulate_collection
from scdrugmap.errors import CheckpointError, SchemaError
from scdrugmap.models.baselines import PCAEncoder
from scdrugmap.train._trust import join_state, split_state
from scdrugmap.train.ood import REASON_NOT_READ, OutOfDistributionDetector, nearest_distances


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
    """Keep BLAS to one thread: on a busy machine its threads fight each other (a 10x slower PCA seen)."""
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def study_cells(_one_blas_thread):
    """Embeddings of one simulated study (training patients, held-out patients) and of a batch-shifted copy.

    The shifted study is the held-out patients' cells again, each gene's counts scaled by a study factor
    exp(N(0, 1)) and redrawn (Poisson): the same biology under a strong batch effect, nothing else. All
    cells are embedded by the project's PCA baseline (50 components, fitted on every cell, no labels).
    """
    adata = simulate_collection(6_000, n_genes=500, seed=0)
    rng = np.random.default_rng(0)
    study = adata.obs["study"].value_counts().index[0]
    in_study = (adata.obs["study"] == study).to_numpy()
    samples = np.sort(adata.obs.loc[in_study, "sample"].unique())
    held_out = in_study & adata.obs["sample"].isin(samples[::4]).to_numpy()
    train = in_study & ~held_out
    counts = adata.X[held_out].toarray()
    shifted = rng.poisson(counts * np.exp(rng.normal(0.0, 1.0, counts.shape[1]))).astype(np.float32)
    both = ad.AnnData(sp.vstack([adata.X, sp.csr_matrix(shifted)]).tocsr(), var=adata.var)
    embeddings = PCAEncoder(n_components=50).fit(both).embed(both)
    return {"train": embeddings[: adata.n_obs][train], "held_out": embeddings[: adata.n_obs][held_out],
            "shifted": embeddings[adata.n_obs :], "other_studies": embeddings[: adata.n_obs][~in_study]}


def test_a_batch_shifted_study_is_flagged_and_held_out_patients_of_the_training_study_are_not(study_cells):
    detector = OutOfDistributionDetector().fit(study_cells["train"])
    held_out = detector.score_cells(study_cells["held_out"])
    shifted = detector.score_cells(study_cells["shifted"])
    assert held_out.flagged.mean() <= 0.10
    assert shifted.flagged.mean() >= 0.80
    assert np.median(shifted.score) > 1.0 > np.median(held_out.score)
    assert all("quantile of nearest-neighbour distance" in r for r in shifted.reason[shifted.flagged])
    assert set(held_out.reason[~held_out.flagged]) == {""}
    # studies of other tissues and cancer types differ in more than batch: far more of them are flagged
    assert detector.score_cells(study_cells["other_studies"]).flagged.mean() > 3 * held_out.flagged.mean()


def _gaussian(n, d=8, seed=0, shift=0.0):
    return np.random.default_rng(seed).normal(shift, 1.0, (n, d))


def test_cells_of_the_training_distribution_are_flagged_at_about_one_minus_the_quantile():
    detector = OutOfDistributionDetector().fit(_gaussian(2000))
    flagged = detector.score_cells(_gaussian(4000, seed=1)).flagged.mean()
    assert 0.002 < flagged < 0.03


def test_cells_the_model_could_not_read_get_a_nan_score_and_a_flag():
    detector = OutOfDistributionDetector().fit(_gaussian(300))
    embeddings = _gaussian(4, seed=1)
    embeddings[1, 3] = np.nan
    embeddings[2, 0] = np.inf
    result = detector.score_cells(embeddings)
    assert np.isnan(result.score[[1, 2]]).all() and np.isfinite(result.score[[0, 3]]).all()
    assert result.flagged[[1, 2]].all()
    assert result.reason[1] == REASON_NOT_READ


def test_low_gene_overlap_is_flagged_with_its_value():
    detector = OutOfDistributionDetector().fit(_gaussian(300))
    cells = _gaussian(3, seed=1)
    result = detector.score_cells(cells, gene_overlap=[0.9, 0.3, np.nan])
    assert result.flagged.tolist() == [False, True, False]
    assert result.reason[1] == "gene overlap 0.30 is below 0.5"
    assert detector.score_cells(cells, gene_overlap=0.2).flagged.all()
    assert not detector.score_cells(cells).flagged.any()
    with pytest.raises(SchemaError, match="one per cell \\(3\\)"):
        detector.score_cells(cells, gene_overlap=[0.9, 0.3])
    with pytest.raises(SchemaError, match="\\[1.5\\]"):
        detector.score_cells(cells, gene_overlap=1.5)


def test_reasons_combine_when_a_cell_is_far_and_its_genes_are_few():
    detector = OutOfDistributionDetector().fit(_gaussian(300))
    result = detector.score_cells(_gaussian(1, seed=1, shift=8.0), gene_overlap=0.1)
    assert "nearest-neighbour distance" in result.reason[0] and "gene overlap 0.10" in result.reason[0]


def test_the_reference_is_a_seeded_sample_of_at_most_max_reference_cells():
    training = _gaussian(700)
    detector = OutOfDistributionDetector(max_reference_cells=200, seed=3).fit(training)
    again = OutOfDistributionDetector(max_reference_cells=200, seed=3).fit(training)
    other = OutOfDistributionDetector(max_reference_cells=200, seed=4).fit(training)
    assert detector.reference_.shape == (200, 8) and detector.reference_.dtype == np.float32
    assert np.array_equal(detector.reference_, again.reference_)
    assert not np.array_equal(detector.reference_, other.reference_)
    assert detector.n_training_cells_ == 700


def test_training_distances_leave_each_cell_out():
    training = np.vstack([_gaussian(50), _gaussian(1, seed=9)])
    detector = OutOfDistributionDetector(n_neighbors=1).fit(training)
    assert (detector.reference_distances_ > 0).all()  # a cell is never its own neighbour


def test_scores_do_not_depend_on_the_units_of_the_embedding():
    training, cells = _gaussian(300), _gaussian(20, seed=1, shift=0.5)
    base = OutOfDistributionDetector().fit(training).score_cells(cells).score
    assert np.allclose(OutOfDistributionDetector().fit(1000 * training).score_cells(1000 * cells).score, base, rtol=1e-4)
    stretch = np.ones(8)
    stretch[0] = 1000.0
    per_dimension = OutOfDistributionDetector(scaling="dimension")
    assert np.allclose(per_dimension.fit(training * stretch).score_cells(cells * stretch).score,
                       OutOfDistributionDetector(scaling="dimension").fit(training).score_cells(cells).score, rtol=1e-4)


def test_small_or_broken_training_sets():
    training = _gaussian(4)
    training_with_nan = np.vstack([training, np.full((1, 8), np.nan)])
    detector = OutOfDistributionDetector().fit(training_with_nan)
    assert detector.k_ == 3
    assert "3 neighbours instead of 10" in detector.reason_ and "1 training cells with non-finite" in detector.reason_
    with pytest.raises(SchemaError, match="at least 2"):
        OutOfDistributionDetector().fit(_gaussian(1))
    with pytest.raises(SchemaError, match="margin=0"):
        OutOfDistributionDetector(margin=0).fit(training)


def test_embeddings_of_another_width_are_refused():
    detector = OutOfDistributionDetector().fit(_gaussian(50))
    with pytest.raises(SchemaError, match="has 5 dimensions but the head's training cells had 8"):
        detector.score_cells(_gaussian(3, d=5))


def test_state_round_trip_gives_identical_outputs():
    detector = OutOfDistributionDetector(max_reference_cells=100, margin=1.2).fit(_gaussian(300))
    arrays, facts = split_state(detector.state(), "ood")
    assert set(arrays) == {"ood.mean", "ood.scale", "ood.reference", "ood.reference_distances"}
    again = OutOfDistributionDetector.from_state(join_state(arrays, facts, "ood"))
    cells = np.vstack([_gaussian(50, seed=1), _gaussian(5, seed=2, shift=4.0)])
    first, second = detector.score_cells(cells, gene_overlap=0.7), again.score_cells(cells, gene_overlap=0.7)
    for field in ("score", "distance", "flagged", "reason"):
        assert np.array_equal(getattr(first, field), getattr(second, field)), field
    state = detector.state()
    del state["reference"], state["threshold"]
    with pytest.raises(CheckpointError, match="lacks \\['reference', 'threshold'\\]"):
        OutOfDistributionDetector.from_state(state)


@pytest.mark.parametrize(("n_reference", "k"), [(600, 10), (11, 10), (3, 2)])
def test_nearest_distances_equal_scikit_learn_brute_force_neighbours(n_reference, k):
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(n_reference)
    reference = rng.normal(size=(n_reference, 20)).astype(np.float32)
    queries = np.vstack([reference[:2], rng.normal(size=(700, 20))]).astype(np.float32)  # duplicates: distance 0
    expected, _ = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(reference).kneighbors(queries)
    np.testing.assert_allclose(nearest_distances(queries, reference, k), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("n_reference", "k"), [(300, 10), (11, 10), (3, 2)])
def test_leave_one_out_distances_equal_scikit_learn_kneighbors_without_queries(n_reference, k):
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(n_reference)
    reference = rng.normal(size=(n_reference, 20)).astype(np.float32)
    reference[-1] = reference[0]  # a duplicate still counts, at distance 0; only the cell itself is left out
    expected, _ = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(reference).kneighbors()
    np.testing.assert_allclose(nearest_distances(reference, reference, k, leave_one_out=True), expected,
                               rtol=0, atol=1e-6)


def test_fit_distances_equal_scikit_learn_kneighbors_of_the_reference():
    from sklearn.neighbors import NearestNeighbors

    detector = OutOfDistributionDetector(max_reference_cells=400).fit(_gaussian(700, d=30))
    expected, _ = NearestNeighbors(n_neighbors=detector.k_, algorithm="brute").fit(detector.reference_).kneighbors()
    np.testing.assert_allclose(detector.reference_distances_, expected.mean(axis=1), rtol=0, atol=1e-6)
    assert detector.threshold_ == pytest.approx(np.quantile(expected.mean(axis=1), detector.quantile), abs=1e-6)


def _brute_force_distances(queries, reference, k, *, leave_one_out=False):
    """Every squared distance in float64 (the arithmetic of scikit-learn's brute force), sorted: the k smallest."""
    queries, reference = np.asarray(queries, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    squared = (np.einsum("ij,ij->i", queries, queries)[:, None] + np.einsum("ij,ij->i", reference, reference)
               - 2.0 * queries @ reference.T)
    if leave_one_out:
        np.fill_diagonal(squared, np.inf)
    return np.sqrt(np.maximum(np.sort(squared, axis=1)[:, :k], 0.0))


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4, 1e18])
def test_nearest_distances_equal_float64_brute_force_on_clustered_cells_with_ties(scale):
    """The float32 screen never loses a neighbour: clusters, exact duplicates, a shell of equidistant cells,
    float64 queries that float32 rounds, and magnitudes float32 cannot hold (screened in float64)."""
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(5, 12))
    reference = np.vstack([centres[rng.integers(0, 5, 400)] + rng.normal(0.0, 0.01, (400, 12)),
                           np.repeat(centres[:1], 30, axis=0)])  # 30 identical cells
    shell = rng.normal(size=(200, 12))
    shell = centres[1] + 0.5 * shell / np.linalg.norm(shell, axis=1, keepdims=True)  # one distance from centres[1]
    reference = np.vstack([reference, shell]) * scale
    queries = np.vstack([centres, rng.normal(size=(300, 12))]) * scale + rng.normal(0.0, 1e-9 * scale, (305, 12))
    for k in (1, 10, 64):
        np.testing.assert_allclose(nearest_distances(queries, reference, k), _brute_force_distances(queries, reference, k),
                                   rtol=1e-9, atol=1e-6 * scale)
        np.testing.assert_allclose(nearest_distances(reference, reference, k, leave_one_out=True),
                                   _brute_force_distances(reference, reference, k, leave_one_out=True),
                                   rtol=1e-9, atol=1e-6 * scale)


def test_nearest_distances_of_a_query_with_a_non_finite_value_are_nan():
    rng = np.random.default_rng(0)
    reference, queries = rng.normal(size=(50, 4)), rng.normal(size=(3, 4))
    queries[1, 2] = np.nan
    distances = nearest_distances(queries, reference, 5)
    assert np.isnan(distances[1]).all()
    np.testing.assert_allclose(distances[[0, 2]], _brute_force_distances(queries[[0, 2]], reference, 5), atol=1e-9)


def test_nearest_distances_refuse_too_many_neighbours_and_a_broken_reference():
    reference = _gaussian(5)
    with pytest.raises(SchemaError, match="k=5 nearest neighbours asked of 4 reference cells"):
        nearest_distances(reference, reference, 5, leave_one_out=True)
    with pytest.raises(SchemaError, match="k=0"):
        nearest_distances(reference, reference, 0)
    reference[2, 1] = np.inf
    with pytest.raises(SchemaError, match="non-finite"):
        nearest_distances(_gaussian(2), reference, 2)
