"""CellPLM: golden parity with the official embedding pipeline, batching of cells, strict loading.

LoRA is checked for every model in test_contract.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scdrugmap.errors import CheckpointError, ConfigError, SchemaError, WeightsNotFoundError
from scdrugmap.models.base import get_encoder_class
from scdrugmap.models.cellplm import (
    CellPLMConfig,
    CellPLMEncoder,
    CellPLMModel,
    official_chunks,
    read_checkpoint,
)
from scdrugmap.models.weights import MANIFEST, cache_path

TOLERANCE = 1e-5


@pytest.fixture
def golden(shared):
    folder = shared("golden", "cellplm")
    return folder, np.load(folder / "inputs.npz"), np.load(folder / "expected.npz")


@pytest.fixture
def encoder(golden):
    return CellPLMEncoder.from_pretrained(golden[0], device="cpu")


def golden_adata(inputs, *, with_batch: bool = False) -> ad.AnnData:
    adata = ad.AnnData(sp.csr_matrix(inputs["counts"]), obs=pd.DataFrame(index=inputs["cell_names"]),
                       var=pd.DataFrame(index=inputs["genes"]))
    if with_batch:
        adata.obs["batch"] = inputs["batch_labels"]
    return adata


def copy_checkpoint(golden_dir, tmp_path, state_edit=None, container_edit=None):
    """Copy the golden container into tmp_path, editing its state dict or container on the way."""
    shutil.copy(golden_dir / "checkpoint.config.json", tmp_path / "checkpoint.config.json")
    container = torch.load(golden_dir / "checkpoint.best.ckpt", weights_only=True)
    if state_edit is not None:
        state_edit(container["model_state_dict"])
    if container_edit is not None:
        container_edit(container)
    torch.save(container, tmp_path / "checkpoint.best.ckpt")
    return tmp_path


# --- parity with the official pipeline --------------------------------------------------------------------


def test_default_embedding_replays_official_predict_after_seed_42(golden, encoder):
    _, inputs, expected = golden
    embeddings = encoder.embed(golden_adata(inputs))
    assert embeddings.dtype == np.float32 and embeddings.shape == (12, 16)
    assert np.abs(embeddings - expected["emb"]).max() <= TOLERANCE


def test_grouped_chunked_embedding_replays_official_scenario_b(golden, encoder):
    _, inputs, expected = golden
    embeddings = encoder.embed(golden_adata(inputs, with_batch=True), batch_size=int(inputs["B_batch_size"]))
    assert np.abs(embeddings - expected["emb_B"]).max() <= TOLERANCE


def test_forward_passes_follow_official_groups_and_chunks(golden, encoder):
    _, inputs, _ = golden
    tokens = encoder.tokenize(golden_adata(inputs, with_batch=True))
    chunks = [rows for rows, _ in encoder.iter_batches(tokens, batch_size=4)]
    assert len(chunks) == int(inputs["B_num_calls"])
    for i, rows in enumerate(chunks):
        np.testing.assert_array_equal(rows, inputs[f"B_call{i}_cells"])


def test_every_stage_matches_official_intermediates(golden, encoder):
    _, inputs, expected = golden
    model = encoder.module
    batch = encoder.collate(encoder.tokenize(golden_adata(inputs)), np.arange(12))
    with torch.no_grad():
        h = model.embedder.feat_enc(batch["gene_ids"], batch["counts"], batch["offsets"])
        assert np.abs(h.numpy() - expected["A_h_gene_emb"]).max() <= TOLERANCE
        h = model.embedder(batch["gene_ids"], batch["counts"], batch["offsets"])
        assert np.abs(h.numpy() - expected["A_h_embed"]).max() <= TOLERANCE
        for i, layer in enumerate(model.encoder.layers):
            h = layer(h)
            assert np.abs(h.numpy() - expected[f"A_h_enc_layer{i}"]).max() <= TOLERANCE
        h = model.pre_latent_norm(h)
        assert np.abs(h.numpy() - expected["A_h_prelatent_norm"]).max() <= TOLERANCE
        logits = model.latent.layers[1].inference.inference_qyx[0].logits(h)
        assert np.abs(logits.numpy() - expected["A_gmvae_logits"]).max() <= TOLERANCE
        fixed_y = model.latent(h, categorical=torch.from_numpy(inputs["A_categorical_onehot"]))
    assert np.abs(fixed_y.numpy() - expected["emb"]).max() <= TOLERANCE


def test_each_official_chunk_matches_its_recorded_prediction_given_its_gumbel_draw(golden, encoder):
    _, inputs, expected = golden
    tokens = encoder.tokenize(golden_adata(inputs, with_batch=True))
    for i, (rows, batch) in enumerate(encoder.iter_batches(tokens, batch_size=4)):
        with torch.no_grad():
            h = encoder.module.pre_latent_norm(encoder.module.encoder(encoder.module.embedder(**batch)))
            pred = encoder.module.latent(h, categorical=torch.from_numpy(inputs[f"B_call{i}_categorical_onehot"]))
        assert rows.size == pred.shape[0]
        assert np.abs(pred.numpy() - expected[f"B_call{i}_pred"]).max() <= TOLERANCE


def test_unseeded_mode_draws_from_global_rng_like_official(golden):
    folder, inputs, expected = golden
    encoder = CellPLMEncoder.from_pretrained(folder, device="cpu", seed=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(inputs["seed_predict"]))
        embeddings = encoder.embed(golden_adata(inputs))
    assert np.abs(embeddings - expected["emb"]).max() <= TOLERANCE


# --- the Gumbel quirk and the deterministic mode ----------------------------------------------------------


def test_official_embedding_depends_on_the_seed_and_repeats_for_the_same_seed(golden):
    folder, inputs, _ = golden
    adata = golden_adata(inputs)
    seeded = CellPLMEncoder.from_pretrained(folder, device="cpu", seed=42)
    other = CellPLMEncoder.from_pretrained(folder, device="cpu", seed=7)
    first, again = seeded.embed(adata), seeded.embed(adata)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other.embed(adata)).max() > 1e-3  # README: up to 0.12 across seeds


def test_argmax_mode_is_deterministic_and_differs_from_official_only_where_the_cluster_flips(golden):
    folder, inputs, expected = golden
    argmax = CellPLMEncoder.from_pretrained(folder, device="cpu", latent_sampling="argmax")
    embeddings = argmax.embed(golden_adata(inputs))
    assert np.abs(embeddings - expected["A_emb_argmax_nonofficial"]).max() <= TOLERANCE
    flipped = expected["A_gmvae_logits"].argmax(1) != inputs["A_categorical_onehot"].argmax(1)
    gap = np.abs(embeddings - expected["emb"]).max(axis=1)
    # measured on the golden model: 8 of 12 cells flip cluster under seed 42, moving them by up to ~0.17
    assert flipped.sum() == 8 and 0.05 < gap.max() < 0.5
    assert np.all(gap[~flipped] <= TOLERANCE) and np.all(gap[flipped] > 1e-3)


# --- cells attend to cells --------------------------------------------------------------------------------


def test_cell_embedding_depends_on_the_cells_sharing_its_forward_pass(golden):
    folder, inputs, _ = golden
    encoder = CellPLMEncoder.from_pretrained(folder, device="cpu", latent_sampling="argmax")
    adata = golden_adata(inputs)
    whole = encoder.embed(adata)
    assert np.abs(whole - encoder.embed(adata, batch_size=6)).max() > 1e-4
    shuffled = np.random.default_rng(0).permutation(adata.n_obs)
    np.testing.assert_allclose(encoder.embed(adata[shuffled].copy()), whole[shuffled], atol=1e-5)


def test_batch_column_with_missing_values_is_refused(golden, encoder):
    _, inputs, _ = golden
    adata = golden_adata(inputs, with_batch=True)
    adata.obs["batch"] = adata.obs["batch"].astype(object)
    adata.obs.iloc[2, adata.obs.columns.get_loc("batch")] = None
    with pytest.raises(SchemaError, match="obs\\['batch'\\] has missing values"):
        encoder.tokenize(adata)


def test_official_chunks_cut_sorted_groups_into_consecutive_passes():
    group = np.array([1, 0, 1, 0, 0, 1, 0])
    chunks = official_chunks(group, 2)
    assert [c.tolist() for c in chunks] == [[1, 3], [4, 6], [0, 2], [5]]
    assert [c.tolist() for c in official_chunks(group, 0)] == [[1, 3, 4, 6], [0, 2, 5]]


# --- tokenizer --------------------------------------------------------------------------------------------


def test_tokenizer_keeps_vocabulary_genes_in_data_order_with_raw_counts(golden, encoder):
    _, inputs, _ = golden
    tokens = encoder.tokenize(golden_adata(inputs))
    assert tokens.n_genes_matched == 180 and tokens.dropped == {}
    kept = inputs["counts"][:, inputs["gene_kept_mask"]]
    dense = np.zeros((12, len(encoder.config.gene_list)), dtype=np.float32)
    rows = np.repeat(np.arange(12), tokens.lengths)
    dense[rows, tokens.arrays["gene_ids"]] = tokens.arrays["counts"]
    np.testing.assert_array_equal(dense[:, inputs["gene_idx"]], kept)  # no normalisation
    first = tokens.arrays["gene_ids"][: tokens.lengths[0]]
    order = {g: i for i, g in enumerate(inputs["gene_idx"])}
    assert [order[g] for g in first] == sorted(order[g] for g in first)  # data column order


def test_tokenizer_falls_back_to_ensembl_id_column_for_symbol_var_names(golden, encoder):
    _, inputs, _ = golden
    adata = golden_adata(inputs)
    adata.var["ensembl_id"] = adata.var_names.to_numpy()
    adata.var_names = [f"SYMBOL{i}" for i in range(adata.n_vars)]
    tokens = encoder.tokenize(adata)
    reference = encoder.tokenize(golden_adata(inputs))
    assert tokens.n_genes_matched == 180
    np.testing.assert_array_equal(tokens.arrays["gene_ids"], reference.arrays["gene_ids"])


def test_data_without_model_genes_is_refused_with_the_fix(encoder):
    adata = ad.AnnData(np.ones((3, 2), dtype=np.float32), var=pd.DataFrame(index=["TP53", "EGFR"]))
    with pytest.raises(SchemaError, match="ensembl_id"):
        encoder.tokenize(adata)


def test_normalised_input_is_refused(golden, encoder):
    _, inputs, _ = golden
    adata = golden_adata(inputs)
    adata.X = np.log1p(adata.X.toarray()) + 0.01
    with pytest.raises(SchemaError, match="raw counts"):
        encoder.embed(adata)


def test_cell_without_model_genes_gets_a_finite_embedding(golden, encoder):
    _, inputs, _ = golden
    adata = golden_adata(inputs)
    adata.X = adata.X.toarray()
    adata.X[3] = 0
    embeddings = encoder.embed(adata)
    assert np.isfinite(embeddings).all()


# --- loading ----------------------------------------------------------------------------------------------


def test_full_size_model_has_exactly_the_published_keys_and_shapes(shared):
    keys_full = json.loads(shared("golden", "cellplm", "keys_full.json").read_text())
    config = CellPLMConfig.from_official(shared("vocab", "cellplm", "20230926_85M.config.json"))
    assert config.enc_hid == 1024 and config.enc_layers == 4 and len(config.gene_list) == 19374
    with torch.device("meta"):
        model = CellPLMModel(config)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == keys_full["embedding_pipeline_head_type_embedder"]["keys"]
    published = keys_full["pretrain_model_head_type_None"]["keys"]
    assert shapes == {k: v for k, v in published.items() if not k.startswith("decoder.")}
    assert sum(p.numel() for p in model.state_dict().values()) == 65_827_344


def test_decoder_keys_are_reported_in_one_log_line(golden, caplog):
    with caplog.at_level(logging.INFO, logger="scdrugmap.models.cellplm"):
        CellPLMEncoder.from_pretrained(golden[0], device="cpu")
    lines = [r.getMessage() for r in caplog.records if "pretraining-only" in r.getMessage()]
    assert len(lines) == 1 and "18 pretraining-only" in lines[0] and "decoder.out_layer.dec_disp" in lines[0]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("encoder.layers.1.norm2.bias"), "missing .*encoder.layers.1.norm2.bias"),
        (lambda s: s.__setitem__("head.extra.weight", torch.zeros(2)), "unexpected .*head.extra.weight"),
        (lambda s: s.__setitem__("pre_latent_norm.norm.weight", torch.zeros(31)),
         r"mis-shaped .*pre_latent_norm.norm.weight: \(31,\) in file, \(32,\) expected"),
    ],
    ids=["missing", "unexpected", "misshaped"],
)
def test_mismatching_state_dict_is_refused_naming_the_key(golden, tmp_path, edit, message):
    folder = copy_checkpoint(golden[0], tmp_path, state_edit=edit)
    with pytest.raises(CheckpointError, match=message):
        CellPLMEncoder.from_pretrained(folder, device="cpu")


def test_truncated_checkpoint_is_refused(golden, tmp_path):
    folder = copy_checkpoint(golden[0], tmp_path)
    data = (folder / "checkpoint.best.ckpt").read_bytes()
    (folder / "checkpoint.best.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        CellPLMEncoder.from_pretrained(folder, device="cpu")


def test_container_without_model_state_dict_is_refused(golden, tmp_path):
    folder = copy_checkpoint(golden[0], tmp_path, container_edit=lambda c: c.__setitem__("state", c.pop("model_state_dict")))
    with pytest.raises(CheckpointError, match="model_state_dict"):
        CellPLMEncoder.from_pretrained(folder, device="cpu")


def test_non_tensor_training_objects_are_read_as_inert_stand_ins(golden, tmp_path):
    namespace = argparse.Namespace(lr=1e-3)
    folder = copy_checkpoint(golden[0], tmp_path, container_edit=lambda c: c.update(args=namespace, epoch=3))
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(folder / "checkpoint.best.ckpt", weights_only=True)
    state = read_checkpoint(folder / "checkpoint.best.ckpt")
    assert len(state) == 73 and all(isinstance(v, torch.Tensor) for v in state.values())


def test_default_weights_come_from_the_cache_when_present(golden):
    folder, inputs, expected = golden
    source = CellPLMEncoder.weights_sources["20230926_85M"]
    target = cache_path(source)
    target.mkdir(parents=True)
    shutil.copy(folder / "checkpoint.config.json", target / "20230926_85M.config.json")
    shutil.copy(folder / "checkpoint.best.ckpt", target / "20230926_85M.best.ckpt")
    (target / MANIFEST).write_text(json.dumps({"20230926_85M.config.json": "-", "20230926_85M.best.ckpt": "-"}))
    encoder = get_encoder_class("cellplm").from_pretrained(None, device="cpu")
    assert encoder.checkpoint_sha256 is not None
    assert np.abs(encoder.embed(golden_adata(inputs)) - expected["emb"]).max() <= TOLERANCE


def test_default_weights_offline_and_uncached_raise_with_the_fix(monkeypatch):
    monkeypatch.setenv("SCDRUGMAP_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="scdrugmap models download"):
        CellPLMEncoder.from_pretrained()


def test_unknown_option_is_refused(golden):
    with pytest.raises(ConfigError, match="cell_per_pass"):
        CellPLMEncoder.from_pretrained(golden[0], device="cpu", cell_per_pass=4)
