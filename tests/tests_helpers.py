"""Small helpers shared by tests (not fixtures)."""

from conftest import make_adata


def write_tiny_h5ad(folder, name="tiny.h5ad", seed=0):
    path = folder / name
    make_adata(n_cells=120, n_samples=12, seed=seed).write_h5ad(path)
    return path
