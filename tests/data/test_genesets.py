"""GMT reading and writing, and the simulator's planted programs written as a GMT beside its h5ad."""

from __future__ import annotations

import pytest

from scdrugmap.data.genesets import read_gmt, write_gmt
from scdrugmap.data.simulate import (
    RESISTANCE_DOWN_SET,
    RESISTANCE_UP_SET,
    simulate_collection,
    simulated_gene_sets,
)
from scdrugmap.errors import SchemaError


def test_gmt_round_trip_keeps_order_names_and_genes(tmp_path):
    sets = {"UP": ["ABCB1", "AXL"], "DOWN": ["BAX"], "EMPTY_DESCRIPTION": ["CD3D", "CD3E", "CD2"]}
    path = write_gmt(sets, tmp_path / "sets.gmt", descriptions={"UP": "up in resistant"})
    assert read_gmt(path) == sets
    assert path.read_text().splitlines()[0] == "UP\tup in resistant\tABCB1\tAXL"


def test_gmt_reader_skips_comments_and_trailing_tabs_and_drops_repeated_genes(tmp_path):
    path = tmp_path / "msigdb.gmt"
    path.write_text("# a comment\n\nHALLMARK_X\thttp://example.org\tA\tB\tA\t\t\n")
    assert read_gmt(path) == {"HALLMARK_X": ["A", "B"]}


@pytest.mark.parametrize(("text", "message"), [("SET_ONLY\tdescription\n", "at least one gene"),
                                                ("S\td\tA\nS\td\tB\n", "appears twice"),
                                                ("", "no gene set")])
def test_malformed_gmt_is_refused_naming_the_line(tmp_path, text, message):
    path = tmp_path / "bad.gmt"
    path.write_text(text)
    with pytest.raises(SchemaError, match=message):
        read_gmt(path)
    with pytest.raises(SchemaError, match="no such gene-set file"):
        read_gmt(tmp_path / "missing.gmt")


def test_simulated_gene_sets_are_the_planted_program_split_by_direction(shared):
    catalog = shared("catalog", "datasets.csv")
    adata = simulate_collection(200, n_genes=400, seed=3, catalog_path=catalog)
    sets = simulated_gene_sets(n_genes=400, seed=3, catalog_path=catalog)
    planted = set(adata.uns["scdrugmap"]["simulation"]["resistance_genes"])
    assert set(sets[RESISTANCE_UP_SET]) | set(sets[RESISTANCE_DOWN_SET]) == planted
    assert not set(sets[RESISTANCE_UP_SET]) & set(sets[RESISTANCE_DOWN_SET])
    assert {"ABCB1", "AXL"} <= set(sets[RESISTANCE_UP_SET]) and {"BAX", "BBC3"} <= set(sets[RESISTANCE_DOWN_SET])
    assert all(set(genes) <= set(adata.var_names) for genes in sets.values())
    assert sets == simulated_gene_sets(n_genes=400, seed=3, catalog_path=catalog, collection="primary")


def test_streamed_simulation_writes_its_programs_as_a_gmt_beside_the_h5ad(shared, tmp_path):
    catalog = shared("catalog", "datasets.csv")
    path = simulate_collection(100, n_genes=300, seed=2, catalog_path=catalog, out_path=tmp_path / "demo.h5ad")
    assert read_gmt(tmp_path / "demo.gmt") == simulated_gene_sets(n_genes=300, seed=2, catalog_path=catalog)
    assert path == tmp_path / "demo.h5ad"
