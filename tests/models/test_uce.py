"""UCE: golden parity, the seeded sampler's distribution and the strict loader.

LoRA is checked for every model in test_contract.py.
"""

from __future__ import annotations

import functools
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from scipy import stats

from scdrugmap.errors import CheckpointError, ConfigError, SchemaError
from scdrugmap.models import uce

TINY = {"nhead": 4, "chrom_token_offset": 264}  # the constants the golden replaced in run_eval


@pytest.fixture
def golden(shared):
    return shared("golden", "uce")


@pytest.fixture
def inputs(golden):
    return np.load(golden / "inputs.npz")


@pytest.fixture
def expected(golden):
    return np.load(golden / "expected.npz")


@pytest.fixture
def tiny_adata(golden):
    import anndata as ad

    return ad.read_h5ad(golden / "tiny_human.h5ad")


def load(golden, **options):
    return uce.UCEEncoder.from_pretrained(golden / "checkpoint.torch", **{**TINY, **options})


@functools.cache
def stored_token_outputs(golden, mode):
    """Run the golden's stored token ids once per mask mode (the slowest step of this file)."""
    inputs = np.load(golden / "inputs.npz")
    ids = torch.from_numpy(inputs["token_ids"])
    bias = uce.padding_bias(torch.from_numpy(inputs["attention_mask"]), None, mode)
    with torch.no_grad():
        out = load(golden).module(ids, bias, all_positions=mode == "additive")
    return {k: v.numpy() for k, v in out.items()}


def max_diff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# --- model parity on the golden's stored token ids ----------------------------------------------------

def test_forward_on_stored_tokens_matches_official_outputs(golden, inputs, expected):
    out = stored_token_outputs(golden, "additive")
    assert max_diff(out["embedding"], expected["uce_embedding"]) < 1e-5
    assert max_diff(out["cls_output"], expected["cls_decoder_output"]) < 1e-5
    assert max_diff(out["transformer_output"].transpose(1, 0, 2), expected["transformer_output"]) < 1e-5
    assert max_diff(out["gene_output"].transpose(1, 0, 2), expected["gene_output"]) < 1e-5


def test_blocking_mask_matches_bool_mask_and_differs_from_official_additive(golden, inputs, expected):
    additive = stored_token_outputs(golden, "additive")["embedding"]
    blocking = stored_token_outputs(golden, "blocking")["embedding"]
    assert max_diff(blocking, expected["uce_embedding_boolmask"]) < 1e-5
    assert max_diff(blocking, expected["uce_embedding_unpadded"]) < 1e-5
    # Measured: the official additive mask moves padded cells by ~1.3e-3; full-length cells not at all.
    per_cell = np.abs(additive - blocking).max(axis=1)
    full_length = inputs["seq_lens"] == inputs["token_ids"].shape[1]
    assert 1e-4 < per_cell.max() < 1e-2
    assert per_cell[full_length].max() < 1e-6


def test_predict_head_matches_official_logits(golden, inputs, expected):
    encoder = load(golden)
    embedding = torch.from_numpy(stored_token_outputs(golden, "additive")["embedding"])
    genes = encoder.module.pe_embedding.weight[torch.from_numpy(inputs["predict_gene_token_ids"])]
    with torch.no_grad():
        logits = torch.stack([encoder.module.predict(cell.expand(len(genes), -1), genes)[:, 0]
                              for cell in embedding])
    assert max_diff(logits, expected["predict_logits"]) < 1e-5


# --- tokenizer ----------------------------------------------------------------------------------------

def test_sampling_weights_equal_official_float32_weights(inputs):
    weights = uce.sampling_weights(inputs["proc_counts"])
    assert weights.dtype == np.float32
    np.testing.assert_array_equal(weights, inputs["sampling_weights"])


def test_sentences_from_official_draws_equal_official_token_ids(golden, inputs):
    genes = load(golden).genes
    rows = genes.symbols.get_indexer(np.char.upper(inputs["proc_genes"]))
    np.testing.assert_array_equal(genes.token_ids[rows], inputs["gene_token_ids"])
    np.testing.assert_array_equal(genes.chrom_codes[rows], inputs["gene_chrom_codes"])
    ordered = uce.order_cell_sentences(inputs["sampled_gene_idx"], inputs["chrom_order"],
                                       genes.chrom_codes[rows], genes.starts[rows])
    flat, lengths = uce.assemble_sentences(ordered, genes.token_ids[rows], genes.chrom_codes[rows], 264)
    np.testing.assert_array_equal(lengths, inputs["seq_lens"])
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    for cell, length in enumerate(lengths):
        np.testing.assert_array_equal(flat[offsets[cell]: offsets[cell + 1]], inputs["token_ids"][cell, :length])


