"""scFoundation (xTrimoGene ``MaeAutobin``) cell embeddings.

Paper: Hao, M. et al. "Large-scale foundation model on single-cell transcriptomics",
Nature Methods 21, 1481-1491 (2024). Official code: https://github.com/biomap-research/scFoundation,
commit ``d09626a5c1bc30b9c6227378677b61e0b987fe8b``: ``model/get_embedding.py`` (the ``main()``
inference loop), ``model/load.py`` (``load_model_frommmf``, ``convertconfig``, ``gatherData``) and
``model/pretrainmodels/`` (``select_model``, ``MaeAutobin``, ``pytorchTransformerModule``).

Input: raw UMI counts (``pre_normalized="F"``, the default) aligned by gene symbol to the official
19,264-gene index ``OS_scRNA_gene_index.19264.tsv``; log1p(1e4-normalised) expression with
``pre_normalized="T"``. Each cell becomes the sequence of its expressed genes (value > 0, in index
order) followed by two total-count tokens, T (target resolution, position 19264) and S (log10 of the
total count, position 19265). Values are embedded by the auto-discretisation embedding, positions by
a learned table, and the sequence runs through a 12-layer post-norm transformer (768-d) and a final
LayerNorm. The Performer decoder is a pretraining part the cell-embedding path never runs: we do not
build it, and its checkpoint keys are listed in one log line.

Pooling (``pool="all"``, official default): concat[h(S), h(T), max over gene tokens, mean over gene
tokens] = 4 x 768 = 3,072-d, S before T. ``pool="max"``: max over all tokens, T and S included (768-d).

Quirks of the official code kept here (see ../shared/golden/scfoundation/README.md):

- Values are float64 up to the embedding, then cast to float32 (``torch.tensor(list).float()``).
- A token with value <= 0 is never gathered, T and S included; when S <= 0 (total count 1) or
  T <= 0, the ``[-1]`` / ``[-2]`` picks of the pooling land on gene tokens.
- A value of exactly 102 (mask id) or 103 (pad id) is embedded as the mask / pad token.
- ``pre_normalized="T"`` sets S from the row sum of the *normalised log* values.

One deliberate difference: genes are always aligned by name. The official script only aligns a
matrix with fewer than 19,264 columns and takes a wider one as already in index order (a matrix with
more columns crashes it); ``gene_alignment="official"`` reproduces that for exactly 19,264 columns.
"""

from __future__ import annotations

import logging
import math
import pickle
import time
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from scdrugmap.data.schema import expression_matrix, require_value_kind
from scdrugmap.errors import CheckpointError, ConfigError, SchemaError
from scdrugmap.models._layers import TransformerEncoderLayer
from scdrugmap.models.base import TokenizedCells, TorchEncoder
from scdrugmap.models.weights import RemoteFile, WeightsSource, resolve_weights, sha256_file

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

log = logging.getLogger(__name__)

OFFICIAL_REPO = "biomap-research/scFoundation"
OFFICIAL_COMMIT = "d09626a5c1bc30b9c6227378677b61e0b987fe8b"

# --- constants of the official code -------------------------------------------------------------------

#: File names of the official layout (model/models/models.ckpt and model/OS_scRNA_gene_index.19264.tsv).
CHECKPOINT_FILENAME = "models.ckpt"
GENE_INDEX_FILENAME = "OS_scRNA_gene_index.19264.tsv"
#: get_embedding.py: ``key = 'cell'`` for ``--version ce``, ``'rde'`` for read-depth enhancement.
VERSION_KEYS: dict[str, str] = {"ce": "cell", "rde": "rde"}
#: get_embedding.py: ``np.log1p(x / x.sum() * 1e4)`` for ``--pre_normalized F``.
NORMALIZE_TARGET = 1e4
#: load.py ``gatherData``: the batch padding value (``pad_token_id``) for values and, in the cell path,
#: for position ids.
PAD_TOKEN_ID = 103
MASK_TOKEN_ID = 102
#: Number of total-count tokens (T, S) appended after the genes (get_embedding.py: ``tmpdata + [T, S]``).
N_TOTAL_TOKENS = 2
#: ``pool_type all`` indexes h[-1], h[-2] and pools h[:-2]: a cell needs at least one gene token
#: besides the last two (torch.max over an empty dim fails in the official code).
MIN_TOKENS: dict[str, int] = {"all": 3, "max": 1}
#: Keys of parts the cell path never runs (MaeAutobin's decoder side): logged, not loaded.
UNUSED_PREFIXES: tuple[str, ...] = ("decoder.", "decoder_embed.", "norm.", "to_final.")
#: load.py ``convertconfig``: on disk every key is ``model.<key>``; the loader keeps
#: ``str(key).split('model.')[1]``.
STATE_DICT_PREFIX = "model."

Pool = Literal["all", "max"]
PreNormalized = Literal["F", "T", "A"]
GeneAlignment = Literal["by_name", "official"]


