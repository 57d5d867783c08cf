"""scBERT: a Performer over every gene of a cell, with binned expression as tokens.

Paper: Yang et al., "scBERT as a large-scale pretrained deep language model for cell type annotation
of single-cell RNA-seq data", Nature Machine Intelligence 4, 852-866 (2022).
Official code: https://github.com/TencentAILabHealthcare/scBERT (commit ``262fd4b``):
``performer_pytorch/performer_pytorch.py`` (``PerformerLM``), ``preprocess.py``, ``predict.py``.

Input: raw counts. ``preprocess.py`` aligns the genes to the 16,906 genes of ``panglao_10000.h5ad``
(genes outside it are dropped *before* normalising), drops cells with fewer than 200 expressed
reference genes, normalises to 10,000 counts and takes ``log2(1 + x)``. ``predict.py`` then cuts each
value into a bin ``min(floor(v), 5)`` (values below 1 share bin 0 with unexpressed genes) and appends
one token 0, giving 16,907 tokens in reference-gene order; the gene2vec table (with a zero row for the
appended token) is added as the positional embedding.

Pooling: the mean of the final hidden states (after the last LayerNorm) over all 16,907 positions,
the appended token included.

Batches: the key stabiliser of the official FAVOR+ kernel is a max over the whole batch (see
`scdrugmap.models._performer`), so embeddings depend on which cells share a batch; that is the
default (``key_max="batch"``), with consecutive cells batched as a DataLoader without shuffling does.
``key_max="cell"`` takes the max per cell: every cell then gets the output it gets alone, as in
``predict.py`` (one cell per forward), whatever the batch. On the golden fixture the two differ by up
to 2.9e-4 in the hidden states and 4e-5 in the pooled embedding (measured in ``tests/models/test_scbert.py``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from scdrugmap.errors import ConfigError
from scdrugmap.models._performer import (
    MIN_GENES,
    KeyMax,
    PerformerEncoder,
    PerformerLM,
    checked_performer_kwargs,
    flat_offsets,
    known_gene_columns,
    official_performer_kwargs,
    preprocessed_cells,
    read_gene_list,
)
from scdrugmap.models.base import TokenizedCells
from scdrugmap.models.weights import RemoteFile, WeightsSource, sha256_file

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt
    import torch

log = logging.getLogger(__name__)

# --- constants (official sources in comments) --------------------------------------------------------------

#: predict.py / finetune.py ``--bin_num`` default: values are cut at 5.
BIN_NUM = 5
#: predict.py ``--gene_num`` default: genes of panglao_10000.h5ad (and rows of gene2vec_16906.npy).
GENE_NUM = 16906
#: predict.py ``torch.cat((full_seq, torch.tensor([0])))``: the token appended after the genes.
APPENDED_TOKEN = 0

#: The reference gene list the official preprocess.py reads.
REFERENCE_H5AD = "panglao_10000.h5ad"
CHECKPOINT_FILE = "panglao_pretrain.pth"
GENE2VEC_FILE = "gene2vec_16906.npy"

# --- config ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScBERTConfig:
    """``PerformerLM`` arguments of the published model (predict.py / finetune.py / pretrain.py).

    ``dim_head`` keeps performer's default 64, so the attention inner width is 640, not ``dim``.
    ``nb_features=None`` means the official ``int(dim_head * ln(dim_head))`` (266).
    """

    num_tokens: int = BIN_NUM + 2
    dim: int = 200
    depth: int = 6
    max_seq_len: int = GENE_NUM + 1
    heads: int = 10
    dim_head: int = 64
    nb_features: int | None = None
    ff_mult: int = 4
    qkv_bias: bool = False
    feature_redraw_interval: int | None = 1000

    @property
    def gene_num(self) -> int:
        return self.max_seq_len - 1

    @property
    def bin_num(self) -> int:
        return self.num_tokens - 2

    @classmethod
    def from_official(cls, path: str | Path) -> ScBERTConfig:
        """Read ``PerformerLM`` kwargs from JSON: flat, under ``"PerformerLM"``, or OpenBioMed's
        ``configs/ctc/scbert.json`` layout (``network.structure``).

        Raises
        ------
        ConfigError
            When the file asks for features this port does not run (local attention, no gene2vec).
        """
        kwargs = official_performer_kwargs(json.loads(Path(path).read_text()))
        gene_num = kwargs.pop("gene_num", None)
        config = cls(**checked_performer_kwargs(cls, kwargs, path))
        if gene_num is not None and gene_num != config.gene_num:
            msg = f"{path}: max_seq_len {config.max_seq_len} must be gene_num {gene_num} + 1 (the appended token)."
            raise ConfigError(msg)
        return config


# --- tokenisation (predict.py); preprocess.py is `scdrugmap.models._performer.preprocessed_cells` ----------


def bin_values(values: npt.NDArray[np.floating], bin_num: int = BIN_NUM) -> npt.NDArray[np.int8]:
    """Return ``min(trunc(v), bin_num)``: predict.py's ``v[v > 5] = 5`` then ``.long()`` (truncation)."""
    return np.minimum(np.trunc(values), bin_num).astype(np.int8)