def test_legacy_sampling_reproduces_seeded_official_run_end_to_end(golden, inputs, expected, tiny_adata):
    encoder = load(golden, sampling="legacy", seed=int(inputs["sampling_seed"]))
    tokens = encoder.tokenize(tiny_adata)
    assert list(tiny_adata.obs_names[tokens.cell_index]) == list(inputs["proc_cell_ids"])
    assert list(tokens.dropped) == [int(np.flatnonzero(tiny_adata.obs_names == "cell07")[0])]
    batch = encoder.collate(tokens, np.arange(tokens.n_cells))
    np.testing.assert_array_equal(batch["token_ids"].numpy(), inputs["token_ids"])
    np.testing.assert_array_equal(batch["attention_mask"].numpy(), inputs["attention_mask"])
    embeddings = encoder.embed(tiny_adata, batch_size=5)  # compute batches need not be official ones
    assert np.isnan(embeddings[list(tokens.dropped)]).all()
    assert max_diff(embeddings[tokens.cell_index], expected["uce_embedding"]) < 1e-5


def test_official_batch_of_one_gives_unpadded_embeddings(golden, inputs, expected, tiny_adata):
    encoder = load(golden, sampling="legacy", seed=int(inputs["sampling_seed"]), batch_size=1)
    tokens = encoder.tokenize(tiny_adata)
    rows = np.flatnonzero(inputs["seq_lens"] < inputs["token_ids"].shape[1])[:2]  # padded in the official batch
    with torch.no_grad():
        embeddings = encoder.encode(encoder.collate(tokens, rows)).numpy()
    assert max_diff(embeddings, expected["uce_embedding_unpadded"][rows]) < 1e-5
    assert max_diff(embeddings, expected["uce_embedding"][rows]) > 1e-4


def test_generator_draws_follow_the_official_multinomial(inputs):
    p = inputs["sampling_weights"][0].astype(np.float64)
    weights = np.repeat(inputs["sampling_weights"][:1], 200, axis=0)
    draws = uce.sample_genes(weights, 1024, np.random.default_rng(7))
    observed = np.bincount(draws.ravel(), minlength=p.size)
    assert observed[p == 0].sum() == 0
    positive = p > 0
    expected_counts = draws.size * p[positive] / p[positive].sum()
    assert stats.chisquare(observed[positive], expected_counts).pvalue > 1e-3
    # and the same distribution as the official RandomState.choice
    legacy = np.random.RandomState(3).choice(p.size, size=draws.size, p=inputs["sampling_weights"][0])  # noqa: NPY002
    table = np.stack([observed[positive], np.bincount(legacy, minlength=p.size)[positive]])
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_generator_chromosome_order_is_a_uniform_shuffle():
    codes = np.arange(5, dtype=np.int8)
    sampled = np.tile(np.arange(5), (2000, 1))
    order = uce.shuffle_chromosomes(sampled, codes, np.random.default_rng(11))
    assert (np.sort(order, axis=1) == np.arange(5)).all()
    first = np.bincount(order[:, 0], minlength=5)
    assert stats.chisquare(first).pvalue > 1e-3


def test_generator_sentences_are_grouped_by_chromosome_and_sorted_by_start(golden, tiny_adata):
    encoder = load(golden, seed=5)
    tokens = encoder.tokenize(tiny_adata)
    genes = encoder.genes
    chrom_of = dict(zip(genes.token_ids, genes.chrom_codes, strict=True))
    start_of = dict(zip(genes.token_ids, genes.starts, strict=True))
    offsets = tokens.arrays["offsets"]
    for cell in range(tokens.n_cells):
        sentence = tokens.arrays["token_ids"][offsets[cell]: offsets[cell + 1]]
        assert sentence[0] == uce.CLS_TOKEN and sentence[-1] == uce.CHROM_RIGHT_TOKEN
        opens = np.flatnonzero(sentence >= 264)
        closes = np.flatnonzero(sentence == uce.CHROM_RIGHT_TOKEN)
        assert len(opens) == len(closes) and len(sentence) == 1 + 1024 + 2 * len(opens)
        assert len(set(sentence[opens])) == len(opens)  # each chromosome once
        for begin, end in zip(opens, closes, strict=True):
            group = sentence[begin + 1: end]
            assert {chrom_of[t] for t in group} == {sentence[begin] - 264}
            starts = [start_of[t] for t in group]
            assert starts == sorted(starts)


