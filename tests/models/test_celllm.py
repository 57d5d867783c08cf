"""CellLM: golden parity (tokens, hidden states, pooled embeddings), padding and batch quirks, loader.

Shapes, strict loading and LoRA are checked for every model in test_contract.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import anndata as ad
import numpy as np
import pytest
import torch

from scdrugmap.errors import CheckpointError, ConfigError, WeightsNotFoundError
from scdrugmap.models.celllm import CellLMConfig, CellLMEncoder, build_celllm_model

TOLERANCE = 1e-5
#: The fixture ran scBERT's preprocess.py with min_genes lowered from 200 to 5 (golden README).
FIXTURE_MIN_GENES = 5
POOLED = {"cls": "cell_emb_cls", "mean": "cell_emb_mean", "mean_genes": "cell_emb_mean_genes"}


@pytest.fixture
def golden(shared):
    folder = shared("golden", "celllm")
    return folder, np.load(folder / "inputs.npz"), np.load(folder / "expected.npz")


def load(golden, **options):
    folder, inputs, _ = golden
    config = CellLMConfig.from_official(folder / "config.json")
    return CellLMEncoder.from_pretrained(folder / "checkpoint.pth", config=config, genes=list(inputs["vocab_genes"]),
                                         min_genes=FIXTURE_MIN_GENES, **options)


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


def test_tokens_positions_and_mask_equal_those_inside_the_official_forward(golden, cells):
    _, inputs, _ = golden
    encoder = load(golden, compress_padding=False)
    batch = encoder.collate(encoder.tokenize(cells), np.arange(12))
    np.testing.assert_array_equal(batch["input_ids"].numpy(), inputs["input_tokens"])
    np.testing.assert_array_equal(batch["gene_pos"].numpy(), inputs["gene_pos"])
    np.testing.assert_array_equal(batch["mask"].numpy(), inputs["padding_mask"])


def test_truncation_keeps_the_first_genes_in_index_order(golden, cells):
    _, inputs, _ = golden
    encoder = load(golden)
    tokens = encoder.tokenize(cells)
    assert tokens.lengths.tolist() == [48, 29, 36, 33, 33, 33, 48, 48, 48, 43, 26, 32]
    first = tokens.arrays["gene_ids"][tokens.arrays["offsets"][0] : tokens.arrays["offsets"][1]]
    expressed = np.flatnonzero(inputs["model_input"][0] > 0)
    np.testing.assert_array_equal(first, expressed[:47])


@pytest.mark.parametrize("compress_padding", [False, True])
def test_one_cell_per_forward_matches_golden(golden, cells, compress_padding):
    _, _, expected = golden
    encoder = load(golden, compress_padding=compress_padding)
    tokens = encoder.tokenize(cells)
    for row in range(12):
        states = hidden(encoder, tokens, [row])[0]
        width = states.shape[0]
        assert np.abs(states - expected["hidden_b1"][row, :width]).max() < TOLERANCE
        assert not expected["hidden_b1"][row, width:].any()  # compressed: the cut-off positions are pads (zero)
    encoder.key_max = "cell"  # one batch, each cell as if alone
    for pooling, key in POOLED.items():
        encoder.pooling = pooling
        np.testing.assert_allclose(encoder.embed(cells, batch_size=12), expected[f"{key}_b1"], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("compress_padding", [False, True])
def test_official_batching_reproduces_the_batch_of_twelve(golden, cells, compress_padding):
    _, _, expected = golden
    encoder = load(golden, compress_padding=compress_padding)
    tokens = encoder.tokenize(cells)
    assert np.abs(hidden(encoder, tokens, range(12)) - expected["hidden_b12"]).max() < TOLERANCE
    for pooling, key in POOLED.items():
        encoder.pooling = pooling
        np.testing.assert_allclose(encoder.embed(cells, batch_size=12), expected[f"{key}_b12"], atol=TOLERANCE, rtol=0)


def test_logits_and_input_embeddings_match_golden_when_padded_literally(golden, cells):
    _, _, expected = golden
    encoder = load(golden, compress_padding=False)
    batch = encoder.collate(encoder.tokenize(cells), np.arange(12))
    with torch.no_grad():
        logits = encoder.module(batch["input_ids"], batch["gene_pos"], batch["mask"]).numpy()
        embedded = encoder.module.embed_inputs(batch["input_ids"], batch["gene_pos"]).numpy()
    assert np.abs(logits - expected["logits_b12"]).max() < TOLERANCE
    np.testing.assert_array_equal(embedded, expected["embedding_sum"])


def test_pad_keys_matter_so_padding_cannot_simply_be_dropped(golden, cells):
    """Pads enter the FAVOR+ normaliser: without them the fixture's hidden states move by ~0.46."""
    _, _, expected = golden
    encoder = load(golden)
    batch = encoder.collate(encoder.tokenize(cells), np.array([10]))
    batch["key_weight"] = batch["mask"].float()  # real tokens only
    with torch.no_grad():
        states = encoder.hidden_states(batch).numpy()[0]
    assert np.abs(states - expected["hidden_b1"][10, : states.shape[0]]).max() > 0.1


