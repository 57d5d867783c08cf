"""Gene id detection and harmonisation on real human ids and on the real data sets in ../shared/data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scdrugmap.data import genes
from scdrugmap.data.genes import (
    detect_gene_id_type,
    harmonise_genes,
    load_gene_aliases,
    load_gene_table,
    map_genes,
)
from scdrugmap.errors import SchemaError

TP53 = "ENSG00000141510"
EGFR = "ENSG00000146648"


def _genes_only(names, **var_columns) -> ad.AnnData:
    var = pd.DataFrame(var_columns, index=pd.Index([str(n) for n in names]))
    return ad.AnnData(X=np.zeros((2, len(names)), dtype=np.float32), var=var)


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["TP53", "EGFR", "GAPDH"], "symbol"),
        ([TP53, EGFR + ".17", "ENSG00000111640"], "ensembl"),
        (["7157", "1956", "2597"], "entrez"),
        (np.array([7157, 1956, 2597]), "entrez"),
        (["TP53", TP53, "7157", "ACTB"], "symbol"),
    ],
)
def test_detect_gene_id_type_reads_the_form_of_most_names(names, expected):
    assert detect_gene_id_type(names) == expected


def test_detect_gene_id_type_refuses_mouse_ensembl_ids_and_empty_input():
    with pytest.raises(SchemaError, match="non-human Ensembl"):
        detect_gene_id_type(["ENSMUSG00000059552", "ENSMUSG00000020122"])
    with pytest.raises(SchemaError, match="empty"):
        detect_gene_id_type([])


def test_names_are_classified_by_their_whole_form():
    from scdrugmap.data.genes import _classify

    names = ["TP53", TP53, TP53 + ".17", TP53 + ".x", TP53 + "1", "ENSMUSG00000059552", "ENSMUSG00000059552.3",
             "ENSG0000014151", "7157", "7157.0", "7157.5", "07157", "7157a", "", "ENSG", "ENSMUSG", "12.00",
             "  ", "ensg00000141510", "ENSGALG00000000003"]
    assert _classify(pd.Series(names, dtype=object)).tolist() == [
        "symbol", "ensembl", "ensembl", "symbol", "symbol", "other_ensembl", "other_ensembl",
        "symbol", "entrez", "entrez", "symbol", "entrez", "symbol", "symbol", "symbol", "symbol", "entrez",
        "symbol", "symbol", "other_ensembl"]


def test_map_genes_resolves_symbols_aliases_ensembl_and_entrez_to_one_gene():
    names = ["TP53", "tp53", "P53", TP53 + ".17", "7157", "7157.0"]
    mapping = map_genes(names)
    assert mapping["ensembl_id"].tolist() == [TP53] * 6
    assert mapping["gene_symbol"].tolist() == ["TP53"] * 6
    assert mapping["matched_by"].tolist() == ["symbol", "symbol", "alias", "ensembl", "entrez", "entrez"]


def test_map_genes_maps_former_symbols_to_current_ones():
    mapping = map_genes(["FAM71B", "SARS", "HER1"]).set_index(pd.Index(["garin3", "sars1", "egfr"]))
    assert mapping.loc["garin3", "gene_symbol"] == "GARIN3"
    assert mapping.loc["sars1", "gene_symbol"] == "SARS1"  # HGNC previous symbol beats SARS2's alias
    assert mapping.loc["egfr", "ensembl_id"] == EGFR


def test_map_genes_leaves_unknown_and_ambiguous_names_unmapped():
    # QARS was the symbol of both QARS1 and EPRS1: ambiguous, so never guessed.
    mapping = map_genes(["NOT_A_GENE", "QARS", "RP11-122C9.1", "999999999", "ENSG99999999999"])
    assert mapping["ensembl_id"].isna().all()
    assert mapping["gene_symbol"].isna().all()
    assert (mapping["matched_by"] == "").all()


def test_gene_table_has_unique_symbols_ids_and_entrez_ids():
    table = load_gene_table()
    owners = table.loc[table["symbol_owner"] == 1, "gene_symbol"]
    assert table["ensembl_id"].is_unique
    assert owners.str.upper().is_unique
    entrez = table.loc[table["entrez_ids"] != "", "entrez_ids"].str.split(";").explode()
    assert entrez.is_unique
    assert len(table) > 60_000 and len(entrez) > 18_000
    tp53 = table.set_index("ensembl_id").loc[TP53]
    assert (tp53["gene_symbol"], tp53["entrez_ids"], tp53["biotype"]) == ("TP53", "7157", "protein_coding")
    aliases = load_gene_aliases()
    assert aliases["alias"].is_unique
    assert not aliases["alias"].isin(owners.str.upper()).any()


def test_harmonise_genes_writes_symbol_and_ensembl_columns_in_place():
    adata = _genes_only(["TP53", "egfr", "NOT_A_GENE"])
    assert harmonise_genes(adata) is None
    assert adata.var["gene_symbol"].tolist()[:2] == ["TP53", "EGFR"]
    assert adata.var["ensembl_id"].tolist()[:2] == [TP53, EGFR]
    assert pd.isna(adata.var["ensembl_id"].iloc[2]) and pd.isna(adata.var["gene_symbol"].iloc[2])
    summary = adata.uns["scdrugmap"]["genes"]
    assert (summary["id_type"], summary["n_mapped"], summary["n_unmapped"], summary["by_symbol"]) == (
        "symbol", 2, 1, 2)


def test_harmonise_genes_with_copy_leaves_the_input_alone_and_reads_a_var_column():
    adata = _genes_only(["a", "b"], entrez_id=[7157, 1956])
    out = harmonise_genes(adata, gene_key="entrez_id", copy=True)
    assert "ensembl_id" not in adata.var
    assert out.var["ensembl_id"].tolist() == [TP53, EGFR]
    assert out.uns["scdrugmap"]["genes"]["id_type"] == "entrez"
    with pytest.raises(SchemaError, match="gene_key 'gene_ids' is not a var column"):
        harmonise_genes(adata, gene_key="gene_ids")


def test_harmonise_genes_refuses_two_names_of_one_gene_and_names_the_fix():
    adata = _genes_only(["TP53", "tp53", "ACTB"])
    with pytest.raises(SchemaError, match=r"\['TP53', 'tp53'\] -> ENSG00000141510 \(TP53\).*Sum the duplicate"):
        harmonise_genes(adata)


def test_harmonise_genes_leaves_an_alias_unknown_when_the_data_names_its_gene_directly():
    # Old annotations list RPS17L beside RPS17; HGNC merged them, but the data keeps two columns.
    adata = _genes_only(["RPS17", "RPS17L", "ACTB"])
    harmonise_genes(adata)
    assert adata.var["gene_symbol"].iloc[0] == "RPS17"
    assert pd.isna(adata.var["ensembl_id"].iloc[1])
    assert adata.uns["scdrugmap"]["genes"]["n_alias_conflicts"] == 1


def test_harmonise_genes_maps_real_symbol_data(shared):
    adata = ad.read_h5ad(shared("data", "GSE120575_melanoma_icb_tcells.h5ad"))
    harmonise_genes(adata)
    summary = adata.uns["scdrugmap"]["genes"]
    assert summary["id_type"] == "symbol"
    assert summary["n_mapped"] / summary["n_genes"] > 0.9
    known = adata.var["ensembl_id"].dropna()
    assert known.is_unique and known.str.match(r"^ENSG\d{11}$").all()
    assert adata.var.loc["LAP3", "ensembl_id"] == "ENSG00000002549"


@pytest.mark.parametrize("name", ["GSE157220_hnscc_afatinib.h5ad", "GSE157220_hnscc_gefitinib.h5ad"])
def test_harmonise_genes_maps_real_entrez_data(shared, name):
    adata = ad.read_h5ad(shared("data", name))
    harmonise_genes(adata)
    summary = adata.uns["scdrugmap"]["genes"]
    assert summary["id_type"] == "entrez"
    assert summary["by_entrez"] / summary["n_genes"] > 0.99
    assert adata.var["ensembl_id"].dropna().is_unique
    assert tuple(adata.var.loc["215", ["gene_symbol", "ensembl_id"]]) == ("ABCD1", "ENSG00000101986")


@pytest.mark.parametrize("name", [genes.GENE_TABLE_FILE, genes.ALIAS_TABLE_FILE])
def test_tables_read_as_pandas_reads_them_as_text(name):
    with genes._table_path(name).open("rb") as handle:
        expected = pd.read_csv(handle, sep="\t", compression="gzip", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(genes._read_table(name), expected)


def test_find_returns_what_a_pandas_index_returns():
    import pyarrow as pa

    keys = ["TP53", "EGFR", "A1BG", "ACTB"]
    values = ["EGFR", "egfr", "ACTB", "EGFR", "", "NOT_A_GENE"]
    assert genes._find(values, pa.array(keys)).tolist() == pd.Index(keys).get_indexer(values).tolist()
    assert genes._find(["x", "y"], pa.array(keys)).tolist() == [-1, -1]


def test_every_symbol_alias_and_entrez_id_of_the_tables_maps_to_its_own_gene():
    table = load_gene_table()
    owners = table[table["symbol_owner"] == 1]
    mapping = map_genes(owners["gene_symbol"].str.lower())
    assert mapping["ensembl_id"].tolist() == owners["ensembl_id"].tolist()
    assert (mapping["matched_by"] == "symbol").all()
    aliases = load_gene_aliases()
    assert map_genes(aliases["alias"])["ensembl_id"].tolist() == aliases["ensembl_id"].tolist()
    entrez = table.loc[table["entrez_ids"] != "", ["ensembl_id", "entrez_ids"]]
    entrez = entrez.assign(entrez_ids=entrez["entrez_ids"].str.split(";")).explode("entrez_ids")
    mapping = map_genes(entrez["entrez_ids"])
    assert mapping["ensembl_id"].tolist() == entrez["ensembl_id"].tolist()
    assert (mapping["matched_by"] == "entrez").all()


def test_canonical_ids_of_the_same_text_are_remembered_and_never_shared():
    from scdrugmap.data.genes import canonical_gene_ids

    first = canonical_gene_ids(["TP53", " egfr", "7157", "NOT_A_GENE"])
    assert first.tolist() == [TP53, EGFR, TP53, "NOT_A_GENE"]
    first[0] = "changed by the caller"
    again = canonical_gene_ids(np.array(["TP53", "egfr ", "7157", "NOT_A_GENE"], dtype=object))  # same text
    assert again.tolist() == [TP53, EGFR, TP53, "NOT_A_GENE"]
    # equal numbers of other types are other text: an unknown id falls back to its own text
    assert canonical_gene_ids([999999999])[0] == "999999999"
    assert canonical_gene_ids([999999999.0])[0] == "999999999.0"
