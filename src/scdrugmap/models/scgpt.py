"""scGPT (whole-human) as a scDrugMap encoder.

Paper: Cui et al., "scGPT: toward building a foundation model for single-cell multi-omics using
generative AI", Nature Methods 21, 1470-1480 (2024).
Official code: https://github.com/bowang-lab/scGPT, ``main`` @ ``cebd6fae655b9c585a4807daa3ac31bb764f06b4``
(v0.2.5), cross-checked against the PyPI wheel ``scgpt==0.2.4``. The cell-embedding path reproduced here is
``scgpt.tasks.cell_emb.embed_data`` -> ``get_batch_cell_embeddings`` -> ``DataCollator`` ->
``TransformerModel._encode``.

Input
    Any non-negative expression, used as is (``embed_data`` applies no normalisation). Each cell's
    nonzero values are binned by their own quantiles, so only their order and ties matter: raw counts
    (what the authors feed), TPM or ``log1p(normalize_total)`` give the same tokens (up to float
    rounding at a quantile edge), hence ``input_kind = "nonnegative"``.
Tokens
    ``<cls>`` (value -2) followed by the cell's nonzero in-vocabulary genes in ``adata`` column order,
    each with its expression bin 1..50; cells longer than ``max_length`` (1200) keep ``<cls>`` and a
    random sample of genes.
Pooling
    The last layer's output at ``<cls>``, L2-normalised (``embed_data``); ``normalize=False`` gives the
    unnormalised vector (``TransformerModel.forward()["cell_emb"]``).
Checkpoint
    The official model folder (``best_model.pt``, ``args.json``, ``vocab.json``), loaded strictly. One
    rename: each layer's fused attention input projection, stored as flash-attn ``self_attn.Wqkv``,
    is split into ``q_proj``/``k_proj``/``v_proj`` (see `FUSED_QKV`); all other names are official.

Quirk kept by default: binning breaks ties at quantile edges at random (see `bin_cells`). The official
code draws from the global numpy RNG of its DataLoader workers; here a ``numpy.random.Generator`` seeded
with ``seed`` draws them, so embeddings are reproducible. ``bin_ties="midpoint"`` gives every tied value
the middle of its allowed bin range instead (the mean of the official draw), which makes embeddings
independent of the seed.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from scdrugmap.data.schema import expression_matrix
from scdrugmap.errors import CheckpointError, ConfigError, SchemaError
from scdrugmap.models._layers import TransformerEncoderLayer
from scdrugmap.models.base import TokenizedCells, TorchEncoder
from scdrugmap.models.weights import RemoteFile, WeightsSource, resolve_weights, sha256_file

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

log = logging.getLogger(__name__)

# --- official constants ---------------------------------------------------------------------------------

#: Files of an official model folder (scgpt/tasks/cell_emb.py: embed_data reads these three).
CHECKPOINT_FILE = "best_model.pt"
ARGS_FILE = "args.json"
VOCAB_FILE = "vocab.json"
#: Appended to the vocabulary when missing, in this order (embed_data: special_tokens).
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
CLS_TOKEN = "<cls>"
#: Expression bins incl. 0; values land in 1..N_BINS-1 (scgpt/data_collator.py: DataCollator.n_bins=51,
#: which embed_data never overrides, so args.json's n_bins is not read).
N_BINS = 51
#: Default sequence length incl. <cls> (embed_data(max_length=1200)).
MAX_LENGTH = 1200
#: Tokens the collator never samples away (get_batch_cell_embeddings: DataCollator(keep_first_n_tokens=1)).
KEEP_FIRST_N_TOKENS = 1
#: Clamp of the continuous value encoder (scgpt/model/model.py: ContinuousValueEncoder(max_value=512)).
MAX_VALUE = 512.0
#: nn.LayerNorm / nn.TransformerEncoderLayer default eps used by every norm of the model.
LAYER_NORM_EPS = 1e-5
#: args.json keys embed_data reads, with the name used here.
ARGS_KEYS = {"embsize": "d_model", "nheads": "nhead", "d_hid": "d_hid", "nlayers": "nlayers",
             "dropout": "dropout", "pad_token": "pad_token", "pad_value": "pad_value"}

BinTies = Literal["random", "midpoint"]


# --- config ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScGPTConfig:
    """Architecture of the scGPT cell encoder; defaults are the published whole-human model.

    Attributes
    ----------
    ntoken
        Vocabulary size incl. ``<pad>``, ``<cls>``, ``<eoc>`` (``len(vocab)`` in ``embed_data``).
    d_model, nhead, d_hid, nlayers, dropout
        ``embsize``, ``nheads``, ``d_hid``, ``nlayers``, ``dropout`` of ``args.json``.
    pad_token, pad_value
        Padding token and the value fed with ``<pad>`` and ``<cls>`` (``args.json``).
    pad_token_id, cls_token_id
        Vocabulary ids of ``<pad>`` and ``<cls>``.
    """

    ntoken: int = 60697
    d_model: int = 512
    nhead: int = 8
    d_hid: int = 512
    nlayers: int = 12
    dropout: float = 0.2
    pad_token: str = "<pad>"
    pad_value: float = -2.0
    pad_token_id: int = 60694
    cls_token_id: int = 60695

    @classmethod
    def from_official(cls, model_dir: str | Path, vocab: Mapping[str, int] | None = None) -> ScGPTConfig:
        """Read the config of an official model folder (``args.json``, and ``vocab.json`` unless given).

        Raises
        ------
        CheckpointError
            When ``args.json`` lacks a key ``embed_data`` reads, or describes an input style other than the
            continuous value encoding of the published models.
        """
        args_path = Path(model_dir) / ARGS_FILE
        try:
            args = json.loads(args_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            msg = f"{args_path}: cannot read the scGPT args ({err}). Use the official model folder (args.json)."
            raise CheckpointError(msg) from err
        missing = [key for key in ARGS_KEYS if key not in args]
        if missing:
            msg = f"{args_path}: missing {missing}; an official scGPT args.json has {sorted(ARGS_KEYS)}."
            raise CheckpointError(msg)
        style = args.get("input_emb_style", "continuous")
        if style != "continuous":
            msg = (f"{args_path}: input_emb_style={style!r}; only 'continuous' (the published scGPT models, "
                   "which embed_data builds) is implemented.")
            raise CheckpointError(msg)
        if vocab is None:
            vocab = load_vocab(Path(model_dir) / VOCAB_FILE)
        pad_token = str(args["pad_token"])
        if pad_token not in vocab:
            msg = f"{args_path}: pad_token {pad_token!r} is not in the vocabulary; args.json and vocab.json differ."
            raise CheckpointError(msg)
        return cls(ntoken=len(vocab), d_model=int(args["embsize"]), nhead=int(args["nheads"]),
                   d_hid=int(args["d_hid"]), nlayers=int(args["nlayers"]), dropout=float(args["dropout"]),
                   pad_token=pad_token, pad_value=float(args["pad_value"]),
                   pad_token_id=int(vocab[pad_token]), cls_token_id=int(vocab[CLS_TOKEN]))


def load_vocab(path: str | Path) -> dict[str, int]:
    """Read an official ``vocab.json`` (``{gene: id}``), appending missing special tokens as ``embed_data`` does.

    Raises
    ------
    CheckpointError
        When the file cannot be read or its ids are not 0..n-1.
    """
    path = Path(path)
    try:
        vocab = {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, json.JSONDecodeError, AttributeError, TypeError, ValueError) as err:
        msg = f"{path}: cannot read the scGPT vocabulary ({err}); expected the official {{gene: id}} JSON."
        raise CheckpointError(msg) from err
    if sorted(vocab.values()) != list(range(len(vocab))):
        msg = f"{path}: vocabulary ids are not 0..{len(vocab) - 1} each once; the file is not an official vocab.json."
        raise CheckpointError(msg)
    for token in SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    return vocab


# --- tokenizer ------------------------------------------------------------------------------------------


def quantile_edges(sorted_values: npt.NDArray[np.float32], starts: npt.NDArray[np.int64],
                   counts: npt.NDArray[np.int64], n_edges: int = N_BINS - 1) -> npt.NDArray[np.float64]:
    """Return each cell's ``np.quantile(values, np.linspace(0, 1, n_edges))``, bit for bit, for all cells at once.

    ``sorted_values`` holds each cell's values sorted ascending, cell ``i`` at
    ``starts[i] : starts[i] + counts[i]`` (every count >= 1). This is numpy's default ``"linear"`` method
    written out (virtual index ``(n-1)q``, and its two-sided lerp), in the dtypes numpy uses for float32
    data: the difference of neighbours in float32, the interpolation in float64.
    """
    q = np.linspace(0.0, 1.0, n_edges)
    last = (counts - 1)[:, None]
    virtual = last * q[None, :]
    floor = np.floor(virtual)
    above = virtual >= last
    gamma = virtual - np.where(above, -1.0, floor)  # numpy sets prev=-1 past the end; diff is 0 there
    prev_index = np.where(above, last, floor.astype(np.int64))
    next_index = np.where(above, last, prev_index + 1)
    lower = sorted_values[starts[:, None] + prev_index]
    upper = sorted_values[starts[:, None] + next_index]
    diff = (upper - lower).astype(np.float64)
    return np.where(gamma >= 0.5, upper - diff * (1.0 - gamma), lower + diff * gamma)


def cell_keys(cell: npt.NDArray[np.int64], values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint64]:
    """Pack (cell, non-negative float32 value) into one uint64 that sorts like the pair.

    The bit pattern of a non-negative float32 orders like its value, so one plain sort or
    ``searchsorted`` on these keys does the work of a lexsort over (cell, value).
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return (cell.astype(np.uint64) << np.uint64(32)) | bits


