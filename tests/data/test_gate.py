"""The validation gate (`scdrugmap.data.gate`): the budget, the two steps, and the same code as `check`."""

from __future__ import annotations

import resource

import numpy as np
import pytest

from broken_inputs import write_declared_h5ad
from scdrugmap.data import gate
from scdrugmap.data.check import check_adata
from scdrugmap.errors import SchemaError
from tests_helpers import make_adata


@pytest.mark.parametrize(("text", "expected"), [("8G", 8 * 2**30), ("512MiB", 512 * 2**20), ("2.5GB", int(2.5 * 2**30)),
                                                ("4096", 4096), ("1e3k", 1000 * 1024), (1234, 1234)])
def test_memory_sizes_are_read_like_a_person_writes_them(text, expected):
    assert gate.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1G", "0", "nan"])
def test_a_memory_size_that_is_not_one_is_refused(text):
    with pytest.raises(SchemaError, match="not a size"):
        gate.parse_memory(text)


def test_the_default_budget_follows_the_environment_and_the_address_space_limit(monkeypatch):
    monkeypatch.setenv(gate.MEMORY_ENV, "3G")
    assert gate.default_memory_budget() == 3 * 2**30
    monkeypatch.delenv(gate.MEMORY_ENV)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (2**30, hard) if which == resource.RLIMIT_AS
                        else (soft, hard))
    assert gate.default_memory_budget() <= int(2**30 * gate.AVAILABLE_SHARE)


def test_a_good_file_passes_with_its_facts(tmp_path):
    path = tmp_path / "cells.h5ad"
    make_adata().write_h5ad(path)
    facts = gate.validate_input(path, needs="counts", max_memory="1G")
    assert (facts.n_obs, facts.n_vars, facts.layout, facts.value_kind) == (80, 75, "csr", "counts")
    assert 0 < facts.needed_bytes < facts.budget_bytes == 2**30


def test_holding_the_matrix_needs_more_than_streaming_it(tmp_path):
    path = tmp_path / "cells.h5ad"
    make_adata(n_cells=400).write_h5ad(path)
    streamed = gate.inspect_h5ad(path, in_memory=False, max_memory="1G")
    held = gate.inspect_h5ad(path, in_memory=True, max_memory="1G")
    assert held.needed_bytes > streamed.needed_bytes + (gate.LOAD_FACTOR - 1) * held.matrix_bytes * 0.9
    with pytest.raises(SchemaError, match="more than the memory budget"):
        gate.inspect_h5ad(path, in_memory=True, max_memory=held.needed_bytes - 1)
    assert gate.inspect_h5ad(path, in_memory=False, max_memory=held.needed_bytes - 1)


def test_unwritten_zeros_are_data_but_a_dense_x_no_command_can_hold_is_refused(tmp_path):
    path = write_declared_h5ad(tmp_path / "zeros.h5ad", 200, 100, fill=0.0)
    assert gate.inspect_h5ad(path, in_memory=False, max_memory="1G").n_obs == 200
    with pytest.raises(SchemaError, match="no command can hold it"):
        gate.inspect_h5ad(path, in_memory=False, max_memory=200 * 100 * 4 - 1)


def test_the_gate_and_check_report_the_same_problem(tmp_path):
    adata = make_adata()
    X = adata.X.toarray()
    X[1, 1] = np.nan
    adata.X = X
    report = check_adata(adata, source="cells.h5ad")
    with pytest.raises(SchemaError) as refused:
        gate.validate_input(adata, source="cells.h5ad")
    assert str(refused.value) == f"cells.h5ad: {report.errors[0].where}: {report.errors[0].message}"


def test_tl_functions_run_the_gate_first():
    import scdrugmap as sdm

    adata = make_adata()
    adata.var_names = ["TP53"] * 2 + list(adata.var_names[2:])
    for call in (lambda: sdm.tl.embed(adata, "pca"), lambda: sdm.tl.train(adata, "pca")):
        with pytest.raises(SchemaError, match="duplicate gene names"):
            call()
    with pytest.raises(SchemaError, match="expected an AnnData"):
        sdm.tl.embed(np.zeros((3, 3)), "pca")
