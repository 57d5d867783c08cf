"""scBERT: golden parity (preprocessing, hidden states, logits, pooled embeddings), batch quirk, loader.

LoRA is checked for every model in test_contract.py.
"""

from __future__ import annotations

import json
import shutil
from argparse import Namespace

import anndata as ad
import numpy as np
import pytest
import torch

from scdrugmap.errors import CheckpointError, SchemaError, WeightsNotFoundError
from scdrugmap.models._performer import preprocessed_cells, read_gene_list, reference_selection
from scdrugmap.models.scbert import ScBERTConfig, ScBERTEncoder, bin_values, build_scbert_model

TOLERANCE = 1e-5
#: The fixture's preprocess.py ran with min_genes lowered from 200 to 5 (golden README).
FIXTURE_MIN_GENES = 5


@pytest.fixture
def golden(shared):
    folder = shared("golden", "scbert")
    return folder, np.load(folder / "inputs.npz"), np.load(folder / "expected.npz")


@pytest.fixture
def encoder(golden):
    folder, _, _ = golden
    config = ScBERTConfig.from_official(folder / "tiny_config.json")
    return ScBERTEncoder.from_pretrained(folder, config=config, min_genes=FIXTURE_MIN_GENES)


@pytest.fixture
def cells(golden):
    _, inputs, _ = golden
    adata = ad.AnnData(X=inputs["counts"].copy())
    adata.var_names = list(inputs["genes"])
    adata.obs_names = list(inputs["cell_ids"])
    return adata


def hidden(encoder, tokens, rows):
    with torch.no_grad():
        return encoder.hidden_states(encoder.collate(tokens, np.asarray(rows))).numpy()