def _count_edges(sorted_keys: npt.NDArray[np.uint64], sorted_cell: npt.NDArray[np.int64],
                 edges: npt.NDArray[np.float64], *, inclusive: bool) -> npt.NDArray[np.int64]:
    """For each sorted value, count its cell's edges ``<= value`` (inclusive) or ``< value``.

    Values are float32 (what the official collator bins), edges float64. For a float32 ``v``, ``v >= e``
    holds exactly when ``v`` is at least the smallest float32 ``>= e``, and ``v > e`` when it exceeds the
    largest float32 ``<= e``. So each edge is rounded that way, located among the sorted (cell, value)
    keys by one ``searchsorted``, and a cumulative count over positions gives every value's count.
    """
    n_cells, n_edges = edges.shape
    rounded = edges.astype(np.float32)
    if inclusive:
        bound = np.where(rounded < edges, np.nextafter(rounded, np.float32(np.inf)), rounded)
    else:
        bound = np.where(rounded > edges, np.nextafter(rounded, np.float32(0)), rounded)
    edge_keys = cell_keys(np.repeat(np.arange(n_cells), n_edges), bound.ravel())
    # values from this position on pass the edge; edges of earlier cells are passed by all of this cell's
    first_passing = np.searchsorted(sorted_keys, edge_keys, side="left" if inclusive else "right")
    passed = np.cumsum(np.bincount(first_passing, minlength=sorted_keys.size + 1))[:-1]
    return passed - sorted_cell * n_edges


