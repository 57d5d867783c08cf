"""CellPLM: a cell language model whose tokens are cells, read with its official embedding pipeline.

Paper: Wen et al., "CellPLM: Pre-training of Cell Language Model Beyond Single Cells", ICLR 2024
(bioRxiv 10.1101/2023.10.03.560734). Official code: GitHub ``OmicsML/CellPLM`` at commit
``b59ee7688b1bd2a745856a610248b46f15019a22`` (the PyPI wheel ``cellplm==0.1.0.post2`` has the same sources);
the published checkpoint is ``20230926_85M`` (``.config.json`` + ``.best.ckpt``).

Input: raw counts. The official ``CellEmbeddingPipeline`` keeps the genes of the model's gene list (Ensembl ids,
in the data's own column order), does **no** library-size normalisation and no HVG selection, and feeds
``log1p(counts)`` to a gene-embedding matrix: one vector per cell, ``sum_g log1p(x_g) * emb[g]``.

Cells attend to cells: the Flowformer encoder (linear "flow" attention, Wu et al. 2022) runs over the
cells of one forward pass as its sequence. Cells are grouped by ``obs["batch"]`` (sorted labels) when that
column exists, and each group is cut into consecutive chunks of ``batch_size`` cells (0, the official default,
means the whole group in one pass). A cell's embedding therefore depends on the other cells of its chunk;
`CellPLMEncoder.embed` reproduces this batching exactly.

Pooling: none is needed, each token is a cell. The embedding is the mean ``mu`` of the GMVAE latent layer,
``mu = Linear(ReLU(Linear(cat[h, y])))`` with ``y`` a one-hot cluster indicator. Official quirk: at inference
``y`` is a **hard Gumbel-softmax sample**, ``one_hot(argmax(logits + gumbel_noise))``, drawn afresh on every
forward pass, so the official embedding is random. By default we draw that noise from a generator seeded with
42 (the official tutorials call ``set_seed(42)`` before ``predict``) and replay the official random stream
exactly, so our output equals the official pipeline's after ``torch.manual_seed(42)``. ``latent_sampling=
"argmax"`` is a documented deterministic, non-official mode with ``y = one_hot(argmax(logits))``.

Weights: OmicsML publishes the checkpoint in a Dropbox folder (no checksum); the config is also in the
GitHub repository. See `CellPLMEncoder.weights_sources`.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from scdrugmap.data.schema import expression_matrix
from scdrugmap.errors import CheckpointError, ConfigError, SchemaError
from scdrugmap.models.base import Progress, TokenizedCells, TorchEncoder
from scdrugmap.models.weights import RemoteFile, WeightsSource, resolve_weights, sha256_file

if TYPE_CHECKING:
    from collections.abc import Iterator

    import anndata as ad
    import numpy.typing as npt

log = logging.getLogger(__name__)

LatentSampling = Literal["gumbel", "argmax"]

# --- constants of the official code (CellPLM @ b59ee76) -------------------------------------------------------

#: Heads of every Flowformer layer: `OmicsFormer(enc_head=8)` default; the config does not set it (model/cellformer.py).
DEFAULT_ENC_HEAD = 8
#: Positional encoder type: `OmicsFormer(pe_type='sin')` default (model/cellformer.py). Built but never applied.
DEFAULT_PE_TYPE = "sin"
#: Grid of the sinusoidal 2-D PE table: `Sinusoidal2dPE(height=100, width=100)` (utils/pe.py).
PE_HEIGHT = PE_WIDTH = 100
#: Groups of `create_norm("groupnorm", n)`: `nn.GroupNorm(4, n)` (utils/__init__.py).
GROUPNORM_GROUPS = 4
#: `Flow_Attention(drop_out=0.01, eps=1e-6)` defaults, never overridden by `FlowformerLayer` (layer/flowformer.py).
FLOW_ATTENTION_DROPOUT = 0.01
FLOW_ATTENTION_EPS = 1e-6
#: Hidden width of q(z|x,y): `nn.Linear(x_dim + y_dim, 512)` hard-coded in `InferenceNet` (latent/autoencoders.py).
GMVAE_HIDDEN = 512
#: `GumbelSoftmax.sample_gumbel(eps=1e-20)` and `GMVAELatentLayer.forward(temperature=1.0)` (latent/autoencoders.py).
GUMBEL_EPS = 1e-20
GUMBEL_TEMPERATURE = 1.0
#: `Gaussian.reparameterize`: `std = sqrt(var + 1e-10)` (latent/autoencoders.py).
GAUSSIAN_VAR_EPS = 1e-10
#: The official tutorials call `set_seed(42)` once before `pipeline.predict` (tutorials/cell_embedding.ipynb).
DEFAULT_SEED = 42
#: obs column the official `TranscriptomicDataset` groups cells by (utils/data.py).
OFFICIAL_GROUP_KEY = "batch"
#: Checkpoint files: `{prefix}.config.json` and `{prefix}.best.ckpt` (pipeline/__init__.py `load_pretrain`).
CONFIG_SUFFIX = ".config.json"
CHECKPOINT_SUFFIX = ".best.ckpt"
#: The only top-level key `load_pretrain` reads from the `.best.ckpt` dict.
STATE_DICT_KEY = "model_state_dict"
#: State-dict prefix of the pretraining NB decoder: present in the `.best.ckpt`, dropped by the embedding pipeline.
PRETRAINING_ONLY_PREFIXES = ("decoder.",)

# What this module implements of `OmicsFormer(**config)`; the published 20230926_85M config uses exactly these.
SUPPORTED_SETTINGS: dict[str, tuple[Any, ...]] = {
    "enc_mod": ("flowformer",),
    "latent_mod": ("gmvae",),
    "pe_type": ("sin", "sinu", "sinusoidal"),
    "cat_pe": (False,),
    "input_covariate": (False,),
    "dsbn": (False,),
    "dar": (False,),
    "ecs": (False,),
    "mask_type": ("input",),
}


# --- config ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellPLMConfig:
    """Architecture of `OmicsFormer` as the embedding pipeline builds it; defaults are the published 20230926_85M.

    Only the fields that shape the embedding path and the state dict are kept; training-only fields of the
    official config (``lr``, ``epochs``, ``mask_*`` rates, ...) are ignored, as ``OmicsFormer`` ignores them
    at inference. ``gene_list`` is the model's vocabulary (19,374 Ensembl ids, sorted) and is read from the
    official ``.config.json``; the default is empty.
    """

    name: str = "20230926_75M_50M"
    enc_mod: str = "flowformer"
    enc_hid: int = 1024
    enc_layers: int = 4
    enc_head: int = DEFAULT_ENC_HEAD
    latent_mod: str = "gmvae"
    post_latent_dim: int = 512
    num_clusters: int = 16
    dec_mod: str = "nbmlp"
    dec_hid: int = 1024
    dec_layers: int = 2
    out_dim: int = 19374
    model_dropout: float = 0.2
    norm: str = "groupnorm"
    pe_type: str = DEFAULT_PE_TYPE
    cat_pe: bool = False
    mask_type: str = "input"
    input_covariate: bool = False
    dsbn: bool = False
    dar: bool = False
    ecs: bool = False
    batch_num: int = 12596
    dataset_num: int = 484
    gene_list: tuple[str, ...] = ()

    @classmethod
    def from_official(cls, path: str | Path) -> CellPLMConfig:
        """Read an official ``{prefix}.config.json``.

        Raises
        ------
        CheckpointError
            When the file is not valid JSON, lacks ``gene_list``, or asks for an architecture this module does
            not implement (the published checkpoint needs none of those).
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            msg = f"{path}: cannot read the CellPLM config ({err}). Expected the official {{prefix}}{CONFIG_SUFFIX}."
            raise CheckpointError(msg) from err
        if not isinstance(raw, dict) or not isinstance(raw.get("gene_list"), list) or not raw["gene_list"]:
            msg = f"{path}: the CellPLM config has no 'gene_list'; re-download the official {CONFIG_SUFFIX}."
            raise CheckpointError(msg)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values["gene_list"] = tuple(str(g) for g in raw["gene_list"])
        config = cls(**values)
        config.check_supported(source=str(path))
        return config

    def check_supported(self, *, source: str = "config") -> None:
        """Raise `CheckpointError` for settings of `OmicsFormer` this module does not implement."""
        bad = {k: getattr(self, k) for k, allowed in SUPPORTED_SETTINGS.items() if getattr(self, k) not in allowed}
        if self.enc_hid % self.enc_head or self.enc_hid % GROUPNORM_GROUPS or self.enc_hid % 4:
            bad["enc_hid"] = self.enc_hid
        if bad:
            allowed = {k: SUPPORTED_SETTINGS.get(k, "a multiple of 4 and of enc_head") for k in bad}
            msg = (f"{source}: CellPLM settings {bad} are not implemented here (supported: {allowed}); "
                   "the published 20230926_85M checkpoint uses the supported ones.")
            raise CheckpointError(msg)

    @property
    def head_dim(self) -> int:
        return self.enc_hid // self.enc_head


