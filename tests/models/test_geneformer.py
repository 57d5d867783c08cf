"""Geneformer V1/V2: golden tokenizer and pooling parity, streaming, strict loading, full-size keys.

LoRA is checked for every model in test_contract.py.
"""

from __future__ import annotations

import functools
import json
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scdrugmap.errors import CheckpointError, ConfigError, SchemaError, WeightsNotFoundError
from scdrugmap.models.base import TokenizedCells, get_encoder_class
from scdrugmap.models.geneformer import (
    PUBLISHED_CONFIGS,
    GeneformerConfig,
    GeneformerEncoder,
    build_geneformer_model,
)
from scdrugmap.models.geneformer_tokenizer import (
    GeneformerTokenizer,
    GeneformerVocabulary,
    load_dictionary,
    normalise_counts,
    rank_genes,
    token_sequences,
)

ATOL = 1e-5
VARIANTS = {"v1": ("V1", None), "v2": ("V2", None), "v1_trunc100": ("V1", 100), "v2_trunc100": ("V2", 100)}


# --- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture
def golden_dir(shared):
    return shared("golden", "geneformer")


@pytest.fixture
def vocab_files(shared):
    v1, v2 = shared("vocab", "geneformer_v1"), shared("vocab", "geneformer_v2")
    return {
        "V1": {"token_dictionary_file": v1 / "geneformer_token_dictionary.pkl",
               "gene_median_file": v1 / "geneformer_gene_median_dictionary.pkl", "gene_mapping_file": None},
        "V2": {"token_dictionary_file": v2 / "token_dictionary_gc95M.pkl",
               "gene_median_file": v2 / "gene_median_dictionary_gc95M.pkl",
               "gene_mapping_file": v2 / "ensembl_mapping_dict_gc95M.pkl"},
    }


@functools.cache
def read_vocabulary(version: str, token_file: str, median_file: str, mapping_file: str | None) -> GeneformerVocabulary:
    return GeneformerVocabulary.from_files(token_file, median_file, mapping_file, version=version)


@pytest.fixture
def vocabularies(vocab_files):
    return {version: read_vocabulary(version, str(files["token_dictionary_file"]), str(files["gene_median_file"]),
                                     None if files["gene_mapping_file"] is None else str(files["gene_mapping_file"]))
            for version, files in vocab_files.items()}


@functools.cache
def read_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return dict(data)


@pytest.fixture
def expected(golden_dir):
    return read_npz(str(golden_dir / "expected.npz"))


@pytest.fixture
def inputs(golden_dir):
    return read_npz(str(golden_dir / "inputs.npz"))


@pytest.fixture
def cells(golden_dir):
    return ad.read_h5ad(golden_dir / "cells.h5ad")


def load_encoder(golden_dir, vocab_files, version="V1", **options) -> GeneformerEncoder:
    return GeneformerEncoder.from_pretrained(golden_dir / "checkpoint", model_version=version,
                                             **vocab_files[version], **options)


def official_model_inputs(inputs, expected, var: str) -> TokenizedCells:
    """What the official EmbExtractor fed the model (rows in dataset order)."""
    ids, lengths = inputs[f"{var}_model_input_ids"], inputs[f"{var}_model_lengths"]
    flat = np.concatenate([ids[k, :n] for k, n in enumerate(lengths)])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedCells(cell_index=expected[f"{var}_cell_index"], lengths=lengths.astype(np.int64),
                          arrays={"input_ids": flat, "offsets": offsets})


def write_h5ad(adata: ad.AnnData, path) -> str:
    adata.write_h5ad(path)
    return str(path)


# --- dictionaries ---------------------------------------------------------------------------------------

def test_restricted_unpickler_reads_official_dictionaries_as_plain_python(vocab_files, golden_dir):
    tokens = load_dictionary(vocab_files["V1"]["token_dictionary_file"], value_type=int)
    medians = load_dictionary(vocab_files["V1"]["gene_median_file"], value_type=float)
    subset = json.loads((golden_dir / "dictionary_subset.json").read_text())
    assert len(tokens) == subset["sizes"]["v1_token_dict"] and len(medians) == subset["sizes"]["v1_median_dict"]
    assert {type(v) for v in tokens.values()} == {int} and {type(v) for v in medians.values()} == {float}
    for gene, facts in list(subset["genes"].items())[:50]:
        if facts["v1_token"] is not None:
            assert tokens[gene] == facts["v1_token"] and medians[gene] == facts["v1_median"]