# --- model --------------------------------------------------------------------------------------------------


def build_scbert_model(config: ScBERTConfig, *, seed: int = 0) -> PerformerLM:
    """Return the official ``PerformerLM`` architecture (state-dict keys as in ``panglao_pretrain.pth``)."""
    return PerformerLM(num_tokens=config.num_tokens, pos_rows=config.max_seq_len, dim=config.dim,
                       depth=config.depth, heads=config.heads, dim_head=config.dim_head,
                       nb_features=config.nb_features, ff_mult=config.ff_mult, qkv_bias=config.qkv_bias,
                       feature_redraw_interval=config.feature_redraw_interval, seed=seed)


# --- encoder (loader: `scdrugmap.models._performer.PerformerEncoder`) ------------------------------------


class ScBERTEncoder(PerformerEncoder):
    """scBERT cell embeddings: mean of the final hidden states over all genes (see the module docstring).

    Parameters
    ----------
    module
        The ``PerformerLM`` with loaded weights.
    genes
        Reference gene order (``panglao_10000.h5ad`` var_names), ``config.gene_num`` genes.
    config
        The architecture.
    key_max
        ``"batch"`` (official: the key stabiliser spans the batch) or ``"cell"`` (batch-independent).
    min_genes
        Cells with fewer expressed reference genes are dropped (preprocess.py uses 200).
    gene_key
        var column holding gene symbols (default ``gene_symbol`` if present, else var_names).
    """

    name: ClassVar[str] = "scbert"
    family: ClassVar = "scfm"
    input_kind: ClassVar = "counts"
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v")
    module: PerformerLM
    config: ScBERTConfig
    weights_sources: ClassVar[Mapping[str, WeightsSource]] = {
        "panglao_pretrain": WeightsSource(
            name="scbert",
            files=(
                # README "Checkpoint": a time-limited WeChat Work drive share (ask fionafyang@tencent.com).
                RemoteFile(CHECKPOINT_FILE, "https://drive.weixin.qq.com/s?k=AJEAIQdfAAoUxhXE7r"),
                # README "Data": the data share (also https://drive.weixin.qq.com/s?k=AJEAIQdfAAozQt5B8k) holds
                # the reference gene order. gene2vec_16906.npy is there too but not needed: its table is
                # inside the checkpoint (pos_emb.emb.weight).
                RemoteFile(REFERENCE_H5AD, "https://drive.google.com/file/d/1fNZbKx6LPeoS0hbVYJFI8jlDlNctZxlU/view?usp=sharing"),
            ),
            homepage="https://github.com/TencentAILabHealthcare/scBERT",
            license="GPL-3.0 (code and weights)",
        ),
    }
    MANUAL_STEPS: ClassVar[str] = (
        "scBERT's files are behind share links that need a browser (README: Checkpoint, Data): download "
        f"{CHECKPOINT_FILE} and {REFERENCE_H5AD} and pass their folder as the weights path (or copy them "
        "into the cache folder named above)."
    )

    CHECKPOINT_FILE: ClassVar[str] = CHECKPOINT_FILE
    REFERENCE_H5AD: ClassVar[str] = REFERENCE_H5AD
    MODEL_LABEL: ClassVar[str] = "scBERT"

    @staticmethod
    def _default_config(config_path: Path) -> ScBERTConfig:
        return ScBERTConfig.from_official(config_path) if config_path.exists() else ScBERTConfig()

    @staticmethod
    def _build(config: ScBERTConfig) -> PerformerLM:
        return build_scbert_model(config)

    @staticmethod
    def _missing_genes_message(folder: Path, config: ScBERTConfig) -> str:
        return (f"{folder}: no reference gene list ({REFERENCE_H5AD} or genes.txt) beside the "
                "checkpoint. Pass genes=PATH (the panglao_10000.h5ad of the scBERT data share).")

    @staticmethod
    def _gene_count_message(genes: Any, n_genes: int, config: ScBERTConfig) -> str:
        return (f"{genes}: {n_genes} reference genes, but the model embeds {config.gene_num} "
                "(max_seq_len - 1). Pass the gene list the checkpoint was trained on.")

    @staticmethod
    def _checkpoint_fix(config: ScBERTConfig) -> str:
        return ("Pass config=ScBERTConfig(...) (or ScBERTConfig.from_official(json)) matching the checkpoint."
                if config == ScBERTConfig() else "Check that config matches the checkpoint.")

    def __init__(self, module: PerformerLM, genes: Sequence[str] | npt.NDArray[np.str_], config: ScBERTConfig, *,
                 key_max: KeyMax = "batch", min_genes: int = MIN_GENES, gene_key: str | None = None) -> None:
        self.module = module
        self.genes = np.asarray(genes)
        self.config = config
        self.min_genes = min_genes
        self.gene_key = gene_key
        self.key_max = key_max

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path | None = None, *, config: ScBERTConfig | None = None,
                        genes: str | Path | Sequence[str] | None = None, key_max: KeyMax = "batch",
                        min_genes: int = MIN_GENES, gene_key: str | None = None, device: str | None = None,
                        **options: Any) -> ScBERTEncoder:
        """Load ``panglao_pretrain.pth`` (a file, or the folder holding it and ``panglao_10000.h5ad``).

        The checkpoint is read with ``torch.load(weights_only=True)`` from ``ckpt['model_state_dict']``
        as the official loaders do; the gene2vec table is inside it, so the ``.npy`` is not needed.
        ``config`` defaults to the published architecture, or ``config.json`` beside the checkpoint.

        Raises
        ------
        CheckpointError
            When keys are missing, unexpected or mis-shaped, or the file is corrupted.
        WeightsNotFoundError
            When nothing is given and nothing is cached.
        """
        module, gene_list, config, checkpoint = cls._load_official(path_or_name, config=config, genes=genes,
                                                                   device=device, options=options)
        encoder = cls(module, gene_list, config, key_max=key_max, min_genes=min_genes, gene_key=gene_key)
        encoder.checkpoint_sha256 = sha256_file(checkpoint)
        log.info("loaded scBERT from %s (%d genes, key_max=%s)", checkpoint, gene_list.size, key_max)
        return encoder

    def tokenize(self, adata: ad.AnnData, *, layer: str | None = None) -> TokenizedCells:
        """Preprocess as preprocess.py and bin as predict.py; store the non-zero bins per cell (CSR)."""
        matrix, kept, dropped, n_matched = preprocessed_cells(
            adata, self.genes, layer=layer, gene_key=self.gene_key, min_genes=self.min_genes, model=self.name)
        known = known_gene_columns(adata, self.genes, gene_key=self.gene_key)
        bins = bin_values(matrix.data, self.config.bin_num)
        nonzero = bins > 0
        row_of_entry = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
        counts = np.bincount(row_of_entry[nonzero], minlength=matrix.shape[0])
        return TokenizedCells(
            cell_index=kept,
            lengths=np.full(kept.size, self.config.max_seq_len, dtype=np.int64),
            arrays={"offsets": flat_offsets(counts), "gene_ids": matrix.indices[nonzero].astype(np.int32),
                    "bins": bins[nonzero]},
            dropped=dropped,
            n_genes_matched=n_matched,
            gene_known=known,
        )

    def collate(self, tokens: TokenizedCells, rows: npt.NDArray[np.int64]) -> dict[str, torch.Tensor]:
        """Return ``input_ids`` (cells x 16,907): the bin of every reference gene, then token 0."""
        import torch

        offsets = tokens.arrays["offsets"]
        starts, stops = offsets[rows], offsets[rows + 1]
        sizes = stops - starts
        entries = np.repeat(starts - np.cumsum(np.r_[0, sizes[:-1]]), sizes) + np.arange(sizes.sum())
        batch_row = np.repeat(np.arange(rows.size), sizes)
        ids = np.zeros((rows.size, self.config.max_seq_len), dtype=np.int64)  # last column: APPENDED_TOKEN
        ids[batch_row, tokens.arrays["gene_ids"][entries]] = tokens.arrays["bins"][entries]
        return {"input_ids": torch.from_numpy(ids)}

    def hidden_states(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return the final hidden states (cells x 16,907 x dim), after the last LayerNorm."""
        return self.module(batch["input_ids"], return_encodings=True)

    def encode(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return the mean of the hidden states over all positions (the official pooling, see the README)."""
        return self.hidden_states(batch).mean(dim=1)

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts.update(config=asdict(self.config), key_max=self.key_max, n_genes=int(self.genes.size))
        return facts


__all__ = ["APPENDED_TOKEN", "BIN_NUM", "GENE_NUM", "MIN_GENES", "ScBERTConfig", "ScBERTEncoder", "bin_values",
           "build_scbert_model", "read_gene_list"]