# --- tokenizer ------------------------------------------------------------------------------------------------


def align_genes(var_names: npt.ArrayLike, gene_list: tuple[str, ...] | list[str]) -> npt.NDArray[np.int64]:
    """Return, for each data column, its row in the model's gene list, or -1 when the gene is not in it.

    Official `Pipeline.common_preprocess`: keep the columns whose name is in ``gene_list``, in the data's
    own column order; vocabulary genes absent from the data contribute nothing.
    """
    import pandas as pd

    vocab = pd.Index(list(gene_list))
    return np.asarray(vocab.get_indexer(pd.Index(np.asarray(var_names, dtype=object))), dtype=np.int64)


def _gene_ids_of(adata: ad.AnnData, gene_list: tuple[str, ...]) -> npt.NDArray[np.int64]:
    """Map the columns of ``adata`` to vocabulary rows from var_names, else from ``var['ensembl_id']``.

    The official pipeline converts gene symbols to Ensembl ids with mygene (online) only when no var_name
    is in the gene list. Offline, the harmonised ``var['ensembl_id']`` column plays that role; like the
    official ``var_names_make_unique`` after conversion, only the first column of a repeated id is kept.
    """
    gene_ids = align_genes(adata.var_names, gene_list)
    if (gene_ids >= 0).any():
        return gene_ids
    if "ensembl_id" in adata.var.columns:
        ensembl = adata.var["ensembl_id"].astype(object).to_numpy()
        gene_ids = align_genes(ensembl, gene_list)
        _, first = np.unique(ensembl.astype(str), return_index=True)
        repeated = np.ones(gene_ids.size, dtype=bool)
        repeated[first] = False
        gene_ids[repeated] = -1
        if (gene_ids >= 0).any():
            return gene_ids
    shown = ", ".join(map(str, adata.var_names[:3]))
    msg = (f"none of the {adata.n_vars} genes ({shown}, ...) is in CellPLM's gene list of {len(gene_list)} "
           "Ensembl ids (e.g. ENSG00000000003), and var has no matching 'ensembl_id' column. "
           "Harmonise the gene ids first (scdrugmap.data.genes) so that var['ensembl_id'] exists.")
    raise SchemaError(msg)