def test_generator_sampling_is_seeded_and_independent_of_chunking(golden, tiny_adata, monkeypatch):
    first = load(golden, seed=3).tokenize(tiny_adata).arrays["token_ids"]
    np.testing.assert_array_equal(load(golden, seed=3).tokenize(tiny_adata).arrays["token_ids"], first)
    monkeypatch.setattr(uce, "TOKENIZE_CHUNK", 5)
    np.testing.assert_array_equal(load(golden, seed=3).tokenize(tiny_adata).arrays["token_ids"], first)
    assert not np.array_equal(load(golden, seed=4).tokenize(tiny_adata).arrays["token_ids"], first)


def test_sentences_longer_than_pad_length_are_dropped_with_the_reason(golden, tiny_adata):
    tokens = load(golden, sampling="legacy", seed=1234, pad_length=1072).tokenize(tiny_adata)
    assert (tokens.arrays["sentence_lengths"] <= 1072).all() and tokens.n_cells == 1
    assert tokens.arrays["token_ids"].size == tokens.arrays["sentence_lengths"].sum()
    assert sum("exceeds pad_length=1072" in reason for reason in tokens.dropped.values()) == 11


def test_tokenize_refuses_data_without_known_genes(golden, tiny_adata):
    renamed = tiny_adata.copy()
    renamed.var_names = [f"UNKNOWN{i}" for i in range(renamed.n_vars)]
    with pytest.raises(SchemaError, match="protein embedding"):
        load(golden).tokenize(renamed)


def test_embed_refuses_log_normalised_input(golden, tiny_adata):
    logged = tiny_adata.copy()
    logged.X = np.log1p(logged.X.toarray() * 0.37)
    with pytest.raises(SchemaError, match="raw counts"):
        load(golden).embed(logged)


# --- token table, files, loader -------------------------------------------------------------------------

def test_token_file_without_chromosome_rows_gets_the_seed_23_rows(golden, tmp_path):
    table = torch.load(golden / "all_tokens.torch", weights_only=True)
    torch.save(table[:264].clone(), tmp_path / "all_tokens.torch")
    config = uce.UCEConfig(token_dim=16, d_model=32, nhead=4, n_tokens=323, chrom_token_offset=264)
    assert torch.equal(uce.official_token_table(tmp_path / "all_tokens.torch", config), table)


def test_new_species_token_file_replaces_the_checkpoint_table(golden, tmp_path):
    for name in ("checkpoint.torch", "species_chrom.csv", "species_offsets.pkl"):
        shutil.copy(golden / name, tmp_path / name)
    shutil.copytree(golden / "protein_embeddings", tmp_path / "protein_embeddings")
    table = torch.load(golden / "all_tokens.torch", weights_only=True)
    torch.save(torch.vstack((table, torch.ones(2, 16))), tmp_path / "all_tokens.torch")
    encoder = uce.UCEEncoder.from_pretrained(tmp_path / "checkpoint.torch", **TINY)
    assert encoder.module.pe_embedding.weight.shape == (325, 16)
    assert not encoder.module.pe_embedding.weight.requires_grad


def test_species_offsets_are_read_without_running_pickled_code(golden, tmp_path):
    assert uce.read_species_offsets(golden / "species_offsets.pkl")["human"] == 9

    class Exploit:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"human": Exploit()}))
    with pytest.raises(CheckpointError, match="refused global shutil.rmtree"):
        uce.read_species_offsets(tmp_path / "evil.pkl")
    assert (tmp_path / "victim").is_dir()