def test_restricted_unpickler_refuses_code_and_never_runs_it(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(CheckpointError, match=r"os\.system.*not allowed"):
        load_dictionary(evil, value_type=int)
    assert not marker.exists()
    ordered = tmp_path / "ordered.pkl"
    ordered.write_bytes(pickle.dumps(__import__("collections").OrderedDict(a=1)))
    with pytest.raises(CheckpointError, match="OrderedDict"):
        load_dictionary(ordered, value_type=int)
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps({"ENSG1": "x"}))
    with pytest.raises(CheckpointError, match="not str -> int"):
        load_dictionary(wrong, value_type=int)


# --- tokenizer ------------------------------------------------------------------------------------------

def test_normalisation_is_bitwise_official(inputs, expected, vocabularies):
    medians = vocabularies["V1"].medians
    genes = inputs["genes"]
    known = np.array([g in medians for g in genes])
    values = normalise_counts(inputs["counts"][:, known], inputs["n_counts"][:, None],
                              np.array([medians[g] for g in genes[known]]))
    np.testing.assert_array_equal(values, expected["norm_v1"][:, known])


@pytest.mark.parametrize("n_counts_dtype", [np.int64, np.float32, np.float64])
def test_normalisation_reproduces_scipy_and_numpy_division_bit_for_bit(n_counts_dtype):
    rng = np.random.default_rng(3)
    counts = rng.negative_binomial(2, 0.2, size=(30, 50)).astype(np.float32)
    counts[rng.random(counts.shape) < 0.6] = 0
    n_counts = (counts.sum(1) + rng.integers(1, 500, 30)).astype(n_counts_dtype)
    medians = rng.uniform(0.01, 30, 50)
    csr = sp.csr_matrix(counts)
    official_sparse = sp.csr_matrix(csr / n_counts[:, None] * 10_000 / medians)  # tokenize_anndata, sparse X
    lengths = np.diff(csr.indptr)
    ours = normalise_counts(csr.data, n_counts, medians[csr.indices], lengths=lengths)
    np.testing.assert_array_equal(ours, official_sparse.data)
    official_dense = counts / n_counts[:, None] * 10_000 / medians  # dense X: numpy divides
    ours_dense = normalise_counts(csr.data, n_counts, medians[csr.indices], dense=True, lengths=lengths)
    np.testing.assert_array_equal(ours_dense, official_dense[counts > 0])


@pytest.mark.parametrize("var", list(VARIANTS))
def test_tokens_match_official_exactly_outside_ties_and_as_multisets_inside(var, cells, expected, vocabularies):
    version, size = VARIANTS[var]
    tokens = GeneformerTokenizer(vocabularies[version], model_input_size=size).tokenize(cells)
    lengths = expected[f"{var}_lengths"]
    np.testing.assert_array_equal(tokens.cell_index, expected[f"{var}_cell_index"])
    np.testing.assert_array_equal(tokens.lengths, lengths)
    official, stable, groups = (expected[f"{var}_input_ids"], expected[f"{var}_input_ids_stable_sort"],
                                expected[f"{var}_tie_group"])
    for k, ours in enumerate(token_sequences(tokens)):
        n = lengths[k]
        np.testing.assert_array_equal(ours, stable[k, :n])  # our documented rule: ties in column order
        untied = groups[k, :n] < 0
        np.testing.assert_array_equal(ours[untied], official[k, :n][untied])
        for group in np.unique(groups[k, :n][~untied]):
            where = groups[k, :n] == group
            assert sorted(ours[where]) == sorted(official[k, :n][where])
    assert sorted(tokens.dropped) == [7, 19, 30]
    assert "filter_pass" in tokens.dropped[7] and "no expressed gene" in tokens.dropped[30]


