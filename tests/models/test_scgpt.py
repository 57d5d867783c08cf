"""scGPT: golden parity with the official embed_data, tokenizer quirks, strict loading.

LoRA is checked for every model in test_contract.py.
"""

from __future__ import annotations

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
from scdrugmap.models.base import TokenizedCells, get_encoder_class
from scdrugmap.models.scgpt import (
    UNUSED_MODULES,
    ScGPTConfig,
    ScGPTEncoder,
    ScGPTModel,
    bin_cells,
    convert_official_state_dict,
    digitize_cells,
    official_shapes,
    quantile_edges,
)

ATOL = 1e-5
SCENARIOS = {"A": "", "B": "trunc_"}


@pytest.fixture
def golden(shared):
    folder = shared("golden", "scgpt")
    return np.load(folder / "inputs.npz"), np.load(folder / "expected.npz")


@pytest.fixture
def checkpoint_dir(shared):
    return shared("golden", "scgpt", "checkpoint")


@pytest.fixture
def encoder(checkpoint_dir):
    return ScGPTEncoder.from_pretrained(checkpoint_dir)


def golden_adata(inputs) -> ad.AnnData:
    return ad.AnnData(inputs["counts"].copy(), var=pd.DataFrame(index=inputs["genes"]))


def cell_tokens(tokens: TokenizedCells, i: int) -> tuple[np.ndarray, np.ndarray]:
    start, stop = tokens.arrays["offsets"][i], tokens.arrays["offsets"][i + 1]
    return tokens.arrays["gene_ids"][start:stop], tokens.arrays["values"][start:stop]


def copy_checkpoint(checkpoint_dir, tmp_path, edit) -> str:
    """Copy the tiny official folder, letting ``edit`` change its state dict."""
    target = tmp_path / "model"
    shutil.copytree(checkpoint_dir, target)
    (target / "best_model.pt").chmod(0o644)
    state = torch.load(target / "best_model.pt", weights_only=True)
    edit(state)
    torch.save(state, target / "best_model.pt")
    return target


# --- registry and config ---------------------------------------------------------------------------------


def test_registry_finds_scgpt_with_its_contract_flags():
    cls = get_encoder_class("scgpt")
    assert cls is ScGPTEncoder
    assert (cls.family, cls.input_kind, cls.lora_targets) == ("scfm", "nonnegative", ("out_proj",))
    files = {f.filename for f in cls.weights_sources["scGPT_human"].files}
    assert files == {"best_model.pt", "args.json", "vocab.json"}


def test_config_defaults_are_the_published_whole_human_model(shared):
    assert ScGPTConfig.from_official(shared("vocab", "scgpt")) == ScGPTConfig()


def test_config_reads_the_tiny_official_folder(checkpoint_dir):
    config = ScGPTConfig.from_official(checkpoint_dir)
    assert (config.ntoken, config.d_model, config.nhead, config.d_hid, config.nlayers) == (303, 32, 4, 48, 2)
    assert (config.pad_token_id, config.cls_token_id, config.pad_value) == (300, 301, -2.0)


# --- binning ---------------------------------------------------------------------------------------------


def test_quantile_edges_equal_numpy_quantile_bit_for_bit():
    rng = np.random.default_rng(3)
    cells = [rng.negative_binomial(2, 0.3, size=n).astype(np.float32) + 1 for n in (1, 2, 3, 7, 49, 50, 51, 333)]
    cells += [rng.lognormal(size=n).astype(np.float32) for n in (5, 64, 1000)]
    counts = np.array([c.size for c in cells])
    indptr = np.concatenate([[0], np.cumsum(counts)])
    sorted_values = np.concatenate([np.sort(c) for c in cells])
    edges = quantile_edges(sorted_values, indptr[:-1], counts)
    expected = np.stack([np.quantile(c, np.linspace(0, 1, 50)) for c in cells])
    np.testing.assert_array_equal(edges, expected)


def test_quantile_edges_equal_the_golden_bin_edges(golden):
    inputs, expected = golden
    indptr, values = inputs["tok_cell_ptr"], inputs["tok_raw_values"]
    cell = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
    _, edges = bin_cells(values, indptr, np.random.default_rng(0))
    assert np.array_equal(edges, expected["bin_edges"])
    order = np.lexsort((values, cell))
    assert np.array_equal(quantile_edges(values[order], indptr[:-1], np.diff(indptr)), expected["bin_edges"])