# --- config ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScFoundationConfig:
    """Architecture of the cell-embedding path, defaulting to the published model (``models.ckpt``, key cell).

    ``seq_len`` counts the genes plus T and S (19,264 + 2). The official encoder builds
    ``nn.TransformerEncoderLayer(dim, heads, 4 * dim)``: ``dim_head`` is carried by the config but
    unused (the head width is ``hidden_dim // heads``), and dropout is torch's default 0.1.
    """

    seq_len: int = 19266
    hidden_dim: int = 768
    depth: int = 12
    heads: int = 12
    dim_head: int = 64
    norm_first: bool = False
    ff_mult: int = 4
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    bin_num: int = 100
    bin_alpha: float = 1.0
    pad_token_id: int = PAD_TOKEN_ID
    mask_token_id: int = MASK_TOKEN_ID
    n_class: int = 104

    @property
    def n_genes(self) -> int:
        return self.seq_len - N_TOTAL_TOKENS

    @classmethod
    def from_official_dict(cls, config: Mapping[str, Any], *, source: str = "checkpoint") -> ScFoundationConfig:
        """Read the flat config ``convertconfig`` builds (``model_config[model]`` merged with ``dataset_config``).

        Raises
        ------
        CheckpointError
            When the model is not ``mae_autobin`` with a ``transformer`` encoder, or a field is missing.
        """
        if config.get("model") != "mae_autobin":
            msg = f"{source}: config['model'] is {config.get('model')!r}; only 'mae_autobin' (scFoundation) is supported."
            raise CheckpointError(msg)
        encoder = config.get("encoder")
        if not isinstance(encoder, Mapping) or encoder.get("module_type") != "transformer":
            found = encoder.get("module_type") if isinstance(encoder, Mapping) else encoder
            msg = f"{source}: encoder module_type is {found!r}; the scFoundation cell path needs 'transformer'."
            raise CheckpointError(msg)
        try:
            return cls(
                seq_len=int(config["seq_len"]),
                hidden_dim=int(encoder["hidden_dim"]),
                depth=int(encoder["depth"]),
                heads=int(encoder["heads"]),
                dim_head=int(encoder.get("dim_head", int(encoder["hidden_dim"]) // int(encoder["heads"]))),
                norm_first=bool(encoder.get("norm_first", False)),
                bin_num=int(config["bin_num"]),
                bin_alpha=float(config["bin_alpha"]),
                pad_token_id=int(config["pad_token_id"]),
                mask_token_id=int(config["mask_token_id"]),
                n_class=int(config.get("n_class", cls.n_class)),
            )
        except KeyError as err:
            msg = f"{source}: the config has no {err.args[0]!r}; it is not an official scFoundation config."
            raise CheckpointError(msg) from err

    @classmethod
    def from_official(cls, path: str | Path, key: str = "cell", *, trust_checkpoint: bool = False) -> ScFoundationConfig:
        """Read the config of entry ``key`` of an official ``models.ckpt``."""
        entry = _checkpoint_entry(read_checkpoint(path, trust_checkpoint=trust_checkpoint), key, path)
        return cls.from_official_dict(flatten_official_config(entry["config"], source=f"{path}[{key!r}]"),
                                      source=f"{path}[{key!r}]")


def flatten_official_config(config: Any, *, source: str = "checkpoint") -> dict[str, Any]:
    """Merge ``model_config[model]`` and ``dataset_config['rnaseq']`` into one dict, as ``convertconfig`` does."""
    if not isinstance(config, Mapping) or "model" not in config or "model_config" not in config:
        found = sorted(config) if isinstance(config, Mapping) else type(config).__name__
        msg = f"{source}: 'config' has {found}; expected 'model', 'model_config' and 'dataset_config'."
        raise CheckpointError(msg)
    model_type = config["model"]
    flat: dict[str, Any] = dict(config["model_config"].get(model_type, {}))
    flat.update(config.get("dataset_config", {}).get("rnaseq", {}))
    flat.setdefault("model", model_type)
    flat["model_type"] = model_type
    return flat


# --- tokenizer ------------------------------------------------------------------------------------------


def read_gene_index(path: str | Path) -> list[str]:
    """Read the official gene index TSV (``gene_name<TAB>index``, index 0..n-1 in row order).

    Raises
    ------
    CheckpointError
        When the file is missing, lacks the columns, or its index is not 0..n-1.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        msg = f"{path}: no such gene index file. Pass gene_index_path= (the official {GENE_INDEX_FILENAME})."
        raise CheckpointError(msg)
    table = pd.read_csv(path, sep="\t", header=0)
    if list(table.columns[:2]) != ["gene_name", "index"]:
        msg = f"{path}: columns are {list(table.columns)}; expected 'gene_name' and 'index' ({GENE_INDEX_FILENAME})."
        raise CheckpointError(msg)
    if not np.array_equal(table["index"].to_numpy(), np.arange(len(table))):
        msg = f"{path}: the 'index' column is not 0..{len(table) - 1} in row order; the file is not the official index."
        raise CheckpointError(msg)
    return table["gene_name"].astype(str).tolist()


def align_genes(matrix: Any, genes: npt.ArrayLike, vocabulary: list[str], *,
                alignment: GeneAlignment = "by_name") -> tuple[sp.csr_matrix, int]:
    """Reindex cells x genes expression onto the model's gene index (``main_gene_selection``).

    Vocabulary genes absent from the data are zero; genes outside the vocabulary are dropped. With
    ``alignment="official"`` a matrix with as many columns as the vocabulary is taken as-is, in its
    own column order, as get_embedding.py does.

    Returns
    -------
    The float64 CSR matrix (cells x len(vocabulary)) with sorted indices, and the number of data genes matched.

    Raises
    ------
    SchemaError
        When no gene matches, a matched gene is duplicated, or ``official`` gets a wider matrix.
    """
    genes = np.asarray(genes).astype(str)
    n_vocab = len(vocabulary)
    if alignment == "official" and genes.size >= n_vocab:
        if genes.size > n_vocab:
            msg = (f"gene_alignment='official' takes a matrix with >= {n_vocab} columns as already in index order, "
                   f"but this one has {genes.size} (the official script crashes on it). Use gene_alignment='by_name'.")
            raise SchemaError(msg)
        return sp.csr_matrix(matrix, dtype=np.float64).sorted_indices(), n_vocab
    lookup = vocabulary_positions(genes, vocabulary)
    matched = np.flatnonzero(lookup >= 0)
    if matched.size == 0:
        msg = (f"none of the {genes.size} genes (e.g. {', '.join(genes[:3])}) is in the scFoundation gene index "
               f"(gene symbols such as {', '.join(vocabulary[:3])}). Map the genes to HGNC symbols or pass gene_key=.")
        raise SchemaError(msg)
    names, counts = np.unique(genes[matched], return_counts=True)
    if (counts > 1).any():
        dupes = names[counts > 1]
        msg = (f"genes {', '.join(dupes[:5])} appear more than once ({dupes.size} duplicated); scFoundation needs one "
               "column per gene. Sum or drop the duplicates first.")
        raise SchemaError(msg)
    selector = sp.csr_matrix((np.ones(matched.size), (matched, lookup[matched])), shape=(genes.size, n_vocab))
    aligned = sp.csr_matrix(sp.csr_matrix(matrix, dtype=np.float64) @ selector)
    return aligned.sorted_indices(), int(matched.size)


def vocabulary_positions(genes: npt.ArrayLike, vocabulary: list[str]) -> npt.NDArray[np.int64]:
    """Return each data gene's position in the gene index by name (-1 where the index lacks it)."""
    import pandas as pd

    return np.asarray(pd.Index(vocabulary).get_indexer(np.asarray(genes).astype(str)), dtype=np.int64)


def known_genes(genes: npt.ArrayLike, vocabulary: list[str], *,
                alignment: GeneAlignment = "by_name") -> npt.NDArray[np.bool_]:
    """Return, per data column, whether `align_genes` maps it onto the gene index (every column when
    ``alignment="official"`` takes the matrix as already in index order)."""
    genes = np.asarray(genes).astype(str)
    if alignment == "official" and genes.size == len(vocabulary):
        return np.ones(genes.size, dtype=bool)
    return vocabulary_positions(genes, vocabulary) >= 0


def parse_target_resolution(tgthighres: str) -> tuple[str, float]:
    """Split ``--tgthighres`` (``t4``, ``f1``, ``a5``) into its mode letter and number."""
    mode, number = tgthighres[:1], tgthighres[1:]
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if mode not in ("t", "f", "a") or not math.isfinite(value):
        msg = (f"tgthighres={tgthighres!r}; expected t<number> (T = number), f<number> (T = log10(total * number)) "
               "or a<number> (T = log10(total) + number), e.g. 't4'.")
        raise ConfigError(msg)
    return mode, value


def row_sums(matrix: sp.csr_matrix, chunk_size: int = 1024) -> npt.NDArray[np.float64]:
    """Return float64 row sums in the order numpy sums a dense row (as pandas' ``Series.sum`` does officially).

    Integer-valued rows (raw counts) sum exactly in any order, so the sparse sum is used; other values
    are summed over dense chunks, so the last bit matches the official total too.
    """
    if np.array_equal(matrix.data, np.round(matrix.data)):
        return np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
    return np.concatenate([matrix[start : start + chunk_size].toarray().sum(axis=1)
                           for start in range(0, matrix.shape[0], chunk_size)] or [np.zeros(0)])


def expression_values(aligned: sp.csr_matrix, *, pre_normalized: PreNormalized = "F", tgthighres: str = "t4",
                      total_counts: npt.ArrayLike | None = None
                      ) -> tuple[sp.csr_matrix, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Return the gene values, T and S of every cell in float64, as get_embedding.py builds ``pretrain_gene_x``.

    ``F``: values log1p(x / total * 1e4) with total the sum of the aligned counts. ``T``: values as given,
    total their row sum. ``A``: values as given, total from ``total_counts``. S = log10(total); T per
    ``tgthighres``. The gene matrix keeps only values > 0 (what ``gatherData`` gathers).
    """
    mode, number = parse_target_resolution(tgthighres)
    values = aligned.copy()
    if pre_normalized == "A":
        if total_counts is None:
            msg = "pre_normalized='A' needs the total count of each cell; pass total_count_key= (an obs column)."
            raise ConfigError(msg)
        total = np.asarray(total_counts, dtype=np.float64).ravel()
    else:
        total = row_sums(aligned)
    with np.errstate(divide="ignore", invalid="ignore"):
        if pre_normalized == "F":
            rows = np.repeat(np.arange(values.shape[0]), np.diff(values.indptr))
            values.data = np.log1p(values.data / total[rows] * NORMALIZE_TARGET)
        elif pre_normalized not in ("T", "A"):
            msg = f"pre_normalized={pre_normalized!r}; expected 'F' (raw counts), 'T' (log-normalised) or 'A'."
            raise ConfigError(msg)
        s_values = np.log10(total)
        if mode == "t":
            t_values = np.full(total.shape, number)
        elif mode == "f":
            t_values = np.log10(total * number)
        else:
            t_values = np.log10(total) + number
    values.data[~(values.data > 0)] = 0.0
    values.eliminate_zeros()
    return values, t_values, s_values


def gather_tokens(values: sp.csr_matrix, t_values: npt.NDArray[np.float64], s_values: npt.NDArray[np.float64]
                  ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int32], npt.NDArray[np.int64]]:
    """Lay out each cell's tokens as ``gatherData`` does: positive genes in index order, then T, then S.

    Returns flat float64 values, int32 position ids and CSR-style offsets (n_cells + 1). T sits at
    position n_genes and S at n_genes + 1; a T or S that is not > 0 is left out, as officially.
    """
    n_cells, n_genes = values.shape
    gene_counts = np.diff(values.indptr).astype(np.int64)
    keep_t = t_values > 0
    keep_s = s_values > 0
    lengths = gene_counts + keep_t + keep_s
    offsets = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat_values = np.empty(int(offsets[-1]), dtype=np.float64)
    flat_positions = np.empty(int(offsets[-1]), dtype=np.int32)
    rows = np.repeat(np.arange(n_cells), gene_counts)
    gene_dest = offsets[rows] + (np.arange(values.nnz) - values.indptr[rows])
    flat_values[gene_dest] = values.data
    flat_positions[gene_dest] = values.indices
    t_dest = offsets[:-1] + gene_counts
    s_dest = t_dest + keep_t
    flat_values[t_dest[keep_t]] = t_values[keep_t]
    flat_positions[t_dest[keep_t]] = n_genes
    flat_values[s_dest[keep_s]] = s_values[keep_s]
    flat_positions[s_dest[keep_s]] = n_genes + 1
    return flat_values, flat_positions, offsets


# --- modules (parameter names = official state-dict keys) ----------------------------------------------


class AutoDiscretizationEmbedding(nn.Module):
    """``AutoDiscretizationEmbedding2``: a value becomes a softmax mixture of ``bin_num`` learned bin embeddings."""

    def __init__(self, config: ScFoundationConfig) -> None:
        super().__init__()
        self.bin_alpha = config.bin_alpha
        self.mask_token_id = config.mask_token_id
        self.pad_token_id = config.pad_token_id
        self.mlp = nn.Linear(1, config.bin_num)
        self.mlp2 = nn.Linear(config.bin_num, config.bin_num)
        self.emb = nn.Embedding(config.bin_num, config.hidden_dim)
        self.emb_mask = nn.Embedding(1, config.hidden_dim)
        self.emb_pad = nn.Embedding(1, config.hidden_dim)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """Embed float32 values [B, N] to [B, N, D]; values equal to the mask / pad id get those embeddings."""
        hidden = F.leaky_relu(self.mlp(values.unsqueeze(-1)), negative_slope=0.1)
        weight = torch.softmax(self.bin_alpha * hidden + self.mlp2(hidden), dim=-1)
        embedded = weight @ self.emb.weight
        embedded = torch.where((values == self.mask_token_id).unsqueeze(-1), self.emb_mask.weight[0], embedded)
        return torch.where((values == self.pad_token_id).unsqueeze(-1), self.emb_pad.weight[0], embedded)


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` weights (packed ``in_proj_weight``) run through SDPA.

    Kept apart from the split-projection `scdrugmap.models._layers.SelfAttention` on purpose: the official
    checkpoint stores the packed ``in_proj_weight`` / ``in_proj_bias`` under those names and this model has
    no rename table. ``out_proj`` is an ``nn.Linear`` called as a module, so LoRA adapters on it run (torch's
    own attention calls it functionally).
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


def build_encoder_layer(config: ScFoundationConfig) -> TransformerEncoderLayer:
    """``nn.TransformerEncoderLayer(dim, heads, 4 * dim, batch_first=True)``: ReLU, post-norm unless ``norm_first``.

    The layer is `scdrugmap.models._layers.TransformerEncoderLayer` around this model's packed `SelfAttention`.
    """
    dim = config.hidden_dim
    return TransformerEncoderLayer(dim, config.heads, config.ff_mult * dim, config.dropout,
                                   layer_norm_eps=config.layer_norm_eps, norm_first=config.norm_first,
                                   self_attn=SelfAttention(dim, config.heads, config.dropout))


class TransformerEncoder(nn.Module):
    """``pytorchTransformerModule``: the layers (``transformer_encoder``) and a final LayerNorm (``norm``)."""

    def __init__(self, config: ScFoundationConfig) -> None:
        super().__init__()
        self.transformer_encoder = nn.ModuleList(build_encoder_layer(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.hidden_dim)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        # SDPA's boolean mask marks keys to attend; padded keys (True in ``padding``) are left out.
        attn_mask = None if padding is None or not bool(padding.any()) else (~padding)[:, None, None, :]
        for layer in self.transformer_encoder:
            x = layer(x, attn_mask)
        return self.norm(x)


class ScFoundationModel(nn.Module):
    """The cell-embedding path of ``MaeAutobin``: ``token_emb`` + ``pos_emb`` -> ``encoder``."""

    def __init__(self, config: ScFoundationConfig) -> None:
        super().__init__()
        self.config = config
        self.token_emb = AutoDiscretizationEmbedding(config)
        self.pos_emb = nn.Embedding(config.seq_len + 1, config.hidden_dim)
        self.encoder = TransformerEncoder(config)

    def forward(self, values: torch.Tensor, positions: torch.Tensor,
                padding: torch.Tensor | None = None) -> torch.Tensor:
        """Return the encoder output [B, N, D] for float32 values and int64 position ids [B, N]."""
        x = self.token_emb(values) + self.pos_emb(positions)
        return self.encoder(x, padding)


def pool_cells(hidden: torch.Tensor, lengths: torch.Tensor, pool: Pool = "all") -> torch.Tensor:
    """Pool encoder outputs [B, N, D] of cells with ``lengths`` tokens, as get_embedding.py does per cell.

    ``all``: concat[h[len-1] (S), h[len-2] (T), max and mean over h[:len-2]]; ``max``: max over h[:len].
    """
    batch, length, _ = hidden.shape
    steps = torch.arange(length, device=hidden.device)
    if pool == "max":
        valid = (steps[None, :] < lengths[:, None]).unsqueeze(-1)
        return hidden.masked_fill(~valid, -torch.inf).amax(dim=1)
    rows = torch.arange(batch, device=hidden.device)
    n_gene_tokens = lengths - N_TOTAL_TOKENS
    genes = (steps[None, :] < n_gene_tokens[:, None]).unsqueeze(-1)
    max_pool = hidden.masked_fill(~genes, -torch.inf).amax(dim=1)
    mean_pool = hidden.masked_fill(~genes, 0.0).sum(dim=1) / n_gene_tokens[:, None].to(hidden.dtype)
    return torch.cat([hidden[rows, lengths - 1], hidden[rows, lengths - 2], max_pool, mean_pool], dim=1)


# --- loader ---------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, *, trust_checkpoint: bool = False) -> Any:
    """Load an official ``models.ckpt`` container with ``weights_only=True`` (memory-mapped when possible).

    The container is ``{'gene'|'cell'|'rde': {'config': dict, 'state_dict': {'model.<key>': tensor}}}``:
    plain Python types and tensors, which the restricted unpickler accepts. Should a file hold other
    objects, loading stops with a `CheckpointError`; ``trust_checkpoint=True`` then runs the full
    unpickler (arbitrary code), only for a file from the official source.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: no such checkpoint file. Download {CHECKPOINT_FILENAME} (`scdrugmap models download scfoundation`)."
        raise CheckpointError(msg)
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise CheckpointError(_unreadable(path, err)) from err
        if not trust_checkpoint:
            msg = (f"{path}: the checkpoint holds objects other than tensors and plain types, which weights_only "
                   f"loading refuses ({str(err).splitlines()[0]}). If the file is the official {CHECKPOINT_FILENAME}, "
                   "pass trust_checkpoint=True to unpickle it fully.")
            raise CheckpointError(msg) from err
        log.warning("%s: loading with the full unpickler (trust_checkpoint=True)", path)
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(_unreadable(path, err)) from err


def _unreadable(path: Path, err: Exception) -> str:
    with open(path, "rb") as handle:
        head = handle.read(16)
    reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return (f"{path}: not a readable torch checkpoint ({type(err).__name__}: {reason[:200]}; file starts with "
            f"{head!r}). The file is corrupted or incomplete (or a web page saved in its place): download it again.")


def _checkpoint_entry(container: Any, key: str, path: str | Path) -> Mapping[str, Any]:
    if not isinstance(container, Mapping) or key not in container:
        found = sorted(map(str, container)) if isinstance(container, Mapping) else type(container).__name__
        msg = (f"{path}: no entry {key!r}; the file has {found}. The official models.ckpt holds 'gene', 'cell' "
               "and 'rde' (version='ce' reads 'cell', version='rde' reads 'rde').")
        raise CheckpointError(msg)
    entry = container[key]
    if not isinstance(entry, Mapping) or "config" not in entry or "state_dict" not in entry:
        found = sorted(map(str, entry)) if isinstance(entry, Mapping) else type(entry).__name__
        msg = f"{path}[{key!r}] has {found}; expected 'config' and 'state_dict' (load_model_frommmf)."
        raise CheckpointError(msg)
    return entry


def official_state_dict(raw: Mapping[str, Any], *, source: str = "checkpoint") -> OrderedDict[str, Any]:
    """Strip the Lightning prefix as ``convertconfig`` does: keep ``str(key).split('model.')[1]``."""
    renamed: OrderedDict[str, Any] = OrderedDict()
    unprefixed = [str(key) for key in raw if STATE_DICT_PREFIX not in str(key)]
    if unprefixed:
        msg = (f"{source}: {len(unprefixed)} state-dict keys lack the {STATE_DICT_PREFIX!r} prefix of the official "
               f"file: {', '.join(unprefixed[:5])}.")
        raise CheckpointError(msg)
    for key, value in raw.items():
        renamed[str(key).split(STATE_DICT_PREFIX)[1]] = value
    return renamed


def load_state_dict_strict(model: ScFoundationModel, state_dict: Mapping[str, Any], *,
                           source: str = "checkpoint") -> list[str]:
    """Load official weights into ``model``; return the decoder-side keys that were skipped.

    Raises
    ------
    CheckpointError
        Naming every missing, unexpected or mis-shaped key, or a value that is not a tensor.
    """
    expected = model.state_dict()
    skipped = sorted(k for k in state_dict if k not in expected and k.startswith(UNUSED_PREFIXES))
    unexpected = sorted(k for k in state_dict if k not in expected and not k.startswith(UNUSED_PREFIXES))
    missing = sorted(k for k in expected if k not in state_dict)
    not_tensor = sorted(k for k in expected if k in state_dict and not isinstance(state_dict[k], torch.Tensor))
    misshaped = sorted(f"{k} {tuple(state_dict[k].shape)} (model {tuple(expected[k].shape)})" for k in expected
                       if k in state_dict and k not in not_tensor and state_dict[k].shape != expected[k].shape)
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                        ("not tensors", not_tensor)):
        if keys:
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
    if problems:
        msg = (f"{source} does not match the scFoundation architecture of its own config: {'; '.join(problems)}. "
               "Use the official models.ckpt unmodified.")
        raise CheckpointError(msg)
    model.load_state_dict({k: state_dict[k] for k in expected}, strict=True)
    return skipped


def load_model(checkpoint_path: str | Path, key: str = "cell", *, trust_checkpoint: bool = False,
               device: str | torch.device | None = None) -> ScFoundationModel:
    """Build the cell-embedding path from entry ``key`` of an official ``models.ckpt`` and load it strictly."""
    source = f"{checkpoint_path}[{key!r}]"
    entry = _checkpoint_entry(read_checkpoint(checkpoint_path, trust_checkpoint=trust_checkpoint), key,
                              checkpoint_path)
    config = ScFoundationConfig.from_official_dict(flatten_official_config(entry["config"], source=source),
                                                   source=source)
    if not isinstance(entry["state_dict"], Mapping):
        msg = f"{source}: 'state_dict' is a {type(entry['state_dict']).__name__}; expected a mapping of tensors."
        raise CheckpointError(msg)
    with torch.device("meta"):
        model = ScFoundationModel(config)
    model.to_empty(device="cpu")
    skipped = load_state_dict_strict(model, official_state_dict(entry["state_dict"], source=source), source=source)
    if skipped:
        log.info("%s: %d keys of the pretraining decoder are not used for cell embeddings: %s", source,
                 len(skipped), ", ".join(skipped))
    return model.to(device) if device is not None else model


# --- the encoder ----------------------------------------------------------------------------------------

_GITHUB_RAW = f"https://raw.githubusercontent.com/{OFFICIAL_REPO}/{OFFICIAL_COMMIT}"


@dataclass
class _Options:
    version: Literal["ce", "rde"] = "ce"
    pool: Pool = "all"
    tgthighres: str = "t4"
    pre_normalized: PreNormalized = "F"
    gene_alignment: GeneAlignment = "by_name"
    gene_key: str | None = None
    total_count_key: str | None = None


class ScFoundationEncoder(TorchEncoder):
    """scFoundation cell embeddings (S, T, max and mean of the gene tokens: 3,072-d at full size).

    Parameters
    ----------
    module
        The loaded `ScFoundationModel`.
    genes
        The gene index (model position i = ``genes[i]``), from ``OS_scRNA_gene_index.19264.tsv``.
    pool
        ``"all"`` (official default, 4 x hidden) or ``"max"`` (hidden).
    tgthighres
        Value of the T token: ``t<N>`` (T = N, default ``t4``), ``f<N>`` or ``a<N>``, as ``--tgthighres``.
    pre_normalized
        ``"F"``: raw counts (default); ``"T"``: log1p(1e4-normalised) values; ``"A"``: such values with
        the total count in ``obs[total_count_key]``.
    gene_alignment
        ``"by_name"`` (default) or ``"official"`` (a matrix as wide as the index is taken in its own order).
    gene_key
        var column of gene symbols; by default ``var['gene_symbol']``, else ``var['gene_name']`` (what the
        official h5ad reader uses), else ``var_names``.
    version
        Which checkpoint entry the module came from (``"ce"`` -> cell, ``"rde"`` -> read-depth enhancement).
    """

    name: ClassVar[str] = "scfoundation"
    family: ClassVar[Literal["scfm", "llm", "baseline"]] = "scfm"
    input_kind: ClassVar[Literal["counts", "nonnegative", "any"]] = "counts"
    #: The encoder's attention output projection, as scDrugMap's LoRA scripts adapt it (``--ft_list
    #: ['out_proj']`` in QSong-github/scDrugMap code/UCE/benchmarking_main_FT.py, also an
    #: nn.TransformerEncoder). It matches only ``encoder.transformer_encoder.*.self_attn.out_proj``; the
    #: in-projection is a packed parameter, not a module, in the official layout.
    lora_targets: ClassVar[tuple[str, ...]] = ("out_proj",)
    module: ScFoundationModel
    weights_sources: ClassVar[Mapping[str, WeightsSource]] = {
        "scfoundation": WeightsSource(
            name="scfoundation",
            files=(
                # The publisher shares a SharePoint folder holding models.ckpt (model/models/download.txt);
                # no checksum is published.
                RemoteFile(CHECKPOINT_FILENAME, "https://hopebio2020.sharepoint.com/:f:/s/PublicSharedfiles/"
                           "EmUQnvZMETlDvoCaBduCNeIBQArcOrd8T8iEpiGofFZ9CQ?e=3SpPZU"),
                RemoteFile(GENE_INDEX_FILENAME, f"{_GITHUB_RAW}/{GENE_INDEX_FILENAME}"),
            ),
            homepage=f"https://github.com/{OFFICIAL_REPO}",
            license="Apache-2.0 (code); weights under BioMap's terms",
        ),
    }

    def __init__(self, module: ScFoundationModel, genes: list[str], *, pool: Pool = "all", tgthighres: str = "t4",
                 pre_normalized: PreNormalized = "F", gene_alignment: GeneAlignment = "by_name",
                 gene_key: str | None = None, total_count_key: str | None = None,
                 version: Literal["ce", "rde"] = "ce") -> None:
        if len(genes) != module.config.n_genes:
            msg = (f"the gene index has {len(genes)} genes but the checkpoint's seq_len {module.config.seq_len} "
                   f"needs {module.config.n_genes}; pair models.ckpt with its own {GENE_INDEX_FILENAME}.")
            raise CheckpointError(msg)
        for option, value, allowed in (("pool", pool, ("all", "max")), ("pre_normalized", pre_normalized, ("F", "T", "A")),
                                       ("gene_alignment", gene_alignment, ("by_name", "official")),
                                       ("version", version, tuple(VERSION_KEYS))):
            if value not in allowed:
                msg = f"scfoundation: {option}={value!r}; expected one of {', '.join(map(repr, allowed))}."
                raise ConfigError(msg)
        parse_target_resolution(tgthighres)
        if pre_normalized == "A" and total_count_key is None:
            msg = "scfoundation: pre_normalized='A' needs total_count_key= (the obs column holding each cell's total count)."
            raise ConfigError(msg)
        self.module = module
        self.genes = list(genes)
        self.options = _Options(version=version, pool=pool, tgthighres=tgthighres, pre_normalized=pre_normalized,
                                gene_alignment=gene_alignment, gene_key=gene_key, total_count_key=total_count_key)

    @property
    def config(self) -> ScFoundationConfig:
        return self.module.config

    @property
    def _pad_position(self) -> int:
        # gatherData pads the cell path's position ids with pad_token_id (103); masked keys, so any row
        # of pos_emb serves where a small test model has fewer rows.
        return min(self.config.pad_token_id, self.config.seq_len)

    @property
    def embedding_dim(self) -> int:
        return self.config.hidden_dim * (4 if self.options.pool == "all" else 1)

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path | None = None, **options: Any) -> ScFoundationEncoder:
        """Load the official ``models.ckpt`` and gene index.

        ``path_or_name``: None or ``"scfoundation"`` for the cache / download; a ``models.ckpt`` file; or
        a folder in the official layout (``models.ckpt`` or ``models/models.ckpt``, with
        ``OS_scRNA_gene_index.19264.tsv`` beside it or one level up). Options: ``gene_index_path``,
        ``trust_checkpoint`` (see `read_checkpoint`), ``device``, and the constructor's keywords.
        """
        gene_index_path = options.pop("gene_index_path", None)
        trust_checkpoint = bool(options.pop("trust_checkpoint", False))
        device = options.pop("device", None)
        version = options.get("version", "ce")
        if version not in VERSION_KEYS:
            msg = f"scfoundation: version={version!r}; expected 'ce' (cell embeddings) or 'rde' (read-depth enhancement)."
            raise ConfigError(msg)
        source = next(iter(cls.weights_sources.values()))
        if path_or_name is None or str(path_or_name) in cls.weights_sources:
            location = resolve_weights(source)
        else:
            location = resolve_weights(source, path_or_name)
        checkpoint_path, index_path = _locate_files(location, gene_index_path)
        start = time.perf_counter()
        log.info("loading scFoundation (%s) from %s", VERSION_KEYS[version], checkpoint_path)
        module = load_model(checkpoint_path, VERSION_KEYS[version], trust_checkpoint=trust_checkpoint, device=device)
        module.eval()
        encoder = cls(module, read_gene_index(index_path), **options)
        encoder.checkpoint_sha256 = sha256_file(checkpoint_path)
        log.info("    finished loading scFoundation in %.1fs", time.perf_counter() - start)
        return encoder

    # -- tokenize / collate / encode --

    def check_input(self, adata: ad.AnnData, *, layer: str | None = None) -> None:
        needs: Literal["counts", "nonnegative"] = "counts" if self.options.pre_normalized == "F" else "nonnegative"
        require_value_kind(adata, needs=needs, model=self.name, layer=layer)

    def _gene_names(self, adata: ad.AnnData) -> np.ndarray:
        key = self.options.gene_key
        if key is not None:
            if key not in adata.var:
                msg = f"scfoundation: gene_key={key!r} is not a var column; var has {list(adata.var.columns)}."
                raise SchemaError(msg)
            return adata.var[key].astype(str).to_numpy()
        for column in ("gene_symbol", "gene_name"):
            if column in adata.var:
                return adata.var[column].astype(str).to_numpy()
        return adata.var_names.astype(str).to_numpy()

    def tokenize(self, adata: ad.AnnData, *, layer: str | None = None) -> TokenizedCells:
        """Build each cell's gathered tokens (values and positions), vectorised over cells.

        Cells left with too few tokens to pool (no expressed gene of the index) are dropped with a reason.
        """
        options = self.options
        genes = self._gene_names(adata)
        aligned, n_matched = align_genes(expression_matrix(adata, layer), genes, self.genes,
                                         alignment=options.gene_alignment)
        total_counts = None
        if options.pre_normalized == "A":
            if options.total_count_key not in adata.obs:
                msg = f"scfoundation: obs has no column {options.total_count_key!r} (total_count_key) for pre_normalized='A'."
                raise SchemaError(msg)
            total_counts = adata.obs[options.total_count_key].to_numpy(dtype=np.float64)
        gene_values, t_values, s_values = expression_values(
            aligned, pre_normalized=options.pre_normalized, tgthighres=options.tgthighres, total_counts=total_counts)
        values, positions, offsets = gather_tokens(gene_values, t_values, s_values)
        lengths = np.diff(offsets)
        usable = lengths >= MIN_TOKENS[options.pool]
        dropped = {int(row): (f"{int(lengths[row])} tokens after gathering (expressed genes of the index + T + S); "
                              f"pool={options.pool!r} needs {MIN_TOKENS[options.pool]}")
                   for row in np.flatnonzero(~usable)}
        keep = np.flatnonzero(usable)
        if keep.size < lengths.size:
            starts, kept_lengths = offsets[keep], lengths[keep]
            index = np.repeat(starts - np.concatenate([[0], np.cumsum(kept_lengths)[:-1]]), kept_lengths)
            index += np.arange(index.size)
            values, positions = values[index], positions[index]
            offsets = np.zeros(keep.size + 1, dtype=np.int64)
            np.cumsum(kept_lengths, out=offsets[1:])
        return TokenizedCells(
            cell_index=keep.astype(np.int64),
            lengths=np.diff(offsets),
            # float64 -> float32 is the official cast at ``token_emb(x.float())``.
            arrays={"values": values.astype(np.float32), "positions": positions, "offsets": offsets},
            dropped=dropped,
            n_genes_matched=n_matched,
            gene_known=known_genes(genes, self.genes, alignment=options.gene_alignment),
        )

    def collate(self, tokens: TokenizedCells, rows: npt.NDArray[np.int64]) -> dict[str, torch.Tensor]:
        """Pad the chosen cells to their longest one with the official pad value (103) and a padding mask."""
        offsets = tokens.arrays["offsets"]
        lengths = tokens.lengths[rows]
        width = int(lengths.max())
        steps = np.arange(width)
        valid = steps[None, :] < lengths[:, None]
        index = np.where(valid, offsets[rows][:, None] + steps[None, :], 0)
        values = np.where(valid, tokens.arrays["values"][index], np.float32(self.config.pad_token_id))
        positions = np.where(valid, tokens.arrays["positions"][index], self._pad_position)
        return {"values": torch.from_numpy(values.astype(np.float32)),
                "positions": torch.from_numpy(positions.astype(np.int64)),
                "padding": torch.from_numpy(~valid),
                "lengths": torch.from_numpy(lengths.astype(np.int64))}

    def encode(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Run the encoder on a padded batch and pool each cell as the official per-cell loop does."""
        hidden = self.module(batch["values"], batch["positions"], batch["padding"])
        return pool_cells(hidden, batch["lengths"], self.options.pool)

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts.update({key.name: getattr(self.options, key.name) for key in fields(self.options)})
        return facts


def _locate_files(location: Path, gene_index_path: str | Path | None) -> tuple[Path, Path]:
    """Find ``models.ckpt`` and the gene index in a file or a folder of the official layout."""
    if location.is_file():
        checkpoint_path = location
    else:
        candidates = [location / CHECKPOINT_FILENAME, location / "models" / CHECKPOINT_FILENAME]
        found = [path for path in candidates if path.is_file()]
        if not found:
            msg = (f"{location}: no {CHECKPOINT_FILENAME} (looked at {', '.join(map(str, candidates))}). "
                   f"Download it from {ScFoundationEncoder.weights_sources['scfoundation'].homepage} (model/models).")
            raise CheckpointError(msg)
        checkpoint_path = found[0]
    if gene_index_path is not None:
        return checkpoint_path, Path(gene_index_path)
    candidates = [checkpoint_path.parent / GENE_INDEX_FILENAME, checkpoint_path.parent.parent / GENE_INDEX_FILENAME]
    if location.is_dir():
        candidates.insert(0, location / GENE_INDEX_FILENAME)
    for path in candidates:
        if path.is_file():
            return checkpoint_path, path
    msg = (f"no {GENE_INDEX_FILENAME} next to {checkpoint_path} (looked at {', '.join(map(str, candidates))}). "
           f"Pass gene_index_path=, or fetch it from {_GITHUB_RAW}/{GENE_INDEX_FILENAME}.")
    raise CheckpointError(msg)


def official_keys(config: ScFoundationConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Return the state-dict keys and shapes of the cell path at ``config``, built on the meta device."""
    with torch.device("meta"):
        model = ScFoundationModel(config or ScFoundationConfig())
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


__all__ = ["ScFoundationConfig", "ScFoundationEncoder", "ScFoundationModel", "align_genes", "expression_values",
           "gather_tokens", "load_model", "official_keys", "pool_cells", "read_checkpoint", "read_gene_index"]

