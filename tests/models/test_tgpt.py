"""tGPT: golden tokenization and pooling parity, strict loading of the legacy file, full-size keys.

LoRA (with its Conv1D fan_in_fan_out option) is checked for every model in test_contract.py.
"""

from __future__ import annotations

import functools
import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scdrugmap.errors import CheckpointError, ConfigError, SchemaError, WeightsNotFoundError
from scdrugmap.models.base import get_encoder_class
from scdrugmap.models.tgpt import TGPTConfig, TGPTEncoder, TGPTTokenizer, build_tgpt_model, clean_symbols

ATOL = 1e-5


@functools.cache
def read_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return dict(data)


@pytest.fixture
def golden_dir(shared):
    return shared("golden", "tgpt")


@pytest.fixture
def inputs(golden_dir):
    return read_npz(str(golden_dir / "inputs.npz"))


@pytest.fixture
def expected(golden_dir):
    return read_npz(str(golden_dir / "expected.npz"))


@pytest.fixture
def encoder(golden_dir):
    return TGPTEncoder.from_pretrained(golden_dir / "checkpoint")


@pytest.fixture
def cells(inputs):
    return ad.AnnData(sp.csr_matrix(inputs["counts"]), var=pd.DataFrame(index=inputs["genes"]))


def sequences(tokens):
    flat, offsets = tokens.arrays["input_ids"], tokens.arrays["offsets"]
    return [flat[offsets[i]:offsets[i + 1]] for i in range(tokens.n_cells)]


# --- tokenizer ------------------------------------------------------------------------------------------

def test_symbols_are_cleaned_like_line_dataset(inputs):
    assert clean_symbols(inputs["genes"]) == list(inputs["genes_cleaned"])
    assert clean_symbols(["HLA-B", "AC119396.1", "RP11-34P13.7"]) == ["HLA_B", "AC119396_1", "RP11_34P13_7"]


def test_tokens_and_batch_equal_what_the_official_snippet_fed_the_model(encoder, cells, inputs, expected):
    tokens = encoder.tokenize(cells)
    lengths = expected["lengths"]
    np.testing.assert_array_equal(tokens.lengths, lengths)
    for k, ours in enumerate(sequences(tokens)):
        np.testing.assert_array_equal(ours, expected["input_ids"][k, :lengths[k]])
    batch = encoder.collate(tokens, np.arange(tokens.n_cells))
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(batch[key].numpy(), inputs[key])
    unknown = [int((s == encoder.tokenizer.unk_id).sum()) for s in sequences(tokens)]
    assert unknown == list(expected["n_unk"])


def test_ranking_ties_keep_column_order_and_dense_input_gives_the_same_tokens(encoder, cells, inputs):
    dense = ad.AnnData(inputs["counts"], var=pd.DataFrame(index=inputs["genes"]))
    a, b = encoder.tokenize(cells), encoder.tokenize(dense)
    np.testing.assert_array_equal(a.arrays["input_ids"], b.arrays["input_ids"])
    tiny = ad.AnnData(np.array([[5.0, 0, 5, 9, 1]], dtype=np.float32),
                      var=pd.DataFrame(index=["ACTB", "B2M", "FTL", "HLA-B", "NOT-A-GENE"]))
    vocab = encoder.tokenizer.tokenizer
    expected_ids = [1] + [vocab.token_to_id(g) for g in ("HLA_B", "ACTB", "FTL")] + [3, 2]
    np.testing.assert_array_equal(sequences(encoder.tokenize(tiny))[0], expected_ids)


def test_multi_token_symbols_are_counted_against_the_token_budget(golden_dir):
    tokenizer = TGPTTokenizer(golden_dir / "checkpoint" / "tokenizer.json", max_length=6)
    genes = ["A/B", "ACTB", "B2M", "FTL"]  # "A/B" -> three <unk> pieces
    cells = ad.AnnData(np.array([[9.0, 8, 7, 6], [0, 8, 7, 6]], dtype=np.float32), var=pd.DataFrame(index=genes))
    first, second = sequences(tokenizer.tokenize(cells))
    vocab = tokenizer.tokenizer
    np.testing.assert_array_equal(first, [1, 3, 3, 3, vocab.token_to_id("ACTB"), 2])
    np.testing.assert_array_equal(second, [1] + [vocab.token_to_id(g) for g in ("ACTB", "B2M", "FTL")] + [2])


def test_longer_variant_keeps_max_length_minus_two_genes(golden_dir, cells):
    tokens = TGPTTokenizer(golden_dir / "checkpoint" / "tokenizer.json", max_length=128).tokenize(cells)
    assert tokens.lengths.max() == 128 and all(s[0] == 1 and s[-1] == 2 for s in sequences(tokens))


def test_bad_input_is_refused(encoder, cells):
    ensembl = cells.copy()
    ensembl.var_names = [f"ENSG{i:011d}" for i in range(cells.n_vars)]
    with pytest.raises(SchemaError, match="tGPT reads gene symbols"):
        encoder.tokenize(ensembl)
    negative = ad.AnnData(-np.ones((2, 3), dtype=np.float32), var=pd.DataFrame(index=["ACTB", "B2M", "FTL"]))
    with pytest.raises(SchemaError, match="non-negative"):
        encoder.tokenize(negative)