def _group_codes(adata: ad.AnnData, group_key: str | None) -> npt.NDArray[np.int64]:
    """Return the official group of each cell: sorted labels of ``obs[group_key]`` (LabelEncoder order)."""
    if group_key is None or group_key not in adata.obs.columns:
        return np.zeros(adata.n_obs, dtype=np.int64)
    values = adata.obs[group_key]
    if values.isna().any():
        rows = np.flatnonzero(values.isna().to_numpy())[:3].tolist()
        msg = (f"obs[{group_key!r}] has missing values (rows {rows}); CellPLM groups cells by this column. "
               "Fill them, or pass group_key=None to put all cells in one group.")
        raise SchemaError(msg)
    try:
        _, codes = np.unique(np.asarray(values), return_inverse=True)
    except TypeError as err:
        msg = f"obs[{group_key!r}] mixes value types ({err}); make it one type (e.g. str) to group cells by it."
        raise SchemaError(msg) from err
    return codes.astype(np.int64).ravel()


def tokenize_counts(
    adata: ad.AnnData, gene_list: tuple[str, ...], *, layer: str | None = None, group_key: str | None = OFFICIAL_GROUP_KEY
) -> TokenizedCells:
    """Return the official CellPLM inputs of every cell, vectorised.

    Returns
    -------
    TokenizedCells with ``arrays``: ``offsets`` (n_cells + 1, int64, CSR row pointer), ``gene_ids`` (int64, vocab
    row of each non-zero, data column order within a cell), ``counts`` (float32 raw counts) and ``group``
    (int64 group code per cell); ``lengths`` are the non-zero genes per cell. No cell is dropped: a cell with
    no vocabulary gene gets the embedding of an all-zero profile, as officially.
    """
    gene_ids = _gene_ids_of(adata, gene_list)
    keep = np.flatnonzero(gene_ids >= 0)
    X = expression_matrix(adata, layer)
    # official: csr_matrix(X.astype(float)) -> torch sparse -> .float().coalesce() (duplicates summed first)
    matrix = sp.csr_matrix(X[:, keep] if sp.issparse(X) else np.asarray(X)[:, keep], dtype=np.float32)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    offsets = matrix.indptr.astype(np.int64)
    return TokenizedCells(
        cell_index=np.arange(adata.n_obs, dtype=np.int64),
        lengths=np.diff(offsets),
        arrays={
            "offsets": offsets,
            "gene_ids": gene_ids[keep][matrix.indices].astype(np.int64),
            "counts": matrix.data.astype(np.float32),
            "group": _group_codes(adata, group_key),
        },
        n_genes_matched=int(keep.size),
        gene_known=gene_ids >= 0,
    )


def official_chunks(group: npt.NDArray[np.int64], cells_per_pass: int) -> list[npt.NDArray[np.int64]]:
    """Return the official forward passes: per group (sorted), consecutive chunks of ``cells_per_pass`` cells.

    ``cells_per_pass <= 0`` puts a whole group in one pass (the official default ``batch_size=0``).
    """
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    chunks: list[np.ndarray] = []
    for rows in np.split(order, bounds):
        if rows.size == 0:
            continue
        step = rows.size if cells_per_pass <= 0 else cells_per_pass
        chunks.extend(rows[i : i + step] for i in range(0, rows.size, step))
    return chunks


# --- modules (parameter names = official state-dict keys) ----------------------------------------------------


class Sinusoidal2dPE(nn.Module):
    """The official 2-D sinusoidal PE: built and saved, never applied in the embedding path (``pe = 0.``)."""

    def __init__(self, d_model: int, height: int = PE_HEIGHT, width: int = PE_WIDTH) -> None:
        super().__init__()
        self.missing_pe = nn.Parameter(torch.randn(d_model) * 1e-2)
        pe = torch.zeros(d_model, height, width)
        half = d_model // 2
        div_term = torch.exp(torch.arange(0.0, half, 2) * -(math.log(10000.0) / half))
        pos_w = torch.arange(0.0, width).unsqueeze(1)
        pos_h = torch.arange(0.0, height).unsqueeze(1)
        pe[0:half:2] = torch.sin(pos_w * div_term).T.unsqueeze(1).expand(-1, height, -1)
        pe[1:half:2] = torch.cos(pos_w * div_term).T.unsqueeze(1).expand(-1, height, -1)
        pe[half::2] = torch.sin(pos_h * div_term).T.unsqueeze(2).expand(-1, -1, width)
        pe[half + 1 :: 2] = torch.cos(pos_h * div_term).T.unsqueeze(2).expand(-1, -1, width)
        self.pe_enc = nn.Embedding.from_pretrained(pe.flatten(1).T)


