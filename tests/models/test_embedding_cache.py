"""The embedding cache: a miss streamed into the file block by block, a hit read by rows without loading it."""

import numpy as np
import pytest

from scdrugmap.data.io import data_fingerprint, read_h5ad
from scdrugmap.models.baselines import HVGEncoder, MajorityEncoder, PCAEncoder
from scdrugmap.models.cache import EmbeddingFile, cached_embed
from tests_helpers import write_tiny_h5ad


def test_an_embedding_file_reads_slices_and_positions_in_any_order_as_the_array(tmp_path):
    values = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
    np.save(tmp_path / "e.npy", values)
    stored = EmbeddingFile(tmp_path / "e.npy")
    assert stored.shape == (50, 7) and len(stored) == 50 and stored.nbytes == values.nbytes
    np.testing.assert_array_equal(stored[10:23], values[10:23])
    np.testing.assert_array_equal(stored[45:99], values[45:])
    positions = np.array([49, 0, 1, 2, 30, 31, 7, 7])  # runs, a repeat, unsorted
    np.testing.assert_array_equal(stored[positions], values[positions])
    np.testing.assert_array_equal(stored.read_sorted(np.array([3, 4, 5, 40])), values[[3, 4, 5, 40]])
    np.testing.assert_array_equal(stored.load(), values)
    with pytest.raises(IndexError, match="out of range"):
        stored.read_sorted(np.array([2, 50]))


def test_an_embedding_file_refuses_what_is_not_a_cells_by_dim_array(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="cells x dim"):
        EmbeddingFile(tmp_path / "flat.npy")


@pytest.mark.parametrize("encoder_class", [HVGEncoder, PCAEncoder, MajorityEncoder])
def test_a_baseline_miss_streamed_into_the_cache_equals_its_embedding_and_a_hit_reads_it_back(
        tmp_path, monkeypatch, encoder_class):
    monkeypatch.setenv("SCDRUGMAP_HOME", str(tmp_path / "home"))
    adata = read_h5ad(write_tiny_h5ad(tmp_path), backed=True)
    kwargs = {"n_top_genes": 30} if encoder_class is not MajorityEncoder else {}
    encoder = encoder_class(**kwargs)
    expected = encoder.embed(adata)
    fingerprint = data_fingerprint(adata)
    if encoder_class is not MajorityEncoder:  # streamed block by block, never through the whole array
        monkeypatch.setattr(encoder, "embed", lambda *a, **k: pytest.fail("embed() was called"))
    streamed, facts = cached_embed(encoder, adata, data_fingerprint=fingerprint, in_memory=False)
    assert isinstance(streamed, EmbeddingFile) and facts["cache"] == "miss"
    assert streamed.shape == expected.shape and facts["dim"] == expected.shape[1]
    np.testing.assert_array_equal(streamed.load(), expected)  # the same values, not merely close
    again, facts = cached_embed(encoder, adata, data_fingerprint=fingerprint)
    assert facts["cache"] == "hit" and isinstance(again, np.ndarray)
    np.testing.assert_array_equal(again, expected)
    assert not list((tmp_path / "home").rglob("*.tmp.npy"))
