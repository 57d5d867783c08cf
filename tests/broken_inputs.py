"""Broken inputs, made in code: the corpus every command must refuse with one line (tests/test_corpus.py).

Each maker writes into a folder and returns the path to pass to the command. The large ones cost
almost nothing on disk: they *declare* huge matrices whose chunks are never written.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from tests_helpers import make_adata


def _write(adata, path: Path) -> Path:
    adata.write_h5ad(path)
    return path


def write_declared_h5ad(path: Path, n_obs: int, n_vars: int, *, fill: float = 1.0, chunk: int = 1000) -> Path:
    """Write an .h5ad whose dense chunked X declares ``n_obs x n_vars`` float32 values, none written (``fill``).

    Names are real (``c0``..., ``G0``...), so only the matrix is a lie: 25,000 x 20,000 is a 1.8 MB file.
    """
    from anndata.io import write_elem

    with h5py.File(path, "w") as handle:
        handle.attrs["encoding-type"] = "anndata"
        handle.attrs["encoding-version"] = "0.1.0"
        for name, n, prefix in (("obs", n_obs, "c"), ("var", n_vars, "G")):
            group = handle.create_group(name)
            group.attrs.update({"_index": "_index", "column-order": np.array([], dtype=float),
                                "encoding-type": "dataframe", "encoding-version": "0.2.0"})
            names = np.char.add(prefix, np.arange(n).astype(str)).astype(object)
            index = group.create_dataset("_index", data=names, dtype=h5py.string_dtype())
            index.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
        handle.create_dataset("X", shape=(n_obs, n_vars), dtype="float32",
                              chunks=(min(n_obs, chunk), min(n_vars, chunk)), fillvalue=fill)
        for name in ("obsm", "varm", "layers", "obsp", "varp", "uns"):
            write_elem(handle, name, {})
    return path


def memory_bomb(folder: Path) -> Path:
    """25,000 x 20,000 declared, never written, fill value 1: 1.8 MB on disk, 2 GB dense, 16 GB in a model."""
    return write_declared_h5ad(folder / "bomb.h5ad", 25_000, 20_000)


def four_terabytes(folder: Path) -> Path:
    """1,000,000 cells x 1,000,000 genes of float32 declared (4 TB), unwritten chunks reading as 0 (legal HDF5)."""
    return write_declared_h5ad(folder / "huge.h5ad", 1_000_000, 1_000_000, fill=0.0, chunk=4096)


def _edit(folder: Path, name: str, change) -> Path:
    path = _write(make_adata(), folder / name)
    with h5py.File(path, "a") as handle:
        change(handle)
    return path


def _adata_with(change):
    adata = make_adata()
    change(adata)
    return adata


def _set_value(value):
    def change(adata):
        X = adata.X.toarray()
        X[3, 2] = value
        adata.X = X
    return change


def _no_cells(folder: Path) -> Path:
    return _write(make_adata()[:0].copy(), folder / "no_cells.h5ad")


def _no_genes(folder: Path) -> Path:
    return _write(make_adata()[:, :0].copy(), folder / "no_genes.h5ad")


def _duplicate_cells(adata):
    adata.obs_names = ["same"] * 2 + list(adata.obs_names[2:])


def _duplicate_genes(adata):
    adata.var_names = ["TP53", "TP53"] + list(adata.var_names[2:])


def _markup_names(adata):
    adata.var_names = ["[/x]", "[/x]", "[bold]"] + list(adata.var_names[3:])


def _unknown_encoding(element: str):
    def change(handle):
        if element == "uns":
            group = handle["uns"].create_group("foo")
            group.attrs.update({"encoding-type": "weird-thing", "encoding-version": "9.9.9"})
        else:
            handle[element].attrs["encoding-type"] = "fancy_matrix"
            handle[element].attrs["encoding-version"] = "0.1.0"
    return change


def _obs_mismatch(handle):
    names = handle["obs/_index"][:10]
    del handle["obs"]
    group = handle.create_group("obs")
    group.attrs.update({"_index": "_index", "column-order": np.array([], dtype=float),
                        "encoding-type": "dataframe", "encoding-version": "0.2.0"})
    index = group.create_dataset("_index", data=names, dtype=h5py.string_dtype())
    index.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})


def _bad_indptr(handle):
    pointers = handle["X/indptr"][:]
    pointers[5] = pointers[-1] + 100
    handle["X/indptr"][...] = pointers


def _indices_out_of_range(handle):
    indices = handle["X/indices"][:]
    indices[7] = 10_000
    handle["X/indices"][...] = indices


def _string_matrix(handle):
    del handle["X"]
    text = np.full((80, len(handle["var/_index"])), "abc", dtype=object)
    dataset = handle.create_dataset("X", data=text, dtype=h5py.string_dtype())
    dataset.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})


def _external_link(handle):
    handle["uns"]["secret"] = h5py.ExternalLink("/etc/passwd", "/")


def _three_dimensional(handle):
    del handle["X"]
    dataset = handle.create_dataset("X", data=np.ones((80, len(handle["var/_index"]), 2), dtype=np.float32))
    dataset.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})


def _unwritten_uns(handle):
    handle["uns"].create_dataset("big", shape=(50_000, 50_000), dtype="float64", chunks=(1000, 1000), fillvalue=7.0)


def _empty_file(folder: Path) -> Path:
    path = folder / "empty.h5ad"
    path.write_bytes(b"")
    return path


def _text_file(folder: Path) -> Path:
    path = folder / "cells.h5ad"
    path.write_text("cell,gene\n1,2\n")
    return path


def _truncated(folder: Path) -> Path:
    path = _write(make_adata(), folder / "whole.h5ad")
    data = path.read_bytes()
    path.unlink()
    cut = folder / "truncated.h5ad"
    cut.write_bytes(data[: len(data) // 2])
    return cut


def _plain_hdf5(folder: Path) -> Path:
    path = folder / "plain.h5ad"
    with h5py.File(path, "w") as handle:
        handle["numbers"] = np.arange(10)
    return path


def _missing(folder: Path) -> Path:
    return folder / "nope.h5ad"


def _folder(folder: Path) -> Path:
    path = folder / "a_folder.h5ad"
    path.mkdir()
    return path


def _markup_path(folder: Path) -> Path:
    """A file whose path reads ``.../[red]/nan[/x].h5ad`` (``[/x]`` spans a folder and the file name)."""
    inner = folder / "[red]" / "nan["
    inner.mkdir(parents=True)
    return _write(_adata_with(_set_value(np.nan)), inner / "x].h5ad")


def _markup_label(adata):
    adata.obs["response"] = ["[/x]"] * adata.n_obs


#: kind -> (maker(folder) -> path, commands it applies to, extra options per command).
#: Commands: check, embed, benchmark, predict. Options "MODEL" stand for a model that needs counts.
H5AD_KINDS: dict[str, tuple] = {
    "missing file": (_missing, "all"),
    "a folder": (_folder, "all"),
    "empty file": (_empty_file, "all"),
    "text, not HDF5": (_text_file, "all"),
    "truncated h5ad": (_truncated, "all"),
    "HDF5 but not AnnData": (_plain_hdf5, "all"),
    "zero cells": (_no_cells, "all"),
    "zero genes": (_no_genes, "all"),
    "NaN in X": (lambda f: _write(_adata_with(_set_value(np.nan)), f / "nan.h5ad"), "all"),
    "inf in X": (lambda f: _write(_adata_with(_set_value(np.inf)), f / "inf.h5ad"), "all"),
    "negative values for a counts model": (lambda f: _write(_adata_with(_set_value(-3.0)), f / "negative.h5ad"),
                                           ("check", "embed", "benchmark")),
    "duplicate cell names": (lambda f: _write(_adata_with(_duplicate_cells), f / "dup_cells.h5ad"), "all"),
    "duplicate gene names": (lambda f: _write(_adata_with(_duplicate_genes), f / "dup_genes.h5ad"), "all"),
    "unknown encoding in uns": (lambda f: _edit(f, "enc_uns.h5ad", _unknown_encoding("uns")), "all"),
    "unknown encoding of X": (lambda f: _edit(f, "enc_x.h5ad", _unknown_encoding("X")), "all"),
    "memory bomb 25,000 x 20,000": (memory_bomb, "all"),
    "4 TB declared": (four_terabytes, "all"),
    "unwritten values in uns": (lambda f: _edit(f, "uns_bomb.h5ad", _unwritten_uns), "all"),
    "obs shorter than X": (lambda f: _edit(f, "obs_short.h5ad", _obs_mismatch), "all"),
    "damaged CSR pointers": (lambda f: _edit(f, "indptr.h5ad", _bad_indptr), "all"),
    "CSR indices out of range": (lambda f: _edit(f, "indices.h5ad", _indices_out_of_range), "all"),
    "text values in X": (lambda f: _edit(f, "strings.h5ad", _string_matrix), "all"),
    "3-D X": (lambda f: _edit(f, "three_d.h5ad", _three_dimensional), "all"),
    "external link": (lambda f: _edit(f, "link.h5ad", _external_link), "all"),
    "[/x] in the path": (_markup_path, "all"),
    "[/x] in gene names": (lambda f: _write(_adata_with(_markup_names), f / "markup_genes.h5ad"), "all"),
    "[/x] as a label": (lambda f: _write(_adata_with(_markup_label), f / "markup_label.h5ad"), ("check", "benchmark")),
    "over --max-memory": (lambda f: _write(make_adata(), f / "fine.h5ad"), "all"),
    "missing layer": (lambda f: _write(make_adata(), f / "fine.h5ad"), "all"),
}
#: Options a kind adds to every command.
KIND_OPTIONS = {"over --max-memory": ["--max-memory", "4K"], "missing layer": ["--layer", "nope"]}
#: Kinds whose problem only a model that needs raw counts sees.
COUNTS_MODEL_KINDS = {"negative values for a counts model"}


# --- scDrugMap distribution files (datasets import) ---------------------------------------------------------

GOOD_TSV = "cell\tCondition\tTP53\tEGFR\nc1\tsensitive\t1\t0\nc2\tresistant\t0\t2\n"

TSV_KINDS: dict[str, bytes] = {
    "empty TSV": b"",
    "header-only TSV": b"cell\tCondition\tTP53\tEGFR\n",
    "ragged TSV row": b"cell\tCondition\tTP53\tEGFR\nc1\tsensitive\t1\t0\nc2\tresistant\t0\t2\t5\t6\n",
    "short TSV row": b"cell\tCondition\tTP53\tEGFR\nc1\tsensitive\t1\t0\nc2\tresistant\t0\n",
    "non-UTF8 TSV": b"cell\tCondition\tTP53\tEGFR\nc1\tsensitive\t1\t0\nc\xe9\xff2\tresistant\t0\t2\n",
    "non-numeric TSV value": b"cell\tCondition\tTP53\tEGFR\nc1\tsensitive\t1\tlots\nc2\tresistant\t0\t2\n",
    "TSV without Condition": b"cell\tTP53\tEGFR\nc1\t1\t0\n",
    "unknown TSV label": b"cell\tCondition\tTP53\tEGFR\nc1\tmaybe\t1\t0\nc2\tresistant\t0\t2\n",
    "inf in TSV": b"cell\tCondition\tTP53\tEGFR\nc1\tsensitive\tinf\t0\nc2\tresistant\t0\t2\n",
    "duplicate TSV gene column": b"cell\tCondition\tTP53\tTP53\nc1\tsensitive\t1\t0\nc2\tresistant\t0\t2\n",
    "duplicate TSV cell id": b"cell\tCondition\tTP53\tEGFR\nc1\tsensitive\t1\t0\nc1\tresistant\t0\t2\n",
}


def write_tsv_folder(folder: Path, kind: str) -> Path:
    """Write a distribution folder whose first file is good and whose second is broken as ``kind``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "A_good.tsv").write_text(GOOD_TSV)
    (folder / "B_broken.tsv").write_bytes(TSV_KINDS[kind])
    return folder


def tiny_frame() -> pd.DataFrame:
    return pd.read_csv(pd.io.common.StringIO(GOOD_TSV), sep="\t", index_col=0)