def test_v2_frames_cells_with_cls_and_eos_and_v1_has_no_special_tokens(cells, vocabularies):
    v1 = GeneformerTokenizer(vocabularies["V1"]).tokenize(cells)
    v2 = GeneformerTokenizer(vocabularies["V2"]).tokenize(cells)
    assert all(s[0] == 2 and s[-1] == 3 and not np.isin(s[1:-1], [0, 1, 2, 3]).any() for s in token_sequences(v2))
    assert not any(np.isin(s, [0, 1, 2, 3]).any() for s in token_sequences(v1))
    assert v1.arrays["input_ids"].dtype == np.int16


@pytest.mark.parametrize("dense", [True, False])
def test_duplicate_ids_from_the_mapping_are_summed(dense, inputs, expected, vocabularies):
    counts = np.concatenate([inputs["counts"], inputs["collapse_extra_counts"]], axis=1)
    genes = np.concatenate([inputs["genes"], inputs["collapse_extra_genes"]])
    obs = pd.DataFrame({"n_counts": inputs["collapse_n_counts"], "filter_pass": inputs["filter_pass"]},
                       index=inputs["cell_id"])
    adata = ad.AnnData(counts if dense else sp.csr_matrix(counts), obs=obs,
                       var=pd.DataFrame({"ensembl_id": genes}, index=genes))
    vocabulary = vocabularies["V2"]
    tokens = GeneformerTokenizer(vocabulary).tokenize(adata)
    lengths = expected["v2_collapse_lengths"]
    np.testing.assert_array_equal(tokens.cell_index, expected["v2_collapse_cell_index"])
    np.testing.assert_array_equal(tokens.lengths, lengths)
    # Independent oracle for ties: each token's value from the summed counts.
    collapsed = [vocabulary.mapping.get(g.upper()) for g in genes]
    token_of = np.array([vocabulary.token_ids[c] if c else -1 for c in collapsed])
    for k, ours in enumerate(token_sequences(tokens)):
        official = expected["v2_collapse_input_ids"][k, :lengths[k]]
        assert sorted(ours) == sorted(official)
        row = counts[tokens.cell_index[k]]
        value = {t: row[token_of == t].sum() / vocabulary.medians[c]
                 for t, c in zip(token_of, collapsed, strict=True) if t >= 0}
        differ = ours[1:-1] != official[1:-1]
        assert all(value[a] == value[b] for a, b in zip(ours[1:-1][differ], official[1:-1][differ], strict=True))


@pytest.mark.parametrize("max_genes", [1000, 6, 12])
def test_rank_is_exact_for_near_ties_and_stable_for_exact_ties(max_genes):
    rng = np.random.default_rng(0)
    lengths = np.array([5, 0, 300, 7, 1, 40])
    values = rng.uniform(0.5, 50, lengths.sum())
    values[3:5] = values[2]  # exact ties in cell 0
    values[10] = np.nextafter(values[9], np.inf)  # one ulp apart: the same truncated key, gene order wrong
    values[12] = np.nextafter(values[11], 0)
    values[20:30] = values[19]
    values[-40:] = np.repeat(rng.uniform(1, 2, 4), 10) * (1 + 1e-15 * rng.integers(0, 3, 40))
    cells = np.repeat(np.arange(lengths.size), lengths)
    genes = rng.permutation(np.arange(lengths.sum()))  # any gene order within cells
    ranked, kept = rank_genes(values, genes, lengths, n_bits=9, max_genes=max_genes)
    reference = np.lexsort((genes, -values, cells))
    offsets = np.concatenate([[0], np.cumsum(kept)])
    for c in range(lengths.size):
        expected_genes = genes[reference][cells[reference] == c][:max_genes]
        np.testing.assert_array_equal(ranked[offsets[c]:offsets[c + 1]], expected_genes)
    np.testing.assert_array_equal(kept, np.minimum(lengths, max_genes))