# --- model and pooling ----------------------------------------------------------------------------------

def test_embeddings_match_the_official_snippet(encoder, cells, expected):
    embeddings = encoder.embed(cells, batch_size=64)
    np.testing.assert_allclose(embeddings, expected["cell_emb"], atol=ATOL, rtol=0)


def test_bucketed_batches_equal_one_cell_at_a_time(encoder, cells):
    tokens = encoder.tokenize(cells)
    np.testing.assert_allclose(encoder.embed_tokens(tokens, batch_size=7), encoder.embed_tokens(tokens, batch_size=1),
                               atol=ATOL, rtol=0)


def test_cell_without_expressed_genes_is_dropped_and_gets_nan(encoder, inputs):
    counts = inputs["counts"][:3].copy()
    counts[1] = 0
    adata = ad.AnnData(counts, var=pd.DataFrame(index=inputs["genes"]))
    embeddings = encoder.embed(adata)
    assert np.isnan(embeddings[1]).all() and np.isfinite(embeddings[[0, 2]]).all()
    assert 1 in encoder.tokenize(adata).dropped


def test_full_size_model_has_the_published_keys_and_shapes(golden_dir):
    published = json.loads((golden_dir / "keys_full.json").read_text())
    config = TGPTConfig()
    for field, value in published["config"].items():
        if hasattr(config, field):
            assert getattr(config, field) == value, field
    with torch.device("meta"):
        model = build_tgpt_model(config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = {k: v for k, v in published["state_dict"].items() if k != "lm_head.weight"}  # tied, not run
    assert ours == official
    assert sum(p.numel() for p in model.parameters()) == published["n_params_unique"]


# --- loading --------------------------------------------------------------------------------------------

def copy_checkpoint(golden_dir, tmp_path, edit=None):
    folder = tmp_path / "transcriptome-gpt-1024-8-16-64"
    shutil.copytree(golden_dir / "checkpoint", folder)
    if edit is not None:
        state = torch.load(folder / "pytorch_model.bin", weights_only=True)
        edited = edit(state)
        torch.save(edited if isinstance(edited, dict) else state, folder / "pytorch_model.bin")
    return folder


def test_legacy_buffers_and_lm_head_are_listed_in_one_log_line(golden_dir, caplog):
    with caplog.at_level("INFO", logger="scdrugmap.models.tgpt"):
        encoder = TGPTEncoder.from_pretrained(golden_dir / "checkpoint")
    ignored = [r.message for r in caplog.records if "ignoring" in r.message]
    assert len(ignored) == 1 and "lm_head.weight" in ignored[0] and "h.1.attn.masked_bias" in ignored[0]
    assert encoder.tokenizer.max_length == 64 and len(encoder.checkpoint_sha256) == 64


def test_file_without_lm_head_or_prefix_loads_identically(golden_dir, tmp_path, cells, encoder):
    def strip(state):
        return {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}

    other = TGPTEncoder.from_pretrained(copy_checkpoint(golden_dir, tmp_path, strip))
    np.testing.assert_array_equal(other.embed(cells), encoder.embed(cells))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"), "missing keys.*h.1.mlp.c_fc.bias"),
    (lambda s: s.update({"transformer.h.2.ln_1.weight": torch.ones(32)}), "unexpected keys.*h.2.ln_1"),
    (lambda s: s.update({"transformer.wpe.weight": torch.zeros(64, 32)}), r"mis-shaped.*\(64, 32\) vs model \(1024, 32\)"),
])
def test_checkpoint_that_does_not_fit_raises_naming_the_key(edit, message, golden_dir, tmp_path):
    with pytest.raises(CheckpointError, match=message):
        TGPTEncoder.from_pretrained(copy_checkpoint(golden_dir, tmp_path, edit))


def test_corrupted_or_incomplete_folders_raise_checkpoint_errors(golden_dir, tmp_path):
    folder = copy_checkpoint(golden_dir, tmp_path)
    weights = folder / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot read the checkpoint"):
        TGPTEncoder.from_pretrained(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        TGPTEncoder.from_pretrained(folder)
    with pytest.raises(ConfigError, match="unknown tGPT options"):
        TGPTEncoder.from_pretrained(golden_dir / "checkpoint", layer=1)


def test_registry_sources_and_max_length_from_the_variant_name(golden_dir, tmp_path, monkeypatch):
    assert get_encoder_class("tgpt") is TGPTEncoder
    urls = [f.url for f in TGPTEncoder.weights_sources["tgpt-1024-8-16-64"].files]
    assert "hf://lixiangchun/transcriptome-gpt-1024-8-16-64/main/pytorch_model.bin" in urls
    folder = tmp_path / "transcriptome-gpt-1024-8-16-128"
    shutil.copytree(golden_dir / "checkpoint", folder)
    assert TGPTEncoder.from_pretrained(folder).tokenizer.max_length == 128
    monkeypatch.setenv("SCDRUGMAP_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError):
        TGPTEncoder.from_pretrained()