def test_preprocessing_reproduces_official_log2_values_bins_and_input_ids(encoder, cells, golden):
    _, inputs, _ = golden
    log2, kept, dropped, n_matched = preprocessed_cells(cells, encoder.genes, layer=None, gene_key=None,
                                                        min_genes=FIXTURE_MIN_GENES, model="scbert")
    assert n_matched == 90 and not dropped and kept.tolist() == list(range(12))
    np.testing.assert_allclose(log2.toarray(), inputs["log2norm"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(bin_values(log2.toarray()), inputs["bins"])
    tokens = encoder.tokenize(cells)
    batch = encoder.collate(tokens, np.arange(12))
    np.testing.assert_array_equal(batch["input_ids"].numpy(), inputs["input_ids"])


def test_reference_genes_are_read_from_the_panglao_h5ad_like_preprocess_py(golden):
    folder, inputs, _ = golden
    np.testing.assert_array_equal(read_gene_list(folder / "panglao_tiny.h5ad"), inputs["vocab_genes"])


def test_openbiomed_scbert_config_layout_is_read(tmp_path):
    path = tmp_path / "scbert.json"
    structure = {"name": "scbert", "num_tokens": 7, "dim": 200, "depth": 6, "max_seq_len": 16907, "gene_num": 16906,
                 "heads": 10, "local_attn_heads": 0, "g2v_position_emb": True, "param_key": "model_state_dict"}
    path.write_text(json.dumps({"network": {"structure": structure}}))
    assert ScBERTConfig.from_official(path) == ScBERTConfig()


def test_alignment_copies_first_duplicate_and_zero_fills_absent_reference_genes():
    reference = np.array(["A", "B", "C"])
    data_genes = np.array(["B", "X", "B", "A"])
    selection = reference_selection(data_genes, reference).toarray()
    counts = np.array([[5.0, 7.0, 9.0, 1.0]])
    np.testing.assert_array_equal(counts @ selection, [[1.0, 5.0, 0.0]])


def test_gene_symbol_column_is_preferred_over_var_names(encoder, cells, golden):
    _, inputs, _ = golden
    renamed = cells.copy()
    renamed.var["gene_symbol"] = renamed.var_names
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    batch = encoder.collate(encoder.tokenize(renamed), np.arange(12))
    np.testing.assert_array_equal(batch["input_ids"].numpy(), inputs["input_ids"])


def test_unknown_genes_are_refused_with_the_fix(encoder, cells):
    unknown = cells.copy()
    unknown.var_names = [f"ENSG{i:011d}" for i in range(unknown.n_vars)]
    with pytest.raises(SchemaError, match="gene symbols"):
        encoder.tokenize(unknown)


def test_cells_below_min_genes_are_dropped_with_a_reason(golden, cells):
    folder, _, _ = golden
    config = ScBERTConfig.from_official(folder / "tiny_config.json")
    strict = ScBERTEncoder.from_pretrained(folder, config=config, min_genes=200)
    tokens = strict.tokenize(cells)
    assert tokens.n_cells == 0 and len(tokens.dropped) == 12
    assert "fewer than min_genes=200" in tokens.dropped[0]
    embeddings = strict.embed(cells)
    assert np.isnan(embeddings).all()


def test_one_cell_per_forward_matches_golden_hidden_states_logits_and_embedding(encoder, cells, golden):
    _, _, expected = golden
    tokens = encoder.tokenize(cells)
    states = np.concatenate([hidden(encoder, tokens, [i]) for i in range(12)])
    assert np.abs(states - expected["hidden_b1"]).max() < TOLERANCE
    np.testing.assert_allclose(states.mean(axis=1), expected["cell_emb_mean_b1"], atol=TOLERANCE, rtol=0)
    with torch.no_grad():
        batch = encoder.collate(tokens, np.array([3]))
        logits = encoder.module(batch["input_ids"]).numpy()
        embedded = encoder.module.embed_inputs(batch["input_ids"]).numpy()
    np.testing.assert_allclose(logits[0], expected["logits_b1"][3], atol=TOLERANCE, rtol=0)
    np.testing.assert_array_equal(embedded[0], expected["embedding_sum_b1"][3])


def test_official_batching_reproduces_the_batch_of_twelve(encoder, cells, golden):
    _, _, expected = golden
    tokens = encoder.tokenize(cells)
    assert np.abs(hidden(encoder, tokens, range(12)) - expected["hidden_b12"]).max() < TOLERANCE
    with torch.no_grad():
        logits = encoder.module(encoder.collate(tokens, np.arange(12))["input_ids"]).numpy()
    assert np.abs(logits - expected["logits_b12"]).max() < TOLERANCE
    embeddings = encoder.embed(cells, batch_size=12)
    np.testing.assert_allclose(embeddings, expected["cell_emb_mean_b12"], atol=TOLERANCE, rtol=0)


def test_per_cell_key_max_is_batch_independent_and_equals_one_cell_per_forward(encoder, cells, golden):
    """Measured on the fixture: hidden states move by 2.9e-4 and pooled embeddings by 1.1e-4 between modes."""
    _, _, expected = golden
    batch_mode = encoder.embed(cells, batch_size=12)
    encoder.key_max = "cell"
    per_cell_12 = encoder.embed(cells, batch_size=12)
    per_cell_5 = encoder.embed(cells, batch_size=5)
    np.testing.assert_allclose(per_cell_12, expected["cell_emb_mean_b1"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(per_cell_5, per_cell_12, atol=1e-6, rtol=0)
    difference = np.abs(batch_mode - per_cell_12).max()
    assert 5e-5 < difference < 5e-4, difference


def test_full_published_architecture_has_the_official_keys_shapes_and_dtypes(shared):
    reference = json.loads(shared("golden", "scbert", "keys_full.json").read_text())
    with torch.device("meta"):
        module = build_scbert_model(ScBERTConfig())
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()]
    assert got == [(k["key"], k["shape"], k["dtype"]) for k in reference["keys"]]
    assert sum(p.numel() for p in module.parameters()) == reference["n_parameters_total"]


def test_truncated_checkpoint_raises_checkpoint_error(golden, tmp_path):
    folder, _, _ = golden
    broken = tmp_path / "panglao_pretrain.pth"
    broken.write_bytes((folder / "checkpoint.pth").read_bytes()[:4000])
    shutil.copy(folder / "vocab_genes.txt", tmp_path)
    config = ScBERTConfig.from_official(folder / "tiny_config.json")
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        ScBERTEncoder.from_pretrained(tmp_path, config=config)


def test_mismatched_state_dict_names_missing_unexpected_and_misshaped_keys(golden, tmp_path):
    folder, _, _ = golden
    container = torch.load(folder / "checkpoint.pth", weights_only=True)
    state = container["model_state_dict"]
    del state["performer.net.layers.1.0.fn.to_k.weight"]
    state["performer.net.layers.9.0.norm.weight"] = torch.ones(16)
    state["norm.weight"] = torch.ones(17)
    torch.save(container, tmp_path / "panglao_pretrain.pth")
    shutil.copy(folder / "vocab_genes.txt", tmp_path)
    config = ScBERTConfig.from_official(folder / "tiny_config.json")
    with pytest.raises(CheckpointError) as info:
        ScBERTEncoder.from_pretrained(tmp_path, config=config)
    message = str(info.value)
    assert "missing keys: performer.net.layers.1.0.fn.to_k.weight" in message
    assert "unexpected keys: performer.net.layers.9.0.norm.weight" in message
    assert "norm.weight (17,) vs model (16,)" in message


def test_published_config_refuses_the_tiny_checkpoint_by_shape(golden):
    folder, _, _ = golden
    with pytest.raises(CheckpointError, match="reference genes"):
        ScBERTEncoder.from_pretrained(folder)  # 100 fixture genes vs 16,906


def test_checkpoint_with_pickled_objects_is_refused_not_executed(golden, tmp_path):
    folder, _, _ = golden
    container = torch.load(folder / "checkpoint.pth", weights_only=True)
    container["args"] = Namespace(lr=1e-4)
    torch.save(container, tmp_path / "panglao_pretrain.pth")
    shutil.copy(folder / "vocab_genes.txt", tmp_path)
    config = ScBERTConfig.from_official(folder / "tiny_config.json")
    with pytest.raises(CheckpointError, match="re-save its state dict"):
        ScBERTEncoder.from_pretrained(tmp_path, config=config)


def test_numpy_loss_and_finetuned_head_in_the_container_still_load(golden, tmp_path, cells):
    folder, _, expected = golden
    container = torch.load(folder / "checkpoint.pth", weights_only=True)
    container["losses"] = np.float64(container["losses"])
    state = container["model_state_dict"]
    for key in ("to_out.weight", "to_out.bias"):
        del state[key]
    state["to_out.fc1.weight"] = torch.zeros(4, 101)  # finetune.py's Identity head: not used for embeddings
    torch.save(container, tmp_path / "panglao_pretrain.pth")
    shutil.copy(folder / "vocab_genes.txt", tmp_path)
    config = ScBERTConfig.from_official(folder / "tiny_config.json")
    loaded = ScBERTEncoder.from_pretrained(tmp_path, config=config, min_genes=FIXTURE_MIN_GENES)
    assert loaded.module.to_out is None
    np.testing.assert_allclose(loaded.embed(cells, batch_size=12), expected["cell_emb_mean_b12"], atol=TOLERANCE)


def test_missing_default_weights_explain_the_manual_download():
    with pytest.raises(WeightsNotFoundError, match="share links"):
        ScBERTEncoder.from_pretrained()


def test_files_copied_into_the_cache_by_hand_are_found(golden, cells):
    from scdrugmap.models.weights import cache_path

    folder, _, expected = golden
    cache = cache_path(ScBERTEncoder.weights_sources["panglao_pretrain"])
    cache.mkdir(parents=True)
    shutil.copy(folder / "checkpoint.pth", cache / "panglao_pretrain.pth")
    shutil.copy(folder / "panglao_tiny.h5ad", cache / "panglao_10000.h5ad")
    config = ScBERTConfig.from_official(folder / "tiny_config.json")
    loaded = ScBERTEncoder.from_pretrained(config=config, min_genes=FIXTURE_MIN_GENES)
    np.testing.assert_allclose(loaded.embed(cells, batch_size=12), expected["cell_emb_mean_b12"], atol=TOLERANCE)


def test_projections_are_redrawn_only_in_training_every_interval(encoder, cells):
    performer = encoder.module.performer
    projection = performer.net.layers[0][0].fn.fast_attention.projection_matrix.clone()
    batch = encoder.collate(encoder.tokenize(cells), np.arange(1))
    with torch.no_grad():
        encoder.encode(batch)
        assert int(performer.calls_since_last_redraw) == 0
        performer.feature_redraw_interval = 2
        performer.train()
        for _ in range(3):
            encoder.encode(batch)
    assert int(performer.calls_since_last_redraw) == 0
    assert not torch.equal(projection, performer.net.layers[0][0].fn.fast_attention.projection_matrix)


def test_log_normalised_input_is_refused(encoder, cells):
    logged = cells.copy()
    logged.X = np.log1p(logged.X) + 0.01
    with pytest.raises(SchemaError, match="raw counts"):
        encoder.embed(logged)


def test_describe_reports_mode_and_gene_count(encoder):
    facts = encoder.describe()
    assert facts["key_max"] == "batch" and facts["n_genes"] == 100 and facts["embedding_dim"] == 16
    assert facts["lora_targets"] == ["to_q", "to_k", "to_v"]