def random_counts(n_cells, genes, seed=0, density=0.3):
    rng = np.random.default_rng(seed)
    counts = rng.negative_binomial(2, 0.3, size=(n_cells, len(genes))).astype(np.float32)
    counts[rng.random(counts.shape) > density] = 0
    counts[:, : len(genes) // 4] = np.round(counts[:, : len(genes) // 4] / 3)  # many equal counts -> ties
    return counts


@pytest.mark.parametrize("layout", ["csr", "dense"])
@pytest.mark.parametrize("version", ["V1", "V2"])
def test_streaming_from_h5ad_equals_in_memory(layout, version, vocabularies, tmp_path):
    vocabulary = vocabularies[version]
    rng = np.random.default_rng(1)
    genes = rng.choice([g for g in vocabulary.token_ids if g.startswith("ENSG")], 400, replace=False)
    genes = np.concatenate([genes, ["ENSG_NOT_A_GENE", genes[3].lower()]])  # unknown id, and a lower-case id
    counts = random_counts(n_cells=75, genes=genes)
    counts[5] = 0  # an empty cell
    obs = pd.DataFrame({"n_counts": counts.sum(1).astype(np.int64) + 7,
                        "filter_pass": (np.arange(75) % 11 != 3).astype(int)}, index=[f"c{i}" for i in range(75)])
    adata = ad.AnnData(sp.csr_matrix(counts) if layout == "csr" else counts, obs=obs,
                       var=pd.DataFrame({"ensembl_id": genes}, index=[f"g{i}" for i in range(genes.size)]))
    path = write_h5ad(adata, tmp_path / "cells.h5ad")
    reference = GeneformerTokenizer(vocabulary, chunk_size=10_000, n_threads=1).tokenize(adata)
    for chunk_size, threads in [(1, 1), (13, 2), (64, 3)]:
        streamed = GeneformerTokenizer(vocabulary, n_threads=threads).tokenize_h5ad(path, chunk_size=chunk_size)
        np.testing.assert_array_equal(streamed.cell_index, reference.cell_index)
        np.testing.assert_array_equal(streamed.arrays["input_ids"], reference.arrays["input_ids"])
        np.testing.assert_array_equal(streamed.arrays["offsets"], reference.arrays["offsets"])
        assert streamed.dropped == reference.dropped and streamed.n_genes_matched == reference.n_genes_matched
    assert 5 in reference.dropped and 3 in reference.dropped


def test_backed_anndata_is_tokenized_in_chunks_like_in_memory(cells, vocabularies, tmp_path):
    path = write_h5ad(cells, tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(path, backed="r")
    tokenizer = GeneformerTokenizer(vocabularies["V2"], chunk_size=9)
    a, b = tokenizer.tokenize(backed), tokenizer.tokenize(cells)
    np.testing.assert_array_equal(a.arrays["input_ids"], b.arrays["input_ids"])
    np.testing.assert_array_equal(a.cell_index, b.cell_index)
    backed.file.close()


def test_missing_n_counts_uses_each_cells_total_over_all_genes(cells, vocabularies):
    with_total = cells.copy()
    with_total.obs["n_counts"] = np.asarray(cells.X.sum(axis=1)).ravel()
    without = cells.copy()
    del without.obs["n_counts"]
    tokenizer = GeneformerTokenizer(vocabularies["V1"])
    a, b = tokenizer.tokenize(with_total), tokenizer.tokenize(without)
    np.testing.assert_array_equal(a.arrays["input_ids"], b.arrays["input_ids"])


def test_bad_input_is_refused_with_the_cell_named(cells, vocabularies, tmp_path):
    tokenizer = GeneformerTokenizer(vocabularies["V1"])
    negative = cells.copy()
    negative.X = negative.X.toarray()
    negative.X[4, 10] = -1
    with pytest.raises(SchemaError, match="cell_04"):
        tokenizer.tokenize(negative)
    symbols = cells.copy()
    del symbols.var["ensembl_id"]
    symbols.var_names = [f"GENE{i}" for i in range(symbols.n_vars)]
    with pytest.raises(SchemaError, match="none of the 584 gene ids"):
        tokenizer.tokenize(symbols)
    path = write_h5ad(negative, tmp_path / "negative.h5ad")
    with pytest.raises(SchemaError, match="cell_04"):
        tokenizer.tokenize_h5ad(path)
    zero = cells.copy()
    zero.obs["n_counts"] = zero.obs["n_counts"].where(zero.obs_names != "cell_05", 0)
    with pytest.raises(SchemaError, match="cell_05.*n_counts"):
        tokenizer.tokenize(zero)
    csc = cells.copy()
    csc.X = sp.csc_matrix(csc.X)
    path = write_h5ad(csc, tmp_path / "csc.h5ad")
    with pytest.raises(SchemaError, match="csc_matrix"):
        tokenizer.tokenize_h5ad(path)


def test_tokenizer_module_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, scdrugmap.models.geneformer_tokenizer; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0, "the tokenizer imported torch"


# --- model and pooling ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("var", "options", "key"), [
    ("v1", {}, "v1_cell_emb_layer-1"),
    ("v1", {"emb_layer": 0}, "v1_cell_emb_layer0"),
    ("v2", {}, "v2_cell_emb_layer-1"),
    ("v2", {"emb_layer": 0}, "v2_cell_emb_layer0"),
    ("v2", {"pooling": "cls"}, "v2_cls_emb_layer-1"),
])
def test_embeddings_of_official_inputs_match_emb_extractor(var, options, key, golden_dir, vocab_files, inputs,
                                                           expected):
    encoder = load_encoder(golden_dir, vocab_files, var[:2].upper(), **options)
    tokens = official_model_inputs(inputs, expected, var)
    embeddings = encoder.embed_tokens(tokens, batch_size=int(inputs["emb_forward_batch_size"]))
    np.testing.assert_allclose(embeddings, expected[key], atol=ATOL, rtol=0)