class OmicsEmbedder(nn.Module):
    """Gene embedding matrix: ``h = log1p(x) @ emb[genes]`` (official `OmicsEmbedder`, no bias)."""

    def __init__(self, n_genes: int, num_hid: int) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.randn(n_genes, num_hid) * 0.005)

    def forward(self, gene_ids: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # Sum over a cell's non-zeros of log1p(count) * emb[gene]: the official torch.sparse.mm, done as a
        # weighted embedding bag (differentiable in emb, handles repeated genes as separate columns).
        return F.embedding_bag(gene_ids, self.emb, offsets, mode="sum", per_sample_weights=torch.log1p(counts))


class OmicsEmbeddingLayer(nn.Module):
    """Official `OmicsEmbeddingLayer`: gene embedding, (+ PE = 0), Linear -> ReLU -> Dropout -> GroupNorm."""

    def __init__(self, config: CellPLMConfig) -> None:
        super().__init__()
        hidden = config.enc_hid
        self.norm0 = nn.GroupNorm(GROUPNORM_GROUPS, hidden)  # unused officially (commented out), but saved
        self.extra_linear = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(config.model_dropout),
            nn.GroupNorm(GROUPNORM_GROUPS, hidden),
        )
        self.pe_enc = Sinusoidal2dPE(hidden)
        self.feat_enc = OmicsEmbedder(len(config.gene_list) or config.out_dim, hidden)

    def forward(self, gene_ids: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        h = self.feat_enc(gene_ids, counts, offsets)
        # official: `pe = 0.  # self.pe_enc(pe_input)`; with cat_pe=False, h + 0.
        return self.extra_linear(h)


class FlowAttention(nn.Module):
    """Flow attention of Flowformer (Wu et al. 2022), as `Flow_Attention` in CellPLM: linear in sequence length.

    Not softmax attention, so it cannot use ``scaled_dot_product_attention``; the projections are explicit
    ``nn.Linear`` modules (LoRA targets), and the operations follow the official order term for term.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = FLOW_ATTENTION_DROPOUT,
                 eps: float = FLOW_ATTENTION_EPS) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.query_projection = nn.Linear(d_model, d_model)
        self.key_projection = nn.Linear(d_model, d_model)
        self.value_projection = nn.Linear(d_model, d_model)
        self.out_projection = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over axis 1 of ``x`` (batch, sequence, d_model); in CellPLM the sequence is the cells."""
        batch, length, _ = x.shape
        q = self.query_projection(x).view(batch, length, self.n_heads, -1).transpose(1, 2)
        k = self.key_projection(x).view(batch, length, self.n_heads, -1).transpose(1, 2)
        v = self.value_projection(x).view(batch, length, self.n_heads, -1).transpose(1, 2)
        q, k = torch.sigmoid(q), torch.sigmoid(k)  # non-negative feature map
        eps = self.eps
        # incoming / outgoing flow
        sink_incoming = 1.0 / torch.einsum("nhld,nhd->nhl", q + eps, k.sum(dim=2) + eps)
        source_outgoing = 1.0 / torch.einsum("nhld,nhd->nhl", k + eps, q.sum(dim=2) + eps)
        # conservation refinement
        conserved_sink = torch.einsum("nhld,nhd->nhl", q + eps, (k * source_outgoing[..., None]).sum(dim=2) + eps)
        conserved_source = torch.einsum("nhld,nhd->nhl", k + eps, (q * sink_incoming[..., None]).sum(dim=2) + eps)
        conserved_source = torch.clamp(conserved_source, min=-1.0, max=1.0)
        # competition and allocation (queries and keys have the same length here: L / S = 1)
        sink_allocation = torch.sigmoid(conserved_sink * (float(q.shape[2]) / float(k.shape[2])))
        source_competition = torch.softmax(conserved_source, dim=-1) * float(k.shape[2])
        kv = torch.einsum("nhld,nhlm->nhdm", k, v * source_competition[..., None])
        out = torch.einsum("nhld,nhdm->nhlm", q * sink_incoming[..., None], kv)
        out = (out * sink_allocation[..., None]).transpose(1, 2).reshape(batch, length, -1)
        return self.dropout(self.out_projection(out))


class FlowformerLayer(nn.Module):
    """Official `FlowformerLayer` (pre-LN): ``x += attn(LN1 x)``; ``x += FF(LN2 x)``; LayerNorm and GELU fixed."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = FlowAttention(embed_dim, num_heads)
        self._ff_block = nn.Sequential(
            nn.Linear(embed_dim, embed_dim * 2), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(embed_dim * 2, embed_dim), nn.Dropout(dropout),
        )
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run one layer over the cells ``x`` (cells x hidden) of one forward pass."""
        x = x + self.dropout1(self.self_attn(self.norm1(x).unsqueeze(0)))[0]
        return x + self._ff_block(self.norm2(x))


class TransformerEncoder(nn.Module):
    """Official `TransformerEncoder` with ``enc_layers`` Flowformer layers."""

    def __init__(self, config: CellPLMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            FlowformerLayer(config.enc_hid, config.enc_head, config.model_dropout) for _ in range(config.enc_layers)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return h


class GumbelSoftmax(nn.Module):
    """q(y|x) logits of the GMVAE (official `GumbelSoftmax`; the sampling is in `GMVAELatentLayer`)."""

    def __init__(self, f_dim: int, c_dim: int) -> None:
        super().__init__()
        self.logits = nn.Linear(f_dim, c_dim)
        self.c_dim = c_dim


class Gaussian(nn.Module):
    """Mean and variance heads of q(z|x,y) (official `Gaussian`)."""

    def __init__(self, in_dim: int, z_dim: int) -> None:
        super().__init__()
        self.mu = nn.Linear(in_dim, z_dim)
        self.var = nn.Linear(in_dim, z_dim)


class InferenceNet(nn.Module):
    """Official GMVAE `InferenceNet`; ``y_mu``/``y_var`` (the prior p(z|y)) only feed the pretraining loss."""

    def __init__(self, x_dim: int, z_dim: int, y_dim: int) -> None:
        super().__init__()
        self.inference_qyx = nn.ModuleList([GumbelSoftmax(x_dim, y_dim)])
        self.inference_qzyx = nn.ModuleList([nn.Linear(x_dim + y_dim, GMVAE_HIDDEN), nn.ReLU(),
                                             Gaussian(GMVAE_HIDDEN, z_dim)])
        self.y_mu = nn.Linear(y_dim, z_dim)
        self.y_var = nn.Linear(y_dim, z_dim)


def _draw(kind: Literal["rand", "randn"], shape: tuple[int, ...], like: torch.Tensor,
          generator: torch.Generator | None) -> torch.Tensor:
    """Draw noise as ``torch.rand_like``/``randn_like`` do, from ``generator`` (or the global RNG when None)."""
    fn = torch.rand if kind == "rand" else torch.randn
    return fn(shape, generator=generator, device=like.device, dtype=like.dtype)


class GMVAELatentLayer(nn.Module):
    """Official `GMVAELatentLayer`, inference network only (its loss is a pretraining objective).

    ``sampling="gumbel"`` (official): in eval mode, ``y`` is a hard Gumbel-softmax sample in straight-through
    form and the output is the mean ``mu``; in train mode, ``y`` is the soft Gumbel-softmax sample and the
    output the reparameterised ``z``. Each pass draws ``rand(n, C)`` then ``randn(n, latent)`` (the second is
    unused at eval but drawn, as officially, so the random stream of later passes matches).
    ``sampling="argmax"`` (not official, deterministic): ``y = one_hot(argmax(logits))``, output ``mu``, no draws.
    """

    def __init__(self, config: CellPLMConfig) -> None:
        super().__init__()
        self.num_clusters = config.num_clusters
        self.inference = InferenceNet(config.enc_hid, config.post_latent_dim, config.num_clusters)

    def categorical(self, logits: torch.Tensor, *, sampling: LatentSampling,
                    generator: torch.Generator | None) -> torch.Tensor:
        """Return the cluster indicator ``y`` (cells x clusters)."""
        if sampling == "argmax":
            return F.one_hot(logits.argmax(dim=-1), self.num_clusters).to(logits.dtype)
        uniform = _draw("rand", tuple(logits.shape), logits, generator)
        gumbel = -torch.log(-torch.log(uniform + GUMBEL_EPS) + GUMBEL_EPS)
        soft = F.softmax((logits + gumbel) / GUMBEL_TEMPERATURE, dim=-1)
        if self.training:  # official training branch: hard=False
            return soft
        hard = F.one_hot(soft.argmax(dim=-1), self.num_clusters).to(soft.dtype)
        return (hard - soft).detach() + soft

    def forward(self, h: torch.Tensor, *, sampling: LatentSampling = "gumbel",
                generator: torch.Generator | None = None, categorical: torch.Tensor | None = None) -> torch.Tensor:
        """Return the cell embeddings; ``categorical`` replaces the drawn ``y`` (to replay recorded draws).

        Under autocast (bfloat16) this layer still runs in float32: its noise is drawn in the logits' dtype,
        and only float32 draws follow the official random stream.
        """
        if torch.is_autocast_enabled(h.device.type):
            with torch.autocast(h.device.type, enabled=False):
                return self.forward(h.float(), sampling=sampling, generator=generator, categorical=categorical)
        net = self.inference
        logits = cast(GumbelSoftmax, net.inference_qyx[0]).logits(h).view(-1, self.num_clusters)
        y = self.categorical(logits, sampling=sampling, generator=generator) if categorical is None else categorical
        hidden = net.inference_qzyx[1](net.inference_qzyx[0](torch.cat((h, y), dim=1)))
        gaussian = cast(Gaussian, net.inference_qzyx[2])
        mu = gaussian.mu(hidden)
        if sampling == "argmax":
            return mu
        noise = _draw("randn", tuple(mu.shape), mu, generator)
        if not self.training:
            return mu
        var = F.softplus(gaussian.var(hidden))
        return mu + noise * torch.sqrt(var + GAUSSIAN_VAR_EPS)


class LatentModel(nn.Module):
    """Official `LatentModel`: ``layers[0]`` is a parameter-free placeholder, ``layers[1]`` the GMVAE layer."""

    def __init__(self, config: CellPLMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Identity(), GMVAELatentLayer(config)])

    def forward(self, h: torch.Tensor, **options: Any) -> torch.Tensor:
        return self.layers[1](self.layers[0](h), **options)


class PreLatentNorm(nn.Module):
    """Official `PreLatentNorm('ln')`: a LayerNorm before the latent layer."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


class CellPLMModel(nn.Module):
    """`OmicsFormer` with ``head_type='embedder'``: embedder -> Flowformer over cells -> LayerNorm -> GMVAE mean.

    The pretraining pieces (input masking, node dropping, NB decoder, objectives) are not built: they act
    only in pretraining (``MaskBuilder`` is inert in eval) and the embedding pipeline drops the decoder.
    """

    def __init__(self, config: CellPLMConfig) -> None:
        super().__init__()
        config.check_supported()
        self.config = config
        self.embedder = OmicsEmbeddingLayer(config)
        self.encoder = TransformerEncoder(config)
        self.latent = LatentModel(config)
        self.pre_latent_norm = PreLatentNorm(config.enc_hid)

    def forward(self, gene_ids: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor, *,
                sampling: LatentSampling = "gumbel", generator: torch.Generator | None = None,
                categorical: torch.Tensor | None = None) -> torch.Tensor:
        """Embed the cells of one forward pass (they attend to each other); return (cells x post_latent_dim)."""
        h = self.embedder(gene_ids, counts, offsets)
        h = self.pre_latent_norm(self.encoder(h))
        return self.latent(h, sampling=sampling, generator=generator, categorical=categorical)


# --- loader ---------------------------------------------------------------------------------------------------


class _OpaqueObject:
    """Inert stand-in for a non-allowlisted class found in a checkpoint: stores its arguments, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _OpaqueObject:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Return the ``model_state_dict`` of an official ``.best.ckpt``, read with ``weights_only=True``.

    The official loader reads only ``torch.load(path)['model_state_dict']``. The container is read with
    torch's weights-only unpickler, which rebuilds tensors and plain containers and calls no other code.
    Should the container hold other top-level objects (e.g. a training-time ``argparse.Namespace``, which
    the weights-only unpickler refuses), each such class is allowlisted *as an inert stand-in*
    (`_OpaqueObject`, which only stores its arguments): nothing from the file is imported or executed, and
    those entries are discarded. The state dict itself must hold tensors only.

    Raises
    ------
    CheckpointError
        When the file is missing, truncated or corrupted, is not a dict with ``model_state_dict``, or the
        state dict holds non-tensors.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: CellPLM checkpoint not found; expected the official {{prefix}}{CHECKPOINT_SUFFIX}."
        raise CheckpointError(msg)
    hint = "The file is truncated or corrupted; delete it and download it again."
    try:
        try:
            container = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            if not unsafe:
                raise
            log.warning("%s: replacing non-tensor objects %s with inert stand-ins; they are not used.", path, unsafe)
            stubs: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
                (type(name.rsplit(".", 1)[-1], (_OpaqueObject,), {}), name) for name in unsafe]
            with torch.serialization.safe_globals(stubs):
                container = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as err:
        msg = f"{path}: cannot read the CellPLM checkpoint ({type(err).__name__}: {str(err)[:300]}). {hint}"
        raise CheckpointError(msg) from err
    if not isinstance(container, Mapping) or STATE_DICT_KEY not in container:
        found = sorted(container)[:5] if isinstance(container, Mapping) else type(container).__name__
        msg = (f"{path}: expected a dict with {STATE_DICT_KEY!r} (the official CellPLM container), found {found}. "
               f"Pass the official {{prefix}}{CHECKPOINT_SUFFIX}.")
        raise CheckpointError(msg)
    others = sorted(str(k) for k in container if k != STATE_DICT_KEY)
    if others:
        log.info("%s: ignoring top-level entries %s (the official loader reads only %r)", path, others, STATE_DICT_KEY)
    state = container[STATE_DICT_KEY]
    if not isinstance(state, Mapping):
        msg = f"{path}: {STATE_DICT_KEY!r} is a {type(state).__name__}, expected a dict of tensors. {hint}"
        raise CheckpointError(msg)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        msg = f"{path}: {STATE_DICT_KEY!r} holds non-tensor values at {bad[:5]}. {hint}"
        raise CheckpointError(msg)
    return dict(state)


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Load ``state`` into ``model``, raising on any missing, unexpected or mis-shaped key.

    Keys of the pretraining decoder (``decoder.*``) are reported in one log line and skipped. Unlike the
    official ``load_pretrain``, which silently keeps random weights for missing or mis-shaped keys, this
    refuses such checkpoints.

    Raises
    ------
    CheckpointError
        Naming every missing, unexpected and mis-shaped key (with both shapes).
    """
    expected = model.state_dict()
    skipped = sorted(k for k in state if k not in expected and k.startswith(PRETRAINING_ONLY_PREFIXES))
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected and k not in skipped)
    misshaped = [f"{k}: {tuple(state[k].shape)} in file, {tuple(expected[k].shape)} expected"
                 for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or misshaped:
        parts = [f"{label} ({len(keys)}): {keys[:10]}{' ...' if len(keys) > 10 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                 if keys]
        msg = (f"{source}: the CellPLM state dict does not match the architecture of its config; "
               + "; ".join(parts) + ". Use the .best.ckpt and .config.json of the same release.")
        raise CheckpointError(msg)
    if skipped:
        log.info("%s: skipping %d pretraining-only tensors not used for embeddings: %s", source, len(skipped), skipped)
    model.load_state_dict({k: state[k] for k in expected}, strict=True)


def find_official_files(path: str | Path, prefix: str | None = None) -> tuple[Path, Path]:
    """Return (config.json, best.ckpt) for a folder, a ``.best.ckpt`` or a ``.config.json`` path.

    Raises
    ------
    CheckpointError
        When the pair cannot be found, or a folder holds several checkpoints and no ``prefix`` is given.
    """
    path = Path(path)
    if path.is_dir():
        if prefix is None:
            found = sorted(p.name[: -len(CHECKPOINT_SUFFIX)] for p in path.glob(f"*{CHECKPOINT_SUFFIX}"))
            if len(found) != 1:
                msg = (f"{path}: expected one *{CHECKPOINT_SUFFIX} file, found {found or 'none'}. "
                       "Pass prefix=... (e.g. '20230926_85M') or the .best.ckpt path.")
                raise CheckpointError(msg)
            prefix = found[0]
        folder = path
    elif path.name.endswith(CHECKPOINT_SUFFIX):
        folder, prefix = path.parent, path.name[: -len(CHECKPOINT_SUFFIX)]
    elif path.name.endswith(CONFIG_SUFFIX):
        folder, prefix = path.parent, path.name[: -len(CONFIG_SUFFIX)]
    else:
        msg = f"{path}: not a CellPLM checkpoint; pass the folder, {{prefix}}{CHECKPOINT_SUFFIX} or {{prefix}}{CONFIG_SUFFIX}."
        raise CheckpointError(msg)
    config_path, checkpoint_path = folder / f"{prefix}{CONFIG_SUFFIX}", folder / f"{prefix}{CHECKPOINT_SUFFIX}"
    for needed in (config_path, checkpoint_path):
        if not needed.is_file():
            msg = f"{needed}: missing; the official CellPLM checkpoint is a {CONFIG_SUFFIX} + {CHECKPOINT_SUFFIX} pair."
            raise CheckpointError(msg)
    return config_path, checkpoint_path


# --- encoder --------------------------------------------------------------------------------------------------

#: Keyword options of `CellPLMEncoder.from_pretrained` passed on to the encoder.
ENCODER_OPTIONS = frozenset({"seed", "latent_sampling", "cells_per_pass", "group_key"})
_DROPBOX = "https://www.dropbox.com/scl/fo/i5rmxgtqzg7iykt2e9uqm/h"
_DROPBOX_KEY = "rlkey=o8hi0xads9ol07o48jdityzv1&dl=1"
_GITHUB_RAW = "https://raw.githubusercontent.com/OmicsML/CellPLM/5c25be70b4161e06771561b5cee2069e235d8b74"


class CellPLMEncoder(TorchEncoder):
    """CellPLM cell embeddings (official `CellEmbeddingPipeline.predict`), with LoRA on the flow attention.

    Parameters
    ----------
    module
        The loaded `CellPLMModel`.
    seed
        Seed of the Gumbel noise generator, reset at every `embed` call (official tutorials: 42). None
        draws from torch's global RNG, as the official code does.
    latent_sampling
        ``"gumbel"`` (official, random) or ``"argmax"`` (deterministic, not official).
    cells_per_pass
        Cells per forward pass within a group when `embed` gets no ``batch_size``; 0 means a whole group,
        the official default.
    group_key
        obs column that groups cells (official: ``"batch"``; ignored when absent); None for one group.
    """

    name: ClassVar[str] = "cellplm"
    family: ClassVar[Literal["scfm", "llm", "baseline"]] = "scfm"
    input_kind: ClassVar[Literal["counts", "nonnegative", "any"]] = "counts"
    #: The paper's LoRA targets: the q/k/v projections of every Flowformer attention layer.
    lora_targets: ClassVar[tuple[str, ...]] = ("query_projection", "key_projection", "value_projection")
    #: OmicsML publishes the checkpoint only as a Dropbox folder (README.md, ckpt/README.md); the files are
    #: ckpt/20230926_85M.{config.json,best.ckpt} inside it. The config is also in the GitHub repo. No checksums.
    weights_sources: ClassVar[Mapping[str, WeightsSource]] = {
        "20230926_85M": WeightsSource(
            name="cellplm-20230926_85M",
            files=(
                RemoteFile("20230926_85M.config.json", f"{_GITHUB_RAW}/ckpt/20230926_85M.config.json"),
                RemoteFile("20230926_85M.best.ckpt", f"{_DROPBOX}/ckpt/20230926_85M.best.ckpt?{_DROPBOX_KEY}"),
            ),
            homepage="https://github.com/OmicsML/CellPLM",
            license="BSD-2-Clause",
        ),
    }

    def __init__(self, module: CellPLMModel, *, seed: int | None = DEFAULT_SEED,
                 latent_sampling: LatentSampling = "gumbel", cells_per_pass: int = 0,
                 group_key: str | None = OFFICIAL_GROUP_KEY) -> None:
        if latent_sampling not in ("gumbel", "argmax"):
            msg = f"latent_sampling={latent_sampling!r}; expected 'gumbel' (official) or 'argmax' (deterministic)."
            raise ConfigError(msg)
        self.module = module
        self.config = module.config
        self.seed = seed
        self.latent_sampling: LatentSampling = latent_sampling
        self.cells_per_pass = int(cells_per_pass)
        self.group_key = group_key
        self.generator: torch.Generator | None = None

    @property
    def embedding_dim(self) -> int:
        return self.config.post_latent_dim

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path | None = None, **options: Any) -> CellPLMEncoder:
        """Load the official checkpoint: a folder / ``.best.ckpt`` / ``.config.json`` path, a variant name, or None.

        Options: ``prefix`` (which checkpoint of a folder), ``device``, and the `CellPLMEncoder` parameters
        ``seed``, ``latent_sampling``, ``cells_per_pass``, ``group_key``.

        Raises
        ------
        CheckpointError
            For a missing, corrupted or mismatching checkpoint (keys named).
        """
        prefix = options.pop("prefix", None)
        device = options.pop("device", None)
        unknown = sorted(set(options) - ENCODER_OPTIONS)
        if unknown:
            msg = f"unknown CellPLM options {unknown}; known: {sorted(ENCODER_OPTIONS | {'prefix', 'device'})}."
            raise ConfigError(msg)
        if path_or_name is None or str(path_or_name) in cls.weights_sources:
            variant = next(iter(cls.weights_sources)) if path_or_name is None else str(path_or_name)
            location = resolve_weights(cls.weights_sources[variant])
            prefix = prefix or variant
        else:
            location = Path(path_or_name).expanduser()
            if not location.exists():
                msg = (f"{location}: no such CellPLM checkpoint; pass a folder with the official {{prefix}}"
                       f"{CONFIG_SUFFIX} + {{prefix}}{CHECKPOINT_SUFFIX}, or one of {list(cls.weights_sources)}.")
                raise CheckpointError(msg)
        config_path, checkpoint_path = find_official_files(location, prefix)
        config = CellPLMConfig.from_official(config_path)
        with torch.device("meta"):
            module = CellPLMModel(config)
        module = module.to_empty(device="cpu")
        load_state_dict_strict(module, read_checkpoint(checkpoint_path), source=str(checkpoint_path))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            log.info("CellPLM runs on %s", device)
        encoder = cls(module.to(device).eval(), **options)
        encoder.checkpoint_sha256 = sha256_file(checkpoint_path)
        return encoder

    # tokenize / collate / encode

    def tokenize(self, adata: ad.AnnData, *, layer: str | None = None) -> TokenizedCells:
        return tokenize_counts(adata, self.config.gene_list, layer=layer, group_key=self.group_key)

    def collate(self, tokens: TokenizedCells, rows: npt.NDArray[np.int64]) -> dict[str, torch.Tensor]:
        """Gather the non-zeros of cells ``rows`` (one forward pass: these cells attend to each other)."""
        rows = np.asarray(rows, dtype=np.int64)
        offsets = tokens.arrays["offsets"]
        starts, lengths = offsets[rows], tokens.lengths[rows]
        bag_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        flat = np.repeat(starts - bag_starts, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)
        return {
            "gene_ids": torch.from_numpy(tokens.arrays["gene_ids"][flat]),
            "counts": torch.from_numpy(tokens.arrays["counts"][flat]),
            "offsets": torch.from_numpy(bag_starts),
        }

    def reset_generator(self) -> None:
        """Restart the Gumbel noise as the official pipeline after ``torch.manual_seed(seed)`` would draw it.

        Creating the official DataLoader iterator first draws one int64 from the CPU generator; the Gumbel and
        Gaussian noise are drawn on the model's device, so on CUDA that draw does not touch their stream.
        """
        device = self.device
        if self.seed is None:
            self.generator = None
            torch.empty((), dtype=torch.int64).random_()  # the official DataLoader's draw from the global RNG
            return
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        if device.type == "cpu":
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)

    def encode(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.seed is not None and (self.generator is None or self.generator.device != self.device):
            self.reset_generator()
        return self.module(batch["gene_ids"], batch["counts"], batch["offsets"],
                           sampling=self.latent_sampling, generator=self.generator)

    # official batching: cells attend to the cells of their forward pass

    def iter_batches(self, tokens: TokenizedCells, batch_size: int | None = None) -> Iterator[tuple[np.ndarray, dict]]:
        """Yield (rows, batch) as the official pipeline: groups in sorted order, consecutive chunks within each."""
        cells_per_pass = self.cells_per_pass if batch_size is None else int(batch_size)
        for rows in official_chunks(tokens.arrays["group"], cells_per_pass):
            yield rows, self.collate(tokens, rows)

    def embed_tokens(self, tokens: TokenizedCells, *, batch_size: int | None = None,
                     progress: Progress | None = None) -> npt.NDArray[np.float32]:
        """Return (tokens.n_cells x dim) embeddings, one forward pass per official chunk, noise reseeded."""
        out = np.empty((tokens.n_cells, self.embedding_dim), dtype=np.float32)
        done = 0
        self.module.eval()
        if self.latent_sampling == "gumbel":
            self.reset_generator()
        with torch.inference_mode():
            for rows, batch in self.iter_batches(tokens, batch_size):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with self.autocast():
                    pooled = self.encode(batch)
                out[rows] = pooled.float().cpu().numpy()
                done += rows.size
                if progress is not None:
                    progress(done, tokens.n_cells)
        return out

    def embed(self, adata: ad.AnnData, *, layer: str | None = None, batch_size: int | None = None,
              progress: Progress | None = None) -> npt.NDArray[np.float32]:
        """Return (n_obs x post_latent_dim) embeddings (512 published) as the official pipeline.

        ``batch_size`` is the official ``inference_config['batch_size']``: cells per forward pass within a
        group, 0 for a whole group; None uses ``cells_per_pass`` (default 0, official). A cell's embedding
        depends on the cells sharing its pass, so change it knowingly.
        """
        return super().embed(adata, layer=layer, batch_size=batch_size, progress=progress)

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts.update(seed=self.seed, latent_sampling=self.latent_sampling, cells_per_pass=self.cells_per_pass,
                     group_key=self.group_key, n_genes=len(self.config.gene_list))
        return facts