def digitize_cells(values: npt.NDArray[np.float32], indptr: npt.NDArray[np.int64],
                   n_edges: int = N_BINS - 1) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray]:
    """Return ``np.digitize(v, edges)``, ``np.digitize(v, edges, right=True)`` and the edges, per cell.

    ``edges`` are each cell's ``np.quantile(values, np.linspace(0, 1, n_edges))``; cell ``i`` holds
    ``values[indptr[i]:indptr[i+1]]`` (each cell non-empty, values non-negative float32).
    """
    values = np.asarray(values, dtype=np.float32)
    counts = np.diff(indptr)
    cell = np.repeat(np.arange(counts.size), counts)
    keys = cell_keys(cell, values)
    order = np.argsort(keys, kind="stable")  # keys are already grouped by cell: long sorted runs
    sorted_keys = keys[order]
    sorted_values = values[order]
    edges = quantile_edges(sorted_values, indptr[:-1], counts, n_edges)
    left = np.empty(values.size, dtype=np.int64)
    right = np.empty(values.size, dtype=np.int64)
    left[order] = _count_edges(sorted_keys, cell, edges, inclusive=True)  # cell is sorted already
    right[order] = _count_edges(sorted_keys, cell, edges, inclusive=False)
    return left, right, edges


def bin_cells(values: npt.NDArray[np.float32], indptr: npt.NDArray[np.int64], rng: np.random.Generator, *,
              ties: BinTies = "random", n_bins: int = N_BINS) -> tuple[npt.NDArray[np.float32], npt.NDArray]:
    """Bin each cell's nonzero values by its own quantiles, as ``scgpt.preprocess.binning`` does.

    Parameters
    ----------
    values
        Positive values of all cells, cell ``i`` at ``indptr[i]:indptr[i+1]`` (each cell non-empty).
    indptr
        CSR-style offsets.
    rng
        Draws the tie-breaking uniforms, one per value in order (``np.random.rand(len(x))`` per cell
        in ``scgpt.preprocess._digitize``).
    ties
        ``"random"`` (official): a value equal to quantile edges gets a uniform bin in
        ``[right + 1, left]``, with ``left = np.digitize(v, edges)``, ``right = np.digitize(v, edges,
        right=True)``, as ``ceil(u * (right - left) + left)``. ``"midpoint"``: ``(left + right + 1) // 2``.
    n_bins
        Bins incl. the zero bin; ``n_bins - 1`` quantile edges.

    Returns
    -------
    Bins 1..n_bins-1 as float32 (the dtype the collator feeds), and the (cells x edges) float64 edges.
    """
    left, right, edges = digitize_cells(values, indptr, n_bins - 1)
    if ties == "random":
        uniforms = rng.random(values.size)
        digits = np.ceil(uniforms * (right - left) + left).astype(np.int64)
    elif ties == "midpoint":
        digits = (left + right + 1) // 2
    else:
        msg = f"bin_ties={ties!r}; expected 'random' (official) or 'midpoint'."
        raise ConfigError(msg)
    return digits.astype(np.float32), edges