@pytest.mark.parametrize("variant", ["4layer_model.torch", "33l_8ep_1024t_1280.torch"])
def test_full_size_model_has_exactly_the_official_keys_and_shapes(golden, variant):
    reference = json.loads((golden / "keys_full.json").read_text())[variant]
    published = reference["config"]
    config = uce.UCEConfig(nlayers=published["nlayers"], output_dim=published["output_dim"],
                           binary_decoder_hidden=tuple(published["binary_decoder"][1:-1]))
    with torch.device("meta"):
        model = uce.UCEModel(config)
    shapes = uce.official_shapes(model)
    assert list(shapes) == [k["name"] for k in reference["keys"]]
    assert shapes == {k["name"]: tuple(k["shape"]) for k in reference["keys"]}
    assert sum(int(np.prod(s)) for s in shapes.values()) == reference["num_elements"]


def strict_load(golden, folder, state_dict):
    folder.mkdir()
    for name in ("species_chrom.csv", "species_offsets.pkl", "all_tokens.torch"):
        shutil.copy(golden / name, folder / name)
    shutil.copytree(golden / "protein_embeddings", folder / "protein_embeddings")
    torch.save(state_dict, folder / "checkpoint.torch")
    return uce.UCEEncoder.from_pretrained(folder / "checkpoint.torch", **TINY)


def test_loader_names_missing_unexpected_and_misshaped_keys(golden, tmp_path):
    state = torch.load(golden / "checkpoint.torch", weights_only=True)
    missing = {k: v for k, v in state.items() if k != "decoder.3.bias"}
    with pytest.raises(CheckpointError, match=r"missing 1 keys: \['decoder.3.bias'\]"):
        strict_load(golden, tmp_path / "missing", missing)
    extra = {**state, "decoder.9.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="unexpected 1 keys.*decoder.9.weight"):
        strict_load(golden, tmp_path / "extra", extra)
    wrong = {**state, "encoder.2.bias": torch.zeros(31)}
    with pytest.raises(CheckpointError, match=r"mis-shaped.*encoder.2.bias \(31,\)"):
        strict_load(golden, tmp_path / "wrong", wrong)


def test_corrupted_checkpoint_is_a_checkpoint_error(golden, tmp_path):
    data = (golden / "checkpoint.torch").read_bytes()
    (tmp_path / "checkpoint.torch").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        uce.UCEEncoder.from_pretrained(tmp_path / "checkpoint.torch", **TINY)
    torch.save(torch.zeros(3), tmp_path / "tensor.torch")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        uce.UCEEncoder.from_pretrained(tmp_path / "tensor.torch", **TINY)


def test_default_weights_load_from_the_cache_and_extract_protein_embeddings(golden, tmp_path, monkeypatch):
    import tarfile

    from scdrugmap.models.base import get_encoder_class
    from scdrugmap.models.weights import MANIFEST, cache_path

    source = uce.UCEEncoder.weights_sources["4layer"]
    folder = cache_path(source)
    folder.mkdir(parents=True)
    shutil.copy(golden / "checkpoint.torch", folder / "4layer_model.torch")
    for name in ("all_tokens.torch", "species_chrom.csv", "species_offsets.pkl"):
        shutil.copy(golden / name, folder / name)
    with tarfile.open(folder / "protein_embeddings.tar.gz", "w:gz") as archive:
        archive.add(golden / "protein_embeddings", arcname="protein_embeddings")
    (folder / MANIFEST).write_text(json.dumps({f.filename: "recorded-digest" for f in source.files}))
    monkeypatch.setenv("SCDRUGMAP_OFFLINE", "1")
    encoder = uce.UCEEncoder.from_pretrained(None, **TINY)
    assert encoder.checkpoint_sha256 == "recorded-digest"
    assert (folder / "protein_embeddings" / uce.PROTEIN_EMBEDDING_FILES["human"]).is_file()
    assert encoder.embedding_dim == 24 and encoder.describe()["nlayers"] == 2
    assert get_encoder_class("uce") is uce.UCEEncoder


def test_missing_default_weights_offline_name_the_download(monkeypatch):
    from scdrugmap.errors import WeightsNotFoundError

    monkeypatch.setenv("SCDRUGMAP_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="uce-4layer"):
        uce.UCEEncoder.from_pretrained()


def test_unknown_option_is_a_config_error(golden):
    with pytest.raises(ConfigError, match="unknown UCE options"):
        load(golden, n_layers=3)