@pytest.mark.parametrize("var", ["v1", "v2"])
def test_embed_from_adata_matches_official_for_cells_tokenized_identically(var, golden_dir, vocab_files, cells,
                                                                          expected):
    encoder = load_encoder(golden_dir, vocab_files, var.upper())
    embeddings = encoder.embed(cells, batch_size=6)
    index = expected[f"{var}_cell_index"]
    same = (expected[f"{var}_input_ids"] == expected[f"{var}_input_ids_stable_sort"]).all(axis=1)
    assert same.sum() >= 20
    np.testing.assert_allclose(embeddings[index[same]], expected[f"{var}_cell_emb_layer-1"][same], atol=ATOL, rtol=0)
    assert np.isnan(embeddings[[7, 19, 30]]).all()


def test_hidden_states_match_an_unpadded_official_forward(golden_dir, vocab_files, inputs, expected):
    encoder = load_encoder(golden_dir, vocab_files, "V1")
    tokens = official_model_inputs(inputs, expected, "v1")
    for cell in (0, 3):
        batch = encoder.collate(tokens, np.array([cell]))
        with torch.inference_mode():
            states = [encoder.module.hidden_states(batch["input_ids"], batch["attention_mask"], n_layers=k)[0]
                      for k in range(3)]
        np.testing.assert_allclose(torch.stack(states).numpy(), expected[f"v1_hidden_states_cell_{cell:02d}"],
                                   atol=ATOL, rtol=0)


def test_bucketed_batches_equal_one_cell_at_a_time(golden_dir, vocab_files, inputs, expected):
    encoder = load_encoder(golden_dir, vocab_files, "V2")
    tokens = official_model_inputs(inputs, expected, "v2")
    np.testing.assert_allclose(encoder.embed_tokens(tokens, batch_size=16), encoder.embed_tokens(tokens, batch_size=1),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(PUBLISHED_CONFIGS))