def tokenize_matrix(X: sp.csr_matrix, gene_token_ids: npt.NDArray[np.int64], *, cls_token_id: int,
                    cls_value: float, max_length: int = MAX_LENGTH, sampling: bool = True,
                    ties: BinTies = "random", rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Turn expression rows into scGPT token sequences, all cells at once.

    Parameters
    ----------
    X
        (cells x genes) non-negative expression.
    gene_token_ids
        Vocabulary id per column of ``X``, -1 for genes outside the vocabulary (dropped).
    cls_token_id, cls_value
        ``<cls>`` id and its value (``pad_value``, -2), put first in every sequence.
    max_length
        Longest sequence incl. ``<cls>``; longer cells are sampled (or truncated, ``sampling=False``).
    sampling
        Official ``DataCollator(sampling=True)``: keep ``<cls>`` and ``max_length - 1`` genes drawn without
        replacement, in random order (``torch.randperm``). Binning happens before, over all genes.
    ties, rng
        See `bin_cells`; ``rng`` also draws the sample, after all binning draws.

    Returns
    -------
    ``gene_ids`` (int64) and ``values`` (float32) flat, ``offsets`` (int64, kept cells + 1), ``rows`` (the
    row of ``X`` of each kept cell) and ``empty_rows`` (rows with no nonzero in-vocabulary gene).
    """
    if max_length <= KEEP_FIRST_N_TOKENS:
        msg = f"max_length={max_length}; it counts <cls>, so it must be at least {KEEP_FIRST_N_TOKENS + 1}."
        raise ConfigError(msg)
    keep = np.flatnonzero(gene_token_ids >= 0)
    X = sp.csr_matrix(X[:, keep], copy=True)
    X.eliminate_zeros()  # official: np.nonzero on the dense row
    X.sort_indices()  # official order: adata column order
    token_ids = np.asarray(gene_token_ids, dtype=np.int64)[keep]
    counts_all = np.diff(X.indptr)
    rows = np.flatnonzero(counts_all > 0)
    counts = counts_all[rows].astype(np.int64)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    # rows without entries contribute nothing to data, so the kept rows' data is contiguous as is
    values = X.data.astype(np.float32)  # official: torch.from_numpy(values).float()
    if values.size and values.min() < 0:
        msg = f"expression has negative values (min {values.min()}); scGPT bins non-negative expression only."
        raise SchemaError(msg)
    genes = token_ids[X.indices]
    bins, _ = bin_cells(values, indptr, rng, ties=ties)

    cell = np.repeat(np.arange(rows.size), counts)
    position = np.arange(values.size) - indptr[cell]
    n_genes_max = max_length - KEEP_FIRST_N_TOKENS
    too_long = counts > n_genes_max
    if sampling and too_long.any():
        in_long = too_long[cell]
        rank = position.astype(np.uint64)
        rank[in_long] = rng.integers(0, 1 << 32, size=int(in_long.sum()), dtype=np.uint64)  # random order
        order = np.argsort((cell.astype(np.uint64) << np.uint64(32)) | rank, kind="stable")
        genes, bins = genes[order], bins[order]
    kept = position < n_genes_max  # rank within the (possibly shuffled) cell
    genes, bins, cell = genes[kept], bins[kept], cell[kept]
    lengths = np.minimum(counts, n_genes_max) + KEEP_FIRST_N_TOKENS
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    gene_ids = np.empty(offsets[-1], dtype=np.int64)
    token_values = np.empty(offsets[-1], dtype=np.float32)
    gene_ids[offsets[:-1]] = cls_token_id
    token_values[offsets[:-1]] = cls_value
    slot = offsets[cell] + KEEP_FIRST_N_TOKENS + position[kept]
    gene_ids[slot] = genes
    token_values[slot] = bins
    return {"gene_ids": gene_ids, "values": token_values, "offsets": offsets, "rows": rows,
            "empty_rows": np.flatnonzero(counts_all == 0)}


# --- the model ------------------------------------------------------------------------------------------


class GeneEncoder(nn.Module):
    """Gene token embedding followed by LayerNorm (official ``GeneEncoder``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(embedding_dim, eps=LAYER_NORM_EPS)

    def forward(self, gene_ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(gene_ids))


class ContinuousValueEncoder(nn.Module):
    """Expression value -> vector: clamp, Linear(1, d), ReLU, Linear(d, d), LayerNorm, dropout (official)."""

    def __init__(self, d_model: int, dropout: float = 0.1, max_value: float = MAX_VALUE) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.max_value = max_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        x = self.linear2(self.activation(self.linear1(x)))
        return self.dropout(self.norm(x))


class TransformerEncoder(nn.Module):
    """A stack of encoder layers with no final norm (official ``nn.TransformerEncoder(norm=None)``).

    Each layer is ``nn.TransformerEncoderLayer(batch_first=True)`` with ReLU and post-norm, written out once
    in `scdrugmap.models._layers` (scGPT, UCE and scFoundation run the same layer).
    """

    def __init__(self, config: ScGPTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(config.d_model, config.nhead, config.d_hid, config.dropout,
                                    layer_norm_eps=LAYER_NORM_EPS)
            for _ in range(config.nlayers))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the layers; ``key_padding_mask`` (batch, length) is True at pad positions, which no query attends."""
        attn_mask = None
        if key_padding_mask is not None and bool(key_padding_mask.any()):
            attn_mask = ~key_padding_mask[:, None, None, :]  # True = may attend
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x


class ScGPTModel(nn.Module):
    """The part of the official ``TransformerModel`` that ``_encode`` runs: gene + value embedding, encoder.

    Parameter names equal the official state-dict keys, except the attention input projection (see
    `convert_official_state_dict`).
    """

    def __init__(self, config: ScGPTConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = GeneEncoder(config.ntoken, config.d_model, padding_idx=config.pad_token_id)
        self.value_encoder = ContinuousValueEncoder(config.d_model, config.dropout)
        self.transformer_encoder = TransformerEncoder(config)

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor,
                src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return the last layer's hidden states, (batch x length x d_model)."""
        total = self.encoder(gene_ids) + self.value_encoder(values)
        return self.transformer_encoder(total, src_key_padding_mask)


# --- loading the official checkpoint --------------------------------------------------------------------

#: The one rename: each layer's fused attention input projection becomes q_proj/k_proj/v_proj (its rows
#: q | k | v, heads contiguous in each block). The published file stores it in flash-attn 1.x names
#: (``self_attn.Wqkv.{weight,bias}``); the official code's other layouts of the same tensor are accepted
#: too: ``self_attn.in_proj_{weight,bias}`` (nn.MultiheadAttention, non-flash saves) and
#: ``self_attn._impl.Wqkv.*`` (v0.2.5's flash wrapper, whose ``_impl.out_proj.*`` maps to ``out_proj.*``).
FUSED_QKV = re.compile(r"^(transformer_encoder\.layers\.\d+\.self_attn)\.(?:Wqkv\.|_impl\.Wqkv\.|in_proj_)(weight|bias)$")
OUT_PROJ_ALIAS = re.compile(r"^(transformer_encoder\.layers\.\d+\.self_attn)\._impl\.out_proj\.(weight|bias)$")
QKV_NAMES = ("q_proj", "k_proj", "v_proj")
#: Top-level modules of the pretraining model that the cell embedding never runs: their keys are listed
#: in one log line (``cls_decoder`` appears in fine-tuned saves; pretraining used n_cls=1 and built none).
UNUSED_MODULES = frozenset({"flag_encoder", "decoder", "mvc_decoder", "cls_decoder"})


def official_key(key: str) -> str:
    """Return the published (Wqkv) name of one of our parameter names."""
    for name in QKV_NAMES:
        key = key.replace(f".self_attn.{name}.", ".self_attn.Wqkv.")
    return key


def official_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Return the published key -> shape of ``module``'s parameters (works on the meta device)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key, tensor in module.state_dict().items():
        name = official_key(key)
        shape = tuple(tensor.shape)
        if name in shapes:  # q, k, v stacked along dim 0
            shape = (shapes[name][0] + shape[0], *shape[1:])
        shapes[name] = shape
    return shapes


def convert_official_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], *,
                                source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map an official scGPT state dict onto our parameter names, strictly.

    Parameters
    ----------
    state
        The official state dict (published Wqkv layout or one of its aliases, see `FUSED_QKV`).
    expected
        Our ``module.state_dict()`` key -> shape.
    source
        Where ``state`` came from, for messages.

    Returns
    -------
    The converted state dict (our names) and the official keys of parts we do not run (`UNUSED_MODULES`).

    Raises
    ------
    CheckpointError
        Listing every missing, unexpected, duplicated or mis-shaped key, in official names.
    """
    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    seen: set[str] = set()  # our names the checkpoint has, loadable or not
    unused, unexpected, duplicated, misshaped = [], [], [], []

    def put(name: str, tensor: torch.Tensor, official: str) -> None:
        seen.add(name)
        if name in converted:
            duplicated.append(f"{official} (and {origin[name]})")
        elif name not in expected:
            unexpected.append(official)
        elif tuple(tensor.shape) != tuple(expected[name]):
            misshaped.append(f"{official} {list(tensor.shape)} (model expects {list(expected[name])})")
        else:
            converted[name], origin[name] = tensor, official

    for key, tensor in state.items():
        if key.split(".", 1)[0] in UNUSED_MODULES:
            unused.append(key)
        elif match := FUSED_QKV.match(key):
            prefix, kind = match.groups()
            targets = [f"{prefix}.{name}.{kind}" for name in QKV_NAMES]
            if targets[0] not in expected:
                unexpected.append(key)
                continue
            want = expected[targets[0]]
            fused = (3 * want[0], *want[1:])
            if tuple(tensor.shape) != fused:
                seen.update(targets)
                misshaped.append(f"{key} {list(tensor.shape)} (model expects {list(fused)})")
                continue
            for name, part in zip(targets, tensor.chunk(3, dim=0), strict=True):
                put(name, part, key)
        elif match := OUT_PROJ_ALIAS.match(key):
            put(f"{match.group(1)}.out_proj.{match.group(2)}", tensor, key)
        else:
            put(key, tensor, key)
    missing = sorted({official_key(k) for k in expected if k not in seen})
    problems = [f"{label}: {', '.join(items)}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("duplicated", duplicated),
                 ("mis-shaped", misshaped)) if items]
    if problems:
        msg = (f"{source}: the checkpoint does not match the scGPT architecture of its args.json/vocab.json; "
               + "; ".join(problems) + ". Use the official model folder (best_model.pt, args.json and "
               "vocab.json of the same model) unchanged.")
        raise CheckpointError(msg)
    return converted, unused


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Load ``best_model.pt`` (a plain state dict) with ``weights_only=True``.

    Raises
    ------
    CheckpointError
        When the file is a web page (a Google Drive confirmation page saved instead of the file), not a
        torch file, or not a flat state dict of tensors.
    """
    with open(path, "rb") as handle:
        head = handle.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        msg = (f"{path}: this is a web page, not a checkpoint: Google Drive answered with its 'cannot scan this "
               "file for viruses' confirmation page. Download best_model.pt by hand from the scGPT_human "
               "folder (https://drive.google.com/drive/folders/1oWh_-ZRdhtoGQ2Fw24HP41FgLoomVo-y) or with "
               "`gdown`, and pass the folder with --weights.")
        raise CheckpointError(msg)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as err:
        msg = f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err}). Download it again."
        raise CheckpointError(msg) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        msg = f"{path}: expected a flat state dict of tensors (the official best_model.pt), found {type(state).__name__}."
        raise CheckpointError(msg)
    return dict(state)