def test_digitized_values_equal_np_digitize_on_both_sides():
    rng = np.random.default_rng(4)
    cells = [rng.integers(1, 6, size=60), rng.lognormal(size=30), rng.integers(1, 3, size=80) * 0.1, [7.0]]
    cells = [np.asarray(c, dtype=np.float32) for c in cells]
    indptr = np.concatenate([[0], np.cumsum([c.size for c in cells])])
    left, right, edges = digitize_cells(np.concatenate(cells), indptr)
    for c, values in enumerate(cells):
        part = slice(indptr[c], indptr[c + 1])
        np.testing.assert_array_equal(edges[c], np.quantile(values, np.linspace(0, 1, 50)))
        np.testing.assert_array_equal(left[part], np.digitize(values, edges[c]))
        np.testing.assert_array_equal(right[part], np.digitize(values, edges[c], right=True))


def test_binning_is_exact_where_official_is_and_in_the_official_range_on_ties(golden):
    inputs, expected = golden
    lo, hi = expected["tok_bin_lo"], expected["tok_bin_hi"]
    for seed in (0, 1):
        bins, _ = bin_cells(inputs["tok_raw_values"], inputs["tok_cell_ptr"], np.random.default_rng(seed))
        assert np.array_equal(bins[lo == hi], lo[lo == hi])
        assert ((bins >= lo) & (bins <= hi)).all()
    midpoint, _ = bin_cells(inputs["tok_raw_values"], inputs["tok_cell_ptr"], None, ties="midpoint")
    assert np.array_equal(midpoint, (lo + hi) // 2)


def test_a_cell_of_equal_values_gets_bins_spread_over_1_to_50_as_official():
    bins, _ = bin_cells(np.ones(2000, dtype=np.float32), np.array([0, 2000]), np.random.default_rng(0))
    assert set(np.unique(bins)) == set(range(1, 51))


# --- tokenizer -------------------------------------------------------------------------------------------


def test_tokenizer_reproduces_scenario_a_ids_and_bins(golden, encoder):
    inputs, expected = golden
    tokens = encoder.tokenize(golden_adata(inputs))
    real = ~inputs["src_key_padding_mask"]
    assert np.array_equal(tokens.cell_index, np.arange(12))
    assert np.array_equal(tokens.lengths, real.sum(1))
    assert tokens.n_genes_matched == int(inputs["gene_in_vocab"].sum())
    ptr = inputs["tok_cell_ptr"]
    for i in range(12):
        ids, values = cell_tokens(tokens, i)
        assert np.array_equal(ids, inputs["gene_ids"][i, real[i]])
        assert values[0] == inputs["values"][i, 0] == -2
        lo, hi = expected["tok_bin_lo"][ptr[i] : ptr[i + 1]], expected["tok_bin_hi"][ptr[i] : ptr[i + 1]]
        assert ((values[1:] >= lo) & (values[1:] <= hi)).all()
        assert np.array_equal(values[1:][lo == hi], inputs["values"][i, 1:][real[i, 1:]][lo == hi])


def test_tokenizer_samples_long_cells_as_scenario_b(golden, checkpoint_dir):
    inputs, _ = golden
    adata = golden_adata(inputs)
    full = ScGPTEncoder.from_pretrained(checkpoint_dir).tokenize(adata)
    sampled = ScGPTEncoder.from_pretrained(checkpoint_dir, max_length=40).tokenize(adata)
    real = ~inputs["trunc_src_key_padding_mask"]
    assert np.array_equal(sampled.lengths, real.sum(1))
    n_sampled = 0
    for i in range(12):
        ids, values = cell_tokens(sampled, i)
        all_ids, all_values = cell_tokens(full, i)
        golden_ids = inputs["trunc_gene_ids"][i, real[i]]
        assert ids[0] == golden_ids[0] == 301 and values[0] == -2
        if all_ids.size <= 40:
            assert np.array_equal(ids, all_ids) and np.array_equal(values, all_values)
            continue
        n_sampled += 1
        # genes drawn without replacement; binning came first, over all genes (same seed, same bins)
        assert np.unique(ids[1:]).size == 39 and np.isin(golden_ids[1:], all_ids[1:]).all()
        lookup = dict(zip(all_ids[1:], all_values[1:], strict=True))
        assert np.array_equal(values[1:], [lookup[g] for g in ids[1:]])
    assert n_sampled == 9


def test_tokenizer_without_sampling_keeps_the_first_genes(golden, checkpoint_dir):
    inputs, _ = golden
    adata = golden_adata(inputs)
    full = ScGPTEncoder.from_pretrained(checkpoint_dir).tokenize(adata)
    cut = ScGPTEncoder.from_pretrained(checkpoint_dir, max_length=40, sampling=False).tokenize(adata)
    for i in range(12):
        assert np.array_equal(cell_tokens(cut, i)[0], cell_tokens(full, i)[0][:40])


def test_normalised_or_sparse_input_gives_the_same_tokens_as_counts(golden, encoder):
    inputs, _ = golden
    counts = golden_adata(inputs)
    normalised = counts.copy()
    normalised.X = np.log1p(counts.X / counts.X.sum(1, keepdims=True) * 1e4).astype(np.float32)
    sparse = counts.copy()
    sparse.X = sp.csr_matrix(counts.X)
    reference = encoder.tokenize(counts)
    for other in (normalised, sparse):
        tokens = encoder.tokenize(other)
        assert np.array_equal(tokens.arrays["gene_ids"], reference.arrays["gene_ids"])
        assert np.array_equal(tokens.arrays["values"], reference.arrays["values"])


def test_cell_without_vocabulary_gene_is_dropped_and_gets_a_nan_row(golden, encoder):
    inputs, _ = golden
    adata = golden_adata(inputs)
    adata.X[3, inputs["gene_in_vocab"]] = 0
    tokens = encoder.tokenize(adata)
    assert 3 not in tokens.cell_index and "vocabulary" in tokens.dropped[3]
    embeddings = encoder.embed(adata)
    assert np.isnan(embeddings[3]).all() and np.isfinite(np.delete(embeddings, 3, axis=0)).all()


def test_data_without_vocabulary_genes_is_refused(encoder):
    adata = ad.AnnData(np.ones((2, 3), dtype=np.float32), var=pd.DataFrame(index=["ENSG1", "ENSG2", "ENSG3"]))
    with pytest.raises(SchemaError, match="vocabulary"):
        encoder.tokenize(adata)


def test_z_scored_input_is_refused(golden, encoder):
    inputs, _ = golden
    adata = golden_adata(inputs)
    adata.X = (adata.X - adata.X.mean(0)) / (adata.X.std(0) + 1)
    with pytest.raises(SchemaError, match="non-negative"):
        encoder.embed(adata)


def test_gene_symbols_come_from_gene_key(golden, checkpoint_dir):
    inputs, _ = golden
    adata = golden_adata(inputs)
    adata.var["symbol"] = adata.var_names
    adata.var_names = [f"id{i}" for i in range(adata.n_vars)]
    tokens = ScGPTEncoder.from_pretrained(checkpoint_dir, gene_key="symbol").tokenize(adata)
    assert tokens.n_genes_matched == 200


# --- model parity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_model_matches_official_embed_data(scenario, golden, encoder):
    inputs, expected = golden
    prefix = SCENARIOS[scenario]
    gene_ids = torch.from_numpy(inputs[prefix + "gene_ids"])
    values = torch.from_numpy(inputs[prefix + "values"])
    mask = torch.from_numpy(inputs[prefix + "src_key_padding_mask"])
    real = ~mask.numpy()
    module = encoder.module
    layer_out = {}
    hooks = [layer.register_forward_hook(lambda _m, _i, out, n=n: layer_out.__setitem__(n, out.numpy()))
             for n, layer in enumerate(module.transformer_encoder.layers)]
    with torch.inference_mode():
        gene_emb, value_emb = module.encoder(gene_ids), module.value_encoder(values)
        hidden = module(gene_ids, values, mask).numpy()
        batch = {"gene_ids": gene_ids, "values": values, "src_key_padding_mask": mask}
        cell_emb = encoder.encode(batch).numpy()
    for hook in hooks:
        hook.remove()
    np.testing.assert_allclose(gene_emb.numpy(), expected[prefix + "gene_emb"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(value_emb.numpy(), expected[prefix + "value_emb"], rtol=0, atol=ATOL)
    for n in range(2):
        np.testing.assert_allclose(layer_out[n][real], expected[f"{prefix}layer{n}_out"][real], rtol=0, atol=ATOL)
    np.testing.assert_allclose(hidden[real], expected[prefix + "hidden_states"][real], rtol=0, atol=ATOL)
    np.testing.assert_allclose(cell_emb, expected[prefix + "cell_emb"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(hidden[:, 0], expected[prefix + "cell_emb_unnormalized"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("normalize", [True, False])
def test_embed_tokens_in_length_buckets_matches_official(normalize, golden, checkpoint_dir):
    inputs, expected = golden
    encoder = ScGPTEncoder.from_pretrained(checkpoint_dir, normalize=normalize)
    real = ~inputs["src_key_padding_mask"]
    lengths = real.sum(1)
    tokens = TokenizedCells(
        cell_index=np.arange(12), lengths=lengths,
        arrays={"gene_ids": inputs["gene_ids"][real], "values": inputs["values"][real],
                "offsets": np.concatenate([[0], np.cumsum(lengths)])})
    embeddings = encoder.embed_tokens(tokens, batch_size=5)
    reference = expected["cell_emb" if normalize else "cell_emb_unnormalized"]
    np.testing.assert_allclose(embeddings, reference, rtol=0, atol=ATOL)


def test_official_ties_make_embeddings_depend_on_the_seed_and_midpoint_does_not(golden, checkpoint_dir):
    inputs, _ = golden
    adata = golden_adata(inputs)

    def embed(**options):
        return ScGPTEncoder.from_pretrained(checkpoint_dir, **options).embed(adata)

    np.testing.assert_array_equal(embed(seed=0), embed(seed=0))
    moved = np.abs(embed(seed=0) - embed(seed=1)).max(axis=1)
    assert (moved > 1e-4).all()  # random tie-breaking moves every cell, far above float noise (1e-7)
    np.testing.assert_array_equal(embed(seed=0, bin_ties="midpoint"), embed(seed=1, bin_ties="midpoint"))


# --- checkpoint format -----------------------------------------------------------------------------------


def test_full_size_model_has_exactly_the_published_keys_and_shapes(shared):
    keys = json.loads(shared("golden", "scgpt", "keys_full.json").read_text())
    with torch.device("meta"):
        module = ScGPTModel(ScGPTConfig())
    shapes = official_shapes(module)
    published = {k: tuple(v) for k, v in keys["best_model_pt_keys"].items()}
    assert set(shapes) == set(keys["keys_used_by_cell_embedding"])
    assert shapes == {k: v for k, v in published.items() if k.split(".")[0] not in UNUSED_MODULES}
    assert sum(p.numel() for p in module.parameters()) == keys["n_params_cell_embedding_path"]
    state = {k: torch.empty(v, device="meta") for k, v in published.items()}
    expected = {k: v.shape for k, v in module.state_dict().items()}
    converted, unused = convert_official_state_dict(state, expected)
    assert set(converted) == set(expected)
    assert sorted(unused) == sorted(k for k in published if k.split(".")[0] in UNUSED_MODULES)


def test_unused_pretraining_keys_are_listed_in_one_log_line(checkpoint_dir, caplog):
    with caplog.at_level(logging.INFO, logger="scdrugmap.models.scgpt"):
        ScGPTEncoder.from_pretrained(checkpoint_dir)
    lines = [r.getMessage() for r in caplog.records if "does not run" in r.getMessage()]
    assert len(lines) == 1
    assert "flag_encoder.weight" in lines[0] and "mvc_decoder.W.weight" in lines[0]


@pytest.mark.parametrize(("edit", "named"), [
    (lambda s: s.pop("transformer_encoder.layers.1.linear2.bias"), "missing: transformer_encoder.layers.1.linear2.bias"),
    (lambda s: s.pop("transformer_encoder.layers.0.self_attn.Wqkv.weight"),
     "missing: transformer_encoder.layers.0.self_attn.Wqkv.weight"),
    (lambda s: s.__setitem__("value_encoder.norm.weight", torch.ones(31)), "value_encoder.norm.weight [31]"),
    (lambda s: s.__setitem__("transformer_encoder.layers.0.self_attn.Wqkv.bias", torch.ones(95)),
     "transformer_encoder.layers.0.self_attn.Wqkv.bias [95] (model expects [96])"),
    (lambda s: s.__setitem__("bn.weight", torch.ones(32)), "unexpected: bn.weight"),
    (lambda s: s.__setitem__("transformer_encoder.layers.0.self_attn.in_proj_bias", torch.ones(96)),
     "duplicated: transformer_encoder.layers.0.self_attn.in_proj_bias"),
])
def test_corrupted_checkpoint_raises_naming_the_key(edit, named, checkpoint_dir, tmp_path):
    folder = copy_checkpoint(checkpoint_dir, tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        ScGPTEncoder.from_pretrained(folder)
    assert named in str(info.value)


def test_pytorch_in_proj_layout_loads_like_the_published_wqkv(checkpoint_dir, tmp_path, encoder):
    def rename(state):
        for key in [k for k in state if ".Wqkv." in k]:
            state[key.replace("Wqkv.", "in_proj_")] = state.pop(key)

    other = ScGPTEncoder.from_pretrained(copy_checkpoint(checkpoint_dir, tmp_path, rename))
    for (name, a), (_, b) in zip(encoder.module.state_dict().items(), other.module.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_google_drive_confirmation_page_is_reported(checkpoint_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(checkpoint_dir, folder)
    (folder / "best_model.pt").chmod(0o644)
    (folder / "best_model.pt").write_text("<!DOCTYPE html><html><title>Google Drive - Virus scan warning</title>")
    with pytest.raises(CheckpointError, match="Google Drive"):
        ScGPTEncoder.from_pretrained(folder)


def test_default_weights_go_through_the_cache_and_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("SCDRUGMAP_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="scgpt-human"):
        ScGPTEncoder.from_pretrained()


def test_unknown_option_is_refused(checkpoint_dir):
    with pytest.raises(ConfigError, match="bin_tie"):
        ScGPTEncoder.from_pretrained(checkpoint_dir, bin_tie="random")


def test_checkpoint_sha256_is_recorded(encoder):
    assert encoder.checkpoint_sha256 is not None and len(encoder.checkpoint_sha256) == 64
