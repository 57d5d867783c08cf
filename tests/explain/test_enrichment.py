"""Enrichment: hypergeometric ORA by hand, GSEA preranked, and the simulator's planted program ranking first."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
from scipy.stats import hypergeom

pytest.importorskip("gseapy")
pytest.importorskip("pydeseq2")

from explain_helpers import DE_COLLECTION  # noqa: E402

from scdrugmap.data.io import read_h5ad  # noqa: E402
from scdrugmap.data.simulate import RESISTANCE_DOWN_SET, RESISTANCE_UP_SET, simulate_collection  # noqa: E402
from scdrugmap.errors import ConfigError  # noqa: E402
from scdrugmap.explain.de import differential_expression, top_genes  # noqa: E402
from scdrugmap.explain.enrichment import (  # noqa: E402
    ORA_COLUMNS,
    RANK_COLUMNS,
    de_scores,
    leading_genes,
    over_representation,
    rank_enrichment,
    read_gmt,
)


def test_over_representation_is_the_hypergeometric_tail_by_hand():
    universe = [f"G{i}" for i in range(100)]
    sets = {"HIT": [f"G{i}" for i in range(10)] + ["NOT_MEASURED"], "MISS": [f"G{i}" for i in range(50, 60)],
            "TINY": ["G0", "G1"]}
    listed = ["G0", "G1", "G2", "G3", "G70"]
    table = over_representation(listed, sets, universe=universe)
    assert list(table.columns) == list(ORA_COLUMNS) and list(table["gene_set"]) == ["HIT", "MISS"]  # TINY < 3
    hit = table.iloc[0]
    assert hit["size"] == 10 and hit["overlap"] == 4 and hit["expected"] == pytest.approx(0.5)
    assert hit["pvalue"] == pytest.approx(hypergeom.sf(3, 100, 10, 5))
    assert hit["genes"] == "G0,G1,G2,G3" and hit["fold_enrichment"] == pytest.approx(8.0)
    assert table.iloc[1]["pvalue"] == 1.0
    np.testing.assert_array_equal(leading_genes(table, "HIT"), ["G0", "G1", "G2", "G3"])


def test_rank_enrichment_puts_a_set_at_the_top_of_the_ranking_first_and_is_reproducible():
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(300)]
    scores = pd.Series(rng.normal(size=300), index=genes)
    scores.iloc[:15] += 3.0
    scores.iloc[15:30] -= 3.0
    sets = {"TOP": genes[:15], "BOTTOM": genes[15:30], **{f"RANDOM{k}": list(rng.choice(genes[30:], 15, replace=False))
                                                          for k in range(5)}}
    table = rank_enrichment(scores, sets, n_permutations=200, seed=1)
    assert list(table.columns) == list(RANK_COLUMNS)
    assert set(table["gene_set"][:2]) == {"TOP", "BOTTOM"}
    by_set = table.set_index("gene_set")
    assert by_set.loc["TOP", "nes"] > 0 > by_set.loc["BOTTOM", "nes"]
    assert by_set.loc["TOP", "qvalue"] < 0.05 and (by_set.filter(like="RANDOM", axis=0)["qvalue"] > 0.05).all()
    assert table["pvalue"].min() >= 1 / 201  # no permutation beat TOP: p = 1 / (n + 1), not 0
    pd.testing.assert_frame_equal(rank_enrichment(scores, sets, n_permutations=200, seed=1), table)


def test_rank_enrichment_names_what_is_missing(monkeypatch):
    with pytest.raises(ConfigError, match="same gene names"):
        rank_enrichment(pd.Series({"A": 1.0, "B": 2.0}), {"S": ["X", "Y", "Z"]})
    monkeypatch.setitem(sys.modules, "gseapy", None)
    with pytest.raises(ConfigError, match="explain extra"):
        rank_enrichment(pd.Series({"A": 1.0}), {"S": ["A"]})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo as a user runs it: simulate to a file, read the h5ad and the GMT written beside it."""
    collection, n_cells, n_genes, strength, seed = DE_COLLECTION
    path = simulate_collection(n_cells, n_genes=n_genes, seed=seed, resistance_strength=strength,
                               collection=collection, out_path=tmp_path_factory.mktemp("demo") / "demo.h5ad")
    adata = read_h5ad(path)
    return adata, read_gmt(path.with_suffix(".gmt")), differential_expression(adata)


def test_the_planted_program_ranks_first_in_over_representation(demo):
    adata, gene_sets, table = demo
    universe = table.dropna(subset=["pvalue"])["gene"]
    up = over_representation(top_genes(table, 20, direction="up"), gene_sets, universe=universe)
    down = over_representation(top_genes(table, 20, direction="down"), gene_sets, universe=universe)
    both = over_representation(top_genes(table, 30), gene_sets, universe=universe)
    assert up.iloc[0]["gene_set"] == RESISTANCE_UP_SET and up.iloc[0]["qvalue"] < 0.05
    assert down.iloc[0]["gene_set"] == RESISTANCE_DOWN_SET and down.iloc[0]["qvalue"] < 0.05
    assert set(both["gene_set"][:2]) == {RESISTANCE_UP_SET, RESISTANCE_DOWN_SET}
    assert (up.iloc[1:]["qvalue"] > 0.05).all()  # no decoy (cell-type or lineage markers) passes


def test_the_planted_program_ranks_first_in_rank_enrichment(demo):
    _, gene_sets, table = demo
    scores = de_scores(table)
    assert scores.index.is_unique and scores.name == "score"
    ranked = rank_enrichment(scores, gene_sets, n_permutations=500, seed=0)
    assert set(ranked["gene_set"][:2]) == {RESISTANCE_UP_SET, RESISTANCE_DOWN_SET}
    by_set = ranked.set_index("gene_set")
    assert by_set.loc[RESISTANCE_UP_SET, "nes"] > 0 > by_set.loc[RESISTANCE_DOWN_SET, "nes"]
    assert (by_set.drop(index=[RESISTANCE_UP_SET, RESISTANCE_DOWN_SET])["qvalue"] > 0.05).all()