def test_per_cell_key_max_is_batch_independent_and_equals_one_cell_per_forward(golden, cells):
    """Measured on the fixture: CLS embeddings move by 1.8e-3 between batch-of-12 and per-cell modes."""
    _, _, expected = golden
    encoder = load(golden)
    batch_mode = encoder.embed(cells, batch_size=12)
    encoder.key_max = "cell"
    per_cell_12 = encoder.embed(cells, batch_size=12)
    per_cell_5 = encoder.embed(cells, batch_size=5)
    np.testing.assert_allclose(per_cell_12, expected["cell_emb_cls_b1"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(per_cell_5, per_cell_12, atol=1e-6, rtol=0)
    difference = np.abs(batch_mode - per_cell_12).max()
    assert 1e-3 < difference < 5e-3, difference


def test_batch_mode_batches_consecutive_cells_and_cell_mode_buckets_by_length(golden, cells):
    encoder = load(golden)
    tokens = encoder.tokenize(cells)
    assert [rows.tolist() for rows, _ in encoder.iter_batches(tokens, 5)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    encoder.key_max = "cell"
    first, _ = next(iter(encoder.iter_batches(tokens, 5)))
    assert sorted(tokens.lengths[first].tolist()) == [43, 48, 48, 48, 48]


def test_full_published_architecture_has_the_official_keys_shapes_dtypes_and_frozen_layers(shared):
    reference = json.loads(shared("golden", "celllm", "keys_full.json").read_text())
    with torch.device("meta"):
        module = build_celllm_model(CellLMConfig())
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()]
    assert got == [(k["key"], k["shape"], k["dtype"]) for k in reference["keys"]]
    assert sum(p.numel() for p in module.parameters()) == reference["n_parameters_total"]
    trainable = {k["key"]: k["requires_grad"] for k in reference["keys"] if k["kind"] == "parameter"}
    assert {n: p.requires_grad for n, p in module.named_parameters()} == trainable


def test_official_config_json_is_read(golden):
    folder, _, _ = golden
    config = CellLMConfig.from_official(folder / "config.json")
    assert (config.dim, config.depth, config.heads, config.dim_head, config.gene_num) == (32, 2, 2, 8, 120)
    assert CellLMConfig().max_seq_len == 6000 and CellLMConfig().cls_token_id == 6 and CellLMConfig().pad_gene_id == 19380


def test_unsupported_official_options_are_refused(tmp_path):
    path = tmp_path / "cellLM.json"
    path.write_text(json.dumps({"network": {"structure": {"local_attn_heads": 2}}}))
    with pytest.raises(ConfigError, match="local_attn_heads"):
        CellLMConfig.from_official(path)


def test_corrupted_checkpoint_raises_checkpoint_error(golden, tmp_path):
    folder, inputs, _ = golden
    (tmp_path / "checkpoint4_fixed.pth").write_bytes(b"not a torch file" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        CellLMEncoder.from_pretrained(tmp_path, config=CellLMConfig.from_official(folder / "config.json"),
                                      genes=list(inputs["vocab_genes"]))


def test_missing_param_key_and_wrong_gene_count_are_named(golden, tmp_path):
    folder, inputs, _ = golden
    state = torch.load(folder / "checkpoint.pth", weights_only=True)["model_state_dict"]
    torch.save({"epoch": 3, "state": state}, tmp_path / "checkpoint4_fixed.pth")
    config = CellLMConfig.from_official(folder / "config.json")
    with pytest.raises(CheckpointError, match="no 'model_state_dict' entry"):
        CellLMEncoder.from_pretrained(tmp_path, config=config, genes=list(inputs["vocab_genes"]))
    with pytest.raises(CheckpointError, match="gene_num=120"):
        CellLMEncoder.from_pretrained(folder / "checkpoint.pth", config=config, genes=list(inputs["vocab_genes"][:50]))


def test_a_config_that_does_not_fit_names_the_misshaped_keys(golden):
    folder, inputs, _ = golden
    wider = dataclasses.replace(CellLMConfig.from_official(folder / "config.json"), dim_head=16)
    with pytest.raises(CheckpointError, match=r"fn.to_k.weight \(16, 32\) vs model \(32, 32\)"):
        CellLMEncoder.from_pretrained(folder / "checkpoint.pth", config=wider, genes=list(inputs["vocab_genes"]))


def test_folder_layout_with_config_and_gene_list_loads(golden, tmp_path, cells):
    folder, inputs, expected = golden
    shutil.copy(folder / "checkpoint.pth", tmp_path / "checkpoint4_fixed.pth")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    (tmp_path / "genes.txt").write_text("\n".join(inputs["vocab_genes"]) + "\n")
    encoder = CellLMEncoder.from_pretrained(tmp_path, min_genes=FIXTURE_MIN_GENES)
    np.testing.assert_allclose(encoder.embed(cells, batch_size=12), expected["cell_emb_cls_b12"], atol=TOLERANCE)
    assert len(encoder.checkpoint_sha256) == 64


def test_missing_default_weights_explain_the_manual_download():
    with pytest.raises(WeightsNotFoundError, match="Baidu"):
        CellLMEncoder.from_pretrained()


def test_unknown_pooling_is_refused(golden):
    with pytest.raises(ConfigError, match="pooling"):
        load(golden, pooling="max")
