"""scFoundation: golden parity with the official get_embedding.py, strict loading, full-size keys.

LoRA is checked for every model in test_contract.py.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ad = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")

from scdrugmap.errors import CheckpointError, ConfigError, SchemaError, WeightsNotFoundError  # noqa: E402
from scdrugmap.models import scfoundation as scf  # noqa: E402
from scdrugmap.models.base import get_encoder_class  # noqa: E402
from scdrugmap.models.weights import MANIFEST, cache_path  # noqa: E402

TOLERANCE = 1e-5
#: (expected.npz variant, version, pool, tgthighres, pre_normalized), as run in the golden README.
CELL_VARIANTS = [
    ("ce_all_t4_F", "ce", "all", "t4", "F"),
    ("ce_max_t4_F", "ce", "max", "t4", "F"),
    ("ce_all_f1_F", "ce", "all", "f1", "F"),
    ("rde_all_a5_F", "rde", "all", "a5", "F"),
    ("ce_all_t4_T", "ce", "all", "t4", "T"),
]


@pytest.fixture
def golden(shared):
    folder = shared("golden", "scfoundation")
    return {
        "dir": folder,
        "checkpoint": folder / "checkpoint.ckpt",
        "genes": folder / "OS_scRNA_gene_index.200.tsv",
        "inputs": np.load(folder / "inputs.npz"),
        "expected": np.load(folder / "expected.npz"),
    }


def counts_adata(golden) -> ad.AnnData:
    table = pd.read_csv(golden["dir"] / "counts.csv", index_col=0)
    adata = ad.AnnData(table.to_numpy(dtype=np.float32))
    adata.var_names = table.columns.astype(str)
    adata.obs_names = table.index.astype(str)
    return adata


def golden_input(golden, pre_normalized: str) -> ad.AnnData:
    if pre_normalized == "F":
        return counts_adata(golden)
    adata = ad.AnnData(golden["inputs"]["lognorm_input_for_T"])
    adata.var_names = golden["inputs"]["vocab_genes"].astype(str)
    return adata


def load(golden, **options) -> scf.ScFoundationEncoder:
    return scf.ScFoundationEncoder.from_pretrained(golden["checkpoint"], gene_index_path=golden["genes"], **options)


def tiny_config() -> scf.ScFoundationConfig:
    return scf.ScFoundationConfig(seq_len=12, hidden_dim=16, depth=1, heads=2, dim_head=8)


# --- preprocessing --------------------------------------------------------------------------------------


def test_registry_finds_the_encoder_class():
    cls = get_encoder_class("scfoundation")
    assert cls is scf.ScFoundationEncoder
    assert (cls.name, cls.family, cls.lora_targets) == ("scfoundation", "scfm", ("out_proj",))


def test_gene_alignment_zero_fills_missing_and_drops_unknown_genes(golden):
    inputs = golden["inputs"]
    genes = scf.read_gene_index(golden["genes"])
    aligned, n_matched = scf.align_genes(inputs["counts"], inputs["genes"], genes)
    assert n_matched == 190
    np.testing.assert_array_equal(aligned.toarray(), inputs["counts_aligned"])


@pytest.mark.parametrize("preprocessing", ["t4_F", "f1_F", "a5_F", "t4_T"])
def test_values_and_total_count_tokens_equal_official_float64(golden, preprocessing):
    inputs = golden["inputs"]
    tgthighres, pre_normalized = preprocessing.split("_")
    matrix = inputs["counts_aligned"] if pre_normalized == "F" else inputs["lognorm_input_for_T"]
    genes = scf.read_gene_index(golden["genes"])
    aligned, _ = scf.align_genes(matrix, genes, genes)
    values, t_values, s_values = scf.expression_values(aligned, pre_normalized=pre_normalized, tgthighres=tgthighres)
    official = inputs[f"pretrain_gene_x__{preprocessing}"]
    np.testing.assert_array_equal(t_values, inputs[f"T_value__{preprocessing}"])
    np.testing.assert_array_equal(s_values, inputs[f"S_value__{preprocessing}"])
    positive = np.where(official[:, :-2] > 0, official[:, :-2], 0.0)
    # the same genes expressed, and the same values to the last bit or two: numpy's float64 log1p takes the
    # SIMD code of the CPU it runs on (AVX2 or AVX-512), and those round a few values 1 ulp apart (seen on an
    # AVX2-only AMD EPYC against the golden's CPU)
    np.testing.assert_array_equal(values.toarray() > 0, positive > 0)
    np.testing.assert_array_max_ulp(values.toarray(), positive, maxulp=2)


@pytest.mark.parametrize("preprocessing", ["t4_F", "f1_F", "a5_F", "t4_T"])
def test_tokenize_gathers_expressed_genes_then_t_then_s_like_gatherdata(golden, preprocessing):
    inputs = golden["inputs"]
    tgthighres, pre_normalized = preprocessing.split("_")
    encoder = load(golden, tgthighres=tgthighres, pre_normalized=pre_normalized)
    tokens = encoder.tokenize(golden_input(golden, pre_normalized))
    lengths = inputs[f"enc_lengths__{preprocessing}"]
    np.testing.assert_array_equal(tokens.lengths, lengths)
    assert tokens.n_genes_matched == (190 if pre_normalized == "F" else 200)
    batch = encoder.collate(tokens, np.arange(tokens.n_cells))
    # Past each cell's length both sides follow the official batch padding (value 103, position 103).
    np.testing.assert_array_equal(batch["values"].numpy(), inputs[f"enc_values__{preprocessing}"].astype(np.float32))
    np.testing.assert_array_equal(batch["positions"].numpy(), inputs[f"enc_position_ids__{preprocessing}"])
    np.testing.assert_array_equal(batch["padding"].numpy(), inputs[f"enc_padding__{preprocessing}"])


def test_cells_without_expressed_index_genes_are_dropped_with_nan_rows(golden):
    adata = counts_adata(golden)
    adata.X[3] = 0.0
    encoder = load(golden)
    tokens = encoder.tokenize(adata)
    assert 3 not in tokens.cell_index and "needs 3" in tokens.dropped[3]
    embeddings = encoder.embed(adata)
    assert np.isnan(embeddings[3]).all() and np.isfinite(np.delete(embeddings, 3, axis=0)).all()


def test_duplicate_genes_and_unknown_gene_ids_are_refused(golden):
    encoder = load(golden)
    adata = counts_adata(golden)
    duplicated = adata.var_names.to_numpy().copy()
    duplicated[1] = duplicated[0]
    with pytest.raises(SchemaError, match="more than once"):
        encoder.tokenize(_with_var_names(adata, duplicated))
    with pytest.raises(SchemaError, match="none of the"):
        encoder.tokenize(_with_var_names(adata, [f"ENSG{i:011d}" for i in range(adata.n_vars)]))


def _with_var_names(adata: ad.AnnData, names) -> ad.AnnData:
    copy = ad.AnnData(adata.X.copy())
    copy.var["gene_name"] = list(names)
    return copy


def test_bad_options_raise_config_error(golden):
    with pytest.raises(ConfigError, match="tgthighres"):
        load(golden, tgthighres="x4")
    with pytest.raises(ConfigError, match="pool"):
        load(golden, pool="mean")
    with pytest.raises(ConfigError, match="total_count_key"):
        load(golden, pre_normalized="A")


# --- model parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "version", "pool", "tgthighres", "pre_normalized"), CELL_VARIANTS)
def test_cell_embeddings_match_official_get_embedding(golden, variant, version, pool, tgthighres, pre_normalized):
    encoder = load(golden, version=version, pool=pool, tgthighres=tgthighres, pre_normalized=pre_normalized)
    # batch_size 5 mixes lengths, so padding and per-cell pooling are exercised against the per-cell official loop.
    embeddings = encoder.embed(golden_input(golden, pre_normalized), batch_size=5)
    expected = golden["expected"][f"cell_emb__{variant}"]
    assert embeddings.shape == expected.shape == (12, encoder.embedding_dim)
    assert np.abs(embeddings - expected).max() < TOLERANCE


@pytest.mark.parametrize("variant", ["ce_all_t4_F", "rde_all_a5_F", "ce_all_t4_T"])
def test_encoder_outputs_match_official_per_token(golden, variant):
    version, _, tgthighres, pre_normalized = variant.split("_")
    encoder = load(golden, version=version, tgthighres=tgthighres, pre_normalized=pre_normalized)
    tokens = encoder.tokenize(golden_input(golden, pre_normalized))
    batch = encoder.collate(tokens, np.arange(tokens.n_cells))
    with torch.no_grad():
        hidden = encoder.module(batch["values"], batch["positions"], batch["padding"]).numpy()
    expected = golden["expected"][f"encoder_out__{variant}"]
    valid = ~batch["padding"].numpy()
    assert np.abs(hidden[valid] - expected[valid]).max() < TOLERANCE


def test_value_and_position_embeddings_match_official(golden):
    encoder = load(golden)
    tokens = encoder.tokenize(counts_adata(golden))
    batch = encoder.collate(tokens, np.arange(tokens.n_cells))
    valid = ~batch["padding"].numpy()
    with torch.no_grad():
        token_emb = encoder.module.token_emb(batch["values"]).numpy()
        pos_emb = encoder.module.pos_emb(batch["positions"]).numpy()
    expected = golden["expected"]
    assert np.abs(token_emb[valid] - expected["token_emb__ce_t4_F"][valid]).max() < TOLERANCE
    assert np.abs(pos_emb[valid] - expected["pos_emb__ce_t4_F"][valid]).max() < TOLERANCE
    assert np.abs((token_emb + pos_emb)[valid] - expected["encoder_in__ce_t4_F"][valid]).max() < TOLERANCE


def test_values_equal_to_mask_and_pad_ids_get_their_special_embeddings(golden):
    embedding = load(golden).module.token_emb
    with torch.no_grad():
        out = embedding(torch.tensor([[102.0, 103.0, 1.5]]))
    torch.testing.assert_close(out[0, 0], embedding.emb_mask.weight[0])
    torch.testing.assert_close(out[0, 1], embedding.emb_pad.weight[0])


# --- loading --------------------------------------------------------------------------------------------


def test_config_is_read_from_the_checkpoint(golden):
    config = scf.ScFoundationConfig.from_official(golden["checkpoint"], "cell")
    assert (config.seq_len, config.hidden_dim, config.depth, config.heads) == (202, 64, 2, 4)
    assert (config.bin_num, config.pad_token_id, config.mask_token_id, config.norm_first) == (100, 103, 102, False)


def test_decoder_keys_are_listed_in_one_log_line(golden, caplog):
    with caplog.at_level(logging.INFO, logger="scdrugmap.models.scfoundation"):
        encoder = load(golden)
    lines = [r.getMessage() for r in caplog.records if "not used for cell embeddings" in r.getMessage()]
    assert len(lines) == 1 and "decoder.performer.net.layers.0.0.fn.to_q.weight" in lines[0]
    assert len(encoder.checkpoint_sha256) == 64


def test_full_size_model_has_the_published_keys_and_shapes(shared):
    published = json.loads(shared("golden", "scfoundation", "keys_full.json").read_text())
    config = scf.ScFoundationConfig.from_official_dict(published["flat_config"])
    assert config == scf.ScFoundationConfig()
    ours = scf.official_keys(config)
    cell_path = {e["key"]: tuple(e["shape"]) for e in published["keys"] if not e["key"].startswith(scf.UNUSED_PREFIXES)}
    unused = {e["key"] for e in published["keys"] if e["key"].startswith(scf.UNUSED_PREFIXES)}
    assert ours == cell_path
    assert set(ours) | unused == {e["key"] for e in published["keys"]}
    assert all(e["ckpt_key"] == "model." + e["key"] for e in published["keys"])
    assert sum(np.prod(shape) for shape in ours.values()) == 99_941_692
    with torch.device("meta"):
        encoder = scf.ScFoundationEncoder(scf.ScFoundationModel(config), [f"G{i}" for i in range(19264)])
    assert encoder.embedding_dim == 3072


def _write_container(tmp_path, golden, edit):
    container = torch.load(golden["checkpoint"], weights_only=True)
    edit(container["cell"]["state_dict"])
    path = tmp_path / "models.ckpt"
    torch.save(container, path)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("model.encoder.norm.weight"), "1 missing: encoder.norm.weight"),
        (lambda sd: sd.__setitem__("model.encoder.extra.weight", torch.zeros(2)), "1 unexpected: encoder.extra.weight"),
        (lambda sd: sd.__setitem__("model.pos_emb.weight", torch.zeros(10, 64)),
         r"mis-shaped: pos_emb.weight \(10, 64\) \(model \(203, 64\)\)"),
    ],
)
def test_mismatched_state_dict_raises_checkpoint_error_naming_keys(tmp_path, golden, edit, message):
    path = _write_container(tmp_path, golden, edit)
    with pytest.raises(CheckpointError, match=message):
        scf.ScFoundationEncoder.from_pretrained(path, gene_index_path=golden["genes"])


def test_truncated_or_html_checkpoint_raises_checkpoint_error(tmp_path, golden):
    truncated = tmp_path / "models.ckpt"
    truncated.write_bytes(golden["checkpoint"].read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="corrupted or incomplete"):
        scf.ScFoundationEncoder.from_pretrained(truncated, gene_index_path=golden["genes"])
    truncated.write_text("<!DOCTYPE html><html>sharepoint sign-in</html>")
    with pytest.raises(CheckpointError, match="DOCTYPE"):
        scf.ScFoundationEncoder.from_pretrained(truncated, gene_index_path=golden["genes"])


def test_missing_entry_and_wrong_gene_index_raise_checkpoint_error(tmp_path, golden):
    container = torch.load(golden["checkpoint"], weights_only=True)
    del container["rde"]
    path = tmp_path / "models.ckpt"
    torch.save(container, path)
    with pytest.raises(CheckpointError, match="no entry 'rde'"):
        scf.ScFoundationEncoder.from_pretrained(path, gene_index_path=golden["genes"], version="rde")
    short_index = tmp_path / "short.tsv"
    short_index.write_text("gene_name\tindex\nA\t0\nB\t1\n")
    with pytest.raises(CheckpointError, match="has 2 genes"):
        scf.ScFoundationEncoder.from_pretrained(golden["checkpoint"], gene_index_path=short_index)


def test_non_tensor_objects_need_trust_checkpoint(tmp_path, golden):
    container = torch.load(golden["checkpoint"], weights_only=True)
    container["cell"]["callbacks"] = scf.ScFoundationConfig()  # an arbitrary pickled object
    path = tmp_path / "models.ckpt"
    torch.save(container, path)
    with pytest.raises(CheckpointError, match="trust_checkpoint=True"):
        scf.ScFoundationEncoder.from_pretrained(path, gene_index_path=golden["genes"])
    encoder = scf.ScFoundationEncoder.from_pretrained(path, gene_index_path=golden["genes"], trust_checkpoint=True)
    assert encoder.embedding_dim == 256


def test_official_folder_layout_and_cache_are_found(tmp_path, golden, monkeypatch):
    layout = tmp_path / "model"
    (layout / "models").mkdir(parents=True)
    shutil.copy(golden["checkpoint"], layout / "models" / "models.ckpt")
    shutil.copy(golden["genes"], layout / scf.GENE_INDEX_FILENAME)
    assert scf.ScFoundationEncoder.from_pretrained(layout).embedding_dim == 256

    source = scf.ScFoundationEncoder.weights_sources["scfoundation"]
    monkeypatch.setenv("SCDRUGMAP_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="not cached"):
        scf.ScFoundationEncoder.from_pretrained()
    folder = cache_path(source)
    folder.mkdir(parents=True)
    shutil.copy(golden["checkpoint"], folder / "models.ckpt")
    shutil.copy(golden["genes"], folder / scf.GENE_INDEX_FILENAME)
    (folder / MANIFEST).write_text(json.dumps({f.filename: None for f in source.files}))
    assert scf.ScFoundationEncoder.from_pretrained(None).embedding_dim == 256


# --- fine-tuning ----------------------------------------------------------------------------------------


def test_encode_is_differentiable_and_batch_independent():
    config = tiny_config()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = scf.ScFoundationEncoder(scf.ScFoundationModel(config).eval(), [f"G{i}" for i in range(10)])
    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(0.6, 0.2, size=(6, 10)).astype(np.float32)
    counts[:, 0] += 1  # every cell expresses a gene
    adata = ad.AnnData(counts)
    adata.var_names = [f"G{i}" for i in range(10)]
    tokens = encoder.tokenize(adata)
    batched = encoder.encode(encoder.collate(tokens, np.arange(6)))
    single = torch.cat([encoder.encode(encoder.collate(tokens, np.array([i]))) for i in range(6)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    batched.sum().backward()
    assert encoder.module.token_emb.mlp.weight.grad.abs().sum() > 0