def load_official_weights(module: ScGPTModel, checkpoint_path: Path) -> None:
    """Load the official checkpoint into ``module`` strictly; log the keys of parts we do not run."""
    state = read_checkpoint(checkpoint_path)
    expected = {k: v.shape for k, v in module.state_dict().items()}
    converted, unused = convert_official_state_dict(state, expected, source=str(checkpoint_path))
    if unused:
        log.info("%s: not loading %d keys of modules the cell embedding does not run: %s",
                 checkpoint_path, len(unused), ", ".join(unused))
    module.load_state_dict(converted, strict=True)


# --- the encoder ----------------------------------------------------------------------------------------

GOOGLE_DRIVE = "https://drive.usercontent.google.com/download?export=download&confirm=t&id="
#: The scGPT_human folder of the README's model zoo; file ids of its three files.
SCGPT_HUMAN = WeightsSource(
    name="scgpt-human",
    files=(
        RemoteFile(CHECKPOINT_FILE, GOOGLE_DRIVE + "14AebJfGOUF047Eg40hk57HCtrb0fyDTm"),
        RemoteFile(ARGS_FILE, GOOGLE_DRIVE + "1hh2zGKyWAx3DyovD30GStZ3QlzmSqdk1"),
        RemoteFile(VOCAB_FILE, GOOGLE_DRIVE + "1H3E_MJ-Dl36AQV6jLbna2EdvgPaqvqcC"),
    ),
    homepage="https://drive.google.com/drive/folders/1oWh_-ZRdhtoGQ2Fw24HP41FgLoomVo-y",
    license="MIT (bowang-lab/scGPT)",
)
OPTIONS = ("device", "normalize", "max_length", "sampling", "seed", "bin_ties", "gene_key", "autocast_dtype")