def test_full_size_model_has_the_published_keys_and_shapes(name, golden_dir):
    published = json.loads((golden_dir / "keys_full.json").read_text())
    entry = next(v for k, v in published.items() if k.startswith(name))
    config = PUBLISHED_CONFIGS[name]
    for field, value in entry["config"].items():
        if hasattr(config, field):
            assert getattr(config, field) == value, field
    with torch.device("meta"):
        model = build_geneformer_model(config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = {k: v for k, v in entry["state_dict"].items() if not k.startswith("cls.")}  # MLM head: not run
    assert ours == official


# --- loading --------------------------------------------------------------------------------------------

def test_official_config_json_is_read_and_non_bert_configs_are_refused(golden_dir, tmp_path):
    config = GeneformerConfig.from_official(golden_dir / "checkpoint")
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (32, 2, 25426)
    assert config.max_position_embeddings == 4096 and config.hidden_act == "relu"
    other = tmp_path / "config.json"
    other.write_text(json.dumps({"model_type": "bert", "position_embedding_type": "relative_key"}))
    with pytest.raises(CheckpointError, match="absolute positions"):
        GeneformerConfig.from_official(other)


def copy_checkpoint(golden_dir, tmp_path, edit=None, *, bin_file=False):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text((golden_dir / "checkpoint" / "config.json").read_text())
    state = load_file(str(golden_dir / "checkpoint" / "model.safetensors"))
    if edit is not None:
        edit(state)
    if bin_file:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"))
    return folder


def test_legacy_bin_with_position_ids_and_tied_decoder_loads(golden_dir, vocab_files, tmp_path, caplog):
    def add_legacy(state):
        state["bert.embeddings.position_ids"] = torch.arange(4096)[None]
        state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
        state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]

    folder = copy_checkpoint(golden_dir, tmp_path, add_legacy, bin_file=True)
    with caplog.at_level("INFO", logger="scdrugmap.models.geneformer"):
        encoder = GeneformerEncoder.from_pretrained(folder, **vocab_files["V1"])
    ignored = [r.message for r in caplog.records if "ignoring" in r.message]
    assert len(ignored) == 1 and "cls.predictions.decoder.weight" in ignored[0] and "position_ids" in ignored[0]
    assert encoder.checkpoint_sha256 and len(encoder.checkpoint_sha256) == 64


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.pop("bert.encoder.layer.1.output.dense.bias"), "missing keys.*layer.1.output.dense.bias"),
    (lambda s: s.update({"bert.encoder.layer.9.output.dense.bias": torch.zeros(32)}), "unexpected keys.*layer.9"),
    (lambda s: s.update({"bert.embeddings.LayerNorm.weight": torch.ones(33)}), r"mis-shaped.*\(33,\) vs model \(32,\)"),
])
def test_checkpoint_that_does_not_fit_raises_naming_the_key(edit, message, golden_dir, vocab_files, tmp_path):
    folder = copy_checkpoint(golden_dir, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        GeneformerEncoder.from_pretrained(folder, **vocab_files["V1"])


def test_corrupted_or_missing_files_raise_checkpoint_errors(golden_dir, vocab_files, tmp_path):
    folder = copy_checkpoint(golden_dir, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read the checkpoint"):
        GeneformerEncoder.from_pretrained(folder, **vocab_files["V1"])
    weights.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        GeneformerEncoder.from_pretrained(folder, **vocab_files["V1"])
    with pytest.raises(CheckpointError, match="no Geneformer V1 dictionaries"):
        GeneformerEncoder.from_pretrained(golden_dir / "checkpoint")
    small = tmp_path / "small"
    small.mkdir()
    config = json.loads((golden_dir / "checkpoint" / "config.json").read_text()) | {"vocab_size": 100}
    (small / "config.json").write_text(json.dumps(config))
    (small / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="vocab_size is 100"):
        GeneformerEncoder.from_pretrained(small, model_version="V1", **vocab_files["V1"])


def test_options_are_checked(golden_dir, vocab_files):
    with pytest.raises(ConfigError, match="only Geneformer V2"):
        load_encoder(golden_dir, vocab_files, "V1", pooling="cls")
    with pytest.raises(ConfigError, match="unknown Geneformer options"):
        load_encoder(golden_dir, vocab_files, "V1", layer=3)
    with pytest.raises(ConfigError, match="emb_layer"):
        load_encoder(golden_dir, vocab_files, "V1", emb_layer=-5)


def test_registry_and_official_sources(monkeypatch):
    assert get_encoder_class("geneformer") is GeneformerEncoder
    sources = GeneformerEncoder.weights_sources
    urls = [f.url for f in sources["geneformer-v2-104m"].files]
    assert "hf://ctheodoris/Geneformer/05fcbeb8a27d49e0a7a4349152202ee2c1cbfd28/Geneformer-V2-104M/model.safetensors" in urls
    assert any(u.endswith("geneformer/token_dictionary_gc104M.pkl") for u in urls)
    assert next(iter(sources)) == "geneformer-v1-10m"
    monkeypatch.setenv("SCDRUGMAP_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError):
        GeneformerEncoder.from_pretrained("Geneformer-V2-316M")
