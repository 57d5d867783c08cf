import pandas as pd
import pytest
from typer.testing import CliRunner

from scdrugmap.cli import app
from scdrugmap.data.catalog import filter_catalog, get_dataset, load_catalog, load_category_counts
from scdrugmap.data.io import read_distribution_tsv
from scdrugmap.errors import ConfigError

runner = CliRunner()


def test_catalog_has_the_60_curated_data_sets():
    table = load_catalog()
    assert len(table) == 60
    assert table["collection"].value_counts().to_dict() == {"primary": 36, "validation": 24}
    counts = load_category_counts()
    total = counts[(counts["collection"] == "primary") & (counts["category"] == "All")]
    assert int(total["n_cells"].iloc[0]) == 326751


def test_catalog_matches_shared_copy(shared):
    pd.testing.assert_frame_equal(load_catalog(), pd.read_csv(shared("catalog", "datasets.csv"),
                                                              dtype={"pmid": str, "n_samples": "Int64"}))


def test_filters_and_show():
    myeloma = filter_catalog(cancer_type="myeloma", collection="primary")
    assert len(myeloma) and myeloma["cancer_type"].str.contains("myeloma", case=False).all()
    assert get_dataset("p07")["dataset_id"] == "P07"
    with pytest.raises(ConfigError, match="P01-P36"):
        get_dataset("P99")


def test_datasets_cli_list_and_show():
    listed = runner.invoke(app, ["datasets", "list", "--collection", "validation"])
    assert listed.exit_code == 0 and "24 data sets" in listed.output
    shown = runner.invoke(app, ["datasets", "show", "P01"])
    assert shown.exit_code == 0 and "GSE161801" in shown.output and "cells in" in shown.output


def test_distribution_tsv_import_fills_categories_from_catalog(tmp_path):
    catalog = load_catalog()
    unique = catalog[catalog["subgroup"].notna() & ~catalog["subgroup"].duplicated(keep=False)]
    row = unique.iloc[0]
    folder = tmp_path / "dist"
    folder.mkdir()
    frame = pd.DataFrame({"Condition": ["sensitive", "resistant", "sensitive"], "TP53": [1, 0, 3], "EGFR": [0, 2, 1]},
                         index=["c1", "c2", "c3"])
    frame.to_csv(folder / f"{row['subgroup']}.tsv", sep="\t")
    adata = read_distribution_tsv(folder / f"{row['subgroup']}.tsv", catalog=load_catalog())
    assert adata.obs["response"].tolist() == ["sensitive", "resistant", "sensitive"]
    assert (adata.obs["tissue"] == row["tissue"]).all() and (adata.obs["study"] == row["study"]).all()
    assert adata.X.toarray().tolist() == [[1, 0], [0, 2], [3, 1]]
    result = runner.invoke(app, ["datasets", "import", str(folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / f"{row['subgroup']}.h5ad").exists()


def test_distribution_tsv_without_condition_is_refused(tmp_path):
    path = tmp_path / "x.tsv"
    pd.DataFrame({"TP53": [1]}, index=["c1"]).to_csv(path, sep="\t")
    with pytest.raises(Exception, match="Condition"):
        read_distribution_tsv(path)


def test_ambiguous_subgroup_needs_the_original_data_set_name():
    from scdrugmap.data.io import match_catalog_row

    catalog = load_catalog()
    with pytest.raises(Exception, match="P01, P03"):
        match_catalog_row("GSE161801_pre", catalog)
    assert match_catalog_row("GSE161801_IMiD_GSE161801_pre", catalog)["dataset_id"] == "P03"
    assert match_catalog_row("V18", catalog)["dataset_id"] == "V18"
    assert match_catalog_row("GSE115978", catalog)["dataset_id"] == "V18"
    assert match_catalog_row("unrelated", catalog) is None