class ScGPTEncoder(TorchEncoder):
    """scGPT whole-human: binned expression tokens -> transformer -> ``<cls>`` embedding.

    Parameters
    ----------
    module
        The loaded `ScGPTModel`.
    vocab
        ``{gene symbol: id}`` incl. special tokens.
    normalize
        L2-normalise the ``<cls>`` vector (official ``embed_data``).
    max_length
        Longest sequence incl. ``<cls>`` (official default 1200).
    sampling
        Sample genes of longer cells at random (official) rather than keep the first ones.
    seed
        Seeds the numpy Generator for tie-breaking in binning and for sampling; each `tokenize` call
        starts afresh from it, so the same data gives the same tokens.
    bin_ties
        ``"random"`` (official) or ``"midpoint"`` (deterministic; see `bin_cells`).
    gene_key
        ``var`` column with gene symbols; default ``var["gene_symbol"]`` if present, else ``var_names``.
    autocast_dtype
        Run the model under ``torch.autocast`` in this dtype (the official GPU path uses float16);
        None runs in the weights' dtype (float32).
    """

    name: ClassVar[str] = "scgpt"
    family: ClassVar[Literal["scfm", "llm", "baseline"]] = "scfm"
    # embed_data bins each cell's nonzero values by rank: any non-negative expression gives the same tokens
    input_kind: ClassVar[Literal["counts", "nonnegative", "any"]] = "nonnegative"
    lora_targets: ClassVar[tuple[str, ...]] = ("out_proj",)
    weights_sources: ClassVar[Mapping[str, WeightsSource]] = {"scGPT_human": SCGPT_HUMAN}
    #: The official embedding runs under ``torch.cuda.amp.autocast`` (fp16) on GPU (golden README).
    gpu_autocast: ClassVar[str | None] = "float16"

    def __init__(self, module: ScGPTModel, vocab: Mapping[str, int], *, normalize: bool = True,
                 max_length: int = MAX_LENGTH, sampling: bool = True, seed: int = 0, bin_ties: BinTies = "random",
                 gene_key: str | None = None, autocast_dtype: torch.dtype | str | None = None) -> None:
        if bin_ties not in ("random", "midpoint"):
            msg = f"bin_ties={bin_ties!r}; expected 'random' (official) or 'midpoint'."
            raise ConfigError(msg)
        if max_length <= KEEP_FIRST_N_TOKENS:
            msg = f"max_length={max_length}; it counts <cls>, so it must be at least {KEEP_FIRST_N_TOKENS + 1}."
            raise ConfigError(msg)
        self.module = module
        self.config = module.config
        self.vocab = dict(vocab)
        self.normalize = normalize
        self.max_length = int(max_length)
        self.sampling = sampling
        self.seed = seed
        self.bin_ties = bin_ties
        self.gene_key = gene_key
        self.autocast_dtype = getattr(torch, autocast_dtype) if isinstance(autocast_dtype, str) else autocast_dtype

    @property
    def embedding_dim(self) -> int:
        return self.config.d_model

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path | None = None, **options: Any) -> ScGPTEncoder:
        """Load an official scGPT model folder (``best_model.pt``, ``args.json``, ``vocab.json``).

        ``path_or_name`` is that folder, its ``best_model.pt``, a variant name of `weights_sources`, or
        None for the cache / a download of scGPT_human. ``options`` are ``device`` and the keyword
        arguments of the class.

        Raises
        ------
        WeightsNotFoundError
            When the weights are neither there nor downloadable.
        CheckpointError
            When a file is unreadable or the checkpoint does not match its args.json (keys named).
        """
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            msg = f"scgpt: unknown options {unknown}; allowed: {', '.join(OPTIONS)}."
            raise ConfigError(msg)
        device = options.pop("device", "cpu")
        if path_or_name is not None and str(path_or_name) in cls.weights_sources:
            folder = resolve_weights(cls.weights_sources[str(path_or_name)])
        else:
            folder = resolve_weights(SCGPT_HUMAN, path_or_name)
        checkpoint_path = folder if folder.is_file() else folder / CHECKPOINT_FILE
        model_dir = checkpoint_path.parent
        for needed in (checkpoint_path, model_dir / ARGS_FILE, model_dir / VOCAB_FILE):
            if not needed.exists():
                msg = (f"{needed}: missing; an official scGPT model folder holds {CHECKPOINT_FILE}, {ARGS_FILE} "
                       f"and {VOCAB_FILE}.")
                raise CheckpointError(msg)
        vocab = load_vocab(model_dir / VOCAB_FILE)
        config = ScGPTConfig.from_official(model_dir, vocab)
        module = ScGPTModel(config)
        load_official_weights(module, checkpoint_path)
        module.to(device).eval()
        encoder = cls(module, vocab, **options)
        encoder.checkpoint_sha256 = sha256_file(checkpoint_path)
        log.info("loaded scGPT from %s (d_model=%d, %d layers, %d genes)", checkpoint_path, config.d_model,
                 config.nlayers, len(vocab) - len(SPECIAL_TOKENS))
        return encoder

    def gene_names(self, adata: ad.AnnData) -> np.ndarray:
        """Return the gene symbols scGPT looks up: ``var[gene_key]``, ``var["gene_symbol"]`` or ``var_names``."""
        if self.gene_key is not None:
            if self.gene_key not in adata.var:
                msg = (f"var has no column {self.gene_key!r} (gene_key); columns: {list(adata.var.columns)}. "
                       "Pass the column with HGNC gene symbols.")
                raise SchemaError(msg)
            return adata.var[self.gene_key].astype(str).to_numpy()
        if "gene_symbol" in adata.var:
            return adata.var["gene_symbol"].astype(str).to_numpy()
        return adata.var_names.astype(str).to_numpy()

    def tokenize(self, adata: ad.AnnData, *, layer: str | None = None) -> TokenizedCells:
        """Bin and tokenize every cell as ``embed_data`` does (see `tokenize_matrix`).

        Returns
        -------
        `TokenizedCells` with flat ``gene_ids`` (int64) and ``values`` (float32) and their ``offsets``;
        cells with no nonzero in-vocabulary gene are dropped (the official code crashes on them).

        Raises
        ------
        SchemaError
            When no gene is in the scGPT vocabulary.
        """
        import pandas as pd

        names = self.gene_names(adata)
        ids = pd.Series(names).map(self.vocab).fillna(-1).to_numpy(dtype=np.int64)
        n_matched = int((ids >= 0).sum())
        if n_matched == 0:
            msg = (f"none of the {names.size} genes (e.g. {list(names[:3])}) is in the scGPT vocabulary of "
                   f"{len(self.vocab)} HGNC symbols. Map gene ids to symbols (var['gene_symbol']) or pass gene_key.")
            raise SchemaError(msg)
        log.info("scgpt: %d of %d genes are in the vocabulary", n_matched, names.size)
        matrix = expression_matrix(adata, layer)
        X = matrix if sp.issparse(matrix) else sp.csr_matrix(np.asarray(matrix))
        out = tokenize_matrix(sp.csr_matrix(X), ids, cls_token_id=self.config.cls_token_id,
                              cls_value=self.config.pad_value, max_length=self.max_length, sampling=self.sampling,
                              ties=self.bin_ties, rng=np.random.default_rng(self.seed))
        reason = "no nonzero expression in a gene of the scGPT vocabulary"
        return TokenizedCells(
            cell_index=out["rows"].astype(np.int64), lengths=np.diff(out["offsets"]),
            arrays={k: out[k] for k in ("gene_ids", "values", "offsets")},
            dropped={int(row): reason for row in out["empty_rows"]}, n_genes_matched=n_matched,
            gene_known=ids >= 0)

    def collate(self, tokens: TokenizedCells, rows: npt.NDArray[np.int64]) -> dict[str, torch.Tensor]:
        """Pad the chosen cells to the longest of them with ``<pad>`` / ``pad_value`` (official collator)."""
        rows = np.asarray(rows, dtype=np.int64)
        offsets = tokens.arrays["offsets"]
        starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
        position = np.arange(int(lengths.max()))
        real = position[None, :] < lengths[:, None]
        index = np.where(real, starts[:, None] + position[None, :], 0)
        gene_ids = np.where(real, tokens.arrays["gene_ids"][index], self.config.pad_token_id)
        values = np.where(real, tokens.arrays["values"][index], np.float32(self.config.pad_value))
        gene_ids_t = torch.from_numpy(gene_ids.astype(np.int64))
        return {"gene_ids": gene_ids_t, "values": torch.from_numpy(values.astype(np.float32)),
                "src_key_padding_mask": gene_ids_t.eq(self.config.pad_token_id)}

    def encode(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return the last layer's ``<cls>`` vectors, L2-normalised unless ``normalize=False``."""
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                hidden = self.module(batch["gene_ids"], batch["values"], batch["src_key_padding_mask"])
            hidden = hidden.float()
        else:
            hidden = self.module(batch["gene_ids"], batch["values"], batch["src_key_padding_mask"])
        cell = hidden[:, 0, :]
        if self.normalize:
            cell = cell / torch.linalg.vector_norm(cell, dim=1, keepdim=True)
        return cell

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts.update(max_length=self.max_length, bin_ties=self.bin_ties, normalize=self.normalize, seed=self.seed)
        return facts
