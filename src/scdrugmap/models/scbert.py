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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdrugmap.data.schema import expression_matrix
from scdrugmap.errors import CheckpointError, ConfigError, SchemaError, WeightsNotFoundError
from scdrugmap.models.base import TokenizedCells, TorchEncoder
from scdrugmap.models.weights import RemoteFile, WeightsSource, cache_path, resolve_weights, sha256_file

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt
    import torch

    from scdrugmap.models._performer import KeyMax, PerformerLM

log = logging.getLogger(__name__)

# --- constants (official sources in comments) --------------------------------------------------------------

#: predict.py / finetune.py ``--bin_num`` default: values are cut at 5.
BIN_NUM = 5
#: predict.py ``--gene_num`` default: genes of panglao_10000.h5ad (and rows of gene2vec_16906.npy).
GENE_NUM = 16906
#: preprocess.py ``sc.pp.filter_cells(new, min_genes=200)``.
MIN_GENES = 200
#: preprocess.py ``sc.pp.normalize_total(new, target_sum=1e4)``.
TARGET_SUM = 1e4
#: preprocess.py ``sc.pp.log1p(new, base=2)``.
LOG_BASE = 2.0
#: predict.py ``torch.cat((full_seq, torch.tensor([0])))``: the token appended after the genes.
APPENDED_TOKEN = 0
#: Rows processed together by the vectorised preprocessing (bounds memory, not a per-cell loop).
PREPROCESS_CHUNK = 8192

#: The reference gene list the official preprocess.py reads.
REFERENCE_H5AD = "panglao_10000.h5ad"
CHECKPOINT_FILE = "panglao_pretrain.pth"
GENE2VEC_FILE = "gene2vec_16906.npy"
GENE_LIST_FILES = ("genes.txt", "vocab_genes.txt")


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
        kwargs = _performer_kwargs(json.loads(Path(path).read_text()))
        gene_num = kwargs.pop("gene_num", None)
        config = cls(**_checked_kwargs(cls, kwargs, path))
        if gene_num is not None and gene_num != config.gene_num:
            msg = f"{path}: max_seq_len {config.max_seq_len} must be gene_num {gene_num} + 1 (the appended token)."
            raise ConfigError(msg)
        return config


def _performer_kwargs(raw: Mapping[str, Any]) -> dict[str, Any]:
    if "PerformerLM" in raw:
        return dict(raw["PerformerLM"])
    if "network" in raw and "structure" in raw["network"]:
        return dict(raw["network"]["structure"])
    return dict(raw)


#: Keys of the official configs that do not change the architecture we build.
_IGNORED_CONFIG_KEYS = frozenset({"name", "gene2vec_path", "ckpt_path", "param_key", "gene_num"})


def _checked_kwargs(cls: type, kwargs: dict[str, Any], path: str | Path) -> dict[str, Any]:
    if kwargs.pop("local_attn_heads", 0) not in (0, [0], (0,)):
        msg = f"{path}: local_attn_heads > 0 is not supported (the published model uses 0)."
        raise ConfigError(msg)
    if not kwargs.pop("g2v_position_emb", True):
        msg = f"{path}: g2v_position_emb=False is not supported (the published model uses gene2vec)."
        raise ConfigError(msg)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - known - _IGNORED_CONFIG_KEYS)
    if unknown:
        msg = f"{path}: unsupported PerformerLM options {unknown}; supported: {sorted(known)}."
        raise ConfigError(msg)
    return {k: v for k, v in kwargs.items() if k in known}


# --- preprocessing (preprocess.py) and tokenisation (predict.py) -------------------------------------------


def read_gene_list(source: str | Path | Sequence[str]) -> npt.NDArray[np.str_]:
    """Return a reference gene order from a list, a text file (one gene a line) or an ``.h5ad`` (var_names).

    Raises
    ------
    SchemaError
        When the file type is not known or the list is empty.
    """
    if not isinstance(source, str | Path):
        genes = np.asarray([str(g) for g in source])
    else:
        path = Path(source)
        if path.suffix == ".h5ad":
            import anndata as ad

            backed = ad.read_h5ad(path, backed="r")
            genes = np.asarray(backed.var_names.astype(str))
            backed.file.close()
        elif path.suffix in (".txt", ".tsv", ".csv", ""):
            genes = np.asarray([line.strip() for line in path.read_text().splitlines() if line.strip()])
        else:
            msg = f"{path}: cannot read a gene list from a {path.suffix} file; give a .txt (one gene a line) or .h5ad."
            raise SchemaError(msg)
    if genes.size == 0:
        msg = f"{source}: the reference gene list is empty."
        raise SchemaError(msg)
    return genes


def data_gene_names(adata: ad.AnnData, gene_key: str | None = None) -> npt.NDArray[np.str_]:
    """Return the gene symbols of ``adata``: ``var[gene_key]``, else ``var['gene_symbol']``, else var_names."""
    if gene_key is not None:
        if gene_key not in adata.var:
            msg = f"var has no column {gene_key!r}; columns present: {list(adata.var.columns)}. Check --gene-key."
            raise SchemaError(msg)
        return np.asarray(adata.var[gene_key].astype(str))
    if "gene_symbol" in adata.var:
        return np.asarray(adata.var["gene_symbol"].astype(str))
    return np.asarray(adata.var_names.astype(str))


def reference_selection(data_genes: npt.NDArray[np.str_], reference: npt.NDArray[np.str_]) -> sp.csr_matrix:
    """Return the 0/1 (data genes x reference genes) matrix that copies, for every reference gene, the
    column of its **first** occurrence in the data (``obj.index(ref[i])`` in preprocess.py)."""
    unique, first = np.unique(data_genes, return_index=True)
    hit = pd.Index(unique).get_indexer(reference)
    present = np.flatnonzero(hit >= 0)
    source = first[hit[present]]
    ones = np.ones(present.size, dtype=np.float32)
    return sp.csr_matrix((ones, (source, present)), shape=(data_genes.size, reference.size))


def known_gene_columns(adata: ad.AnnData, reference: npt.NDArray[np.str_], *,
                       gene_key: str | None = None) -> npt.NDArray[np.bool_]:
    """Return, per var column, whether preprocess.py copies it into the reference genes (`reference_selection`:
    the first column of each reference gene; a repeated column is not read)."""
    selection = reference_selection(data_gene_names(adata, gene_key), reference)
    return np.diff(selection.indptr) > 0


def preprocess_log2(
    counts: Any, selection: sp.csr_matrix, *, min_genes: int = MIN_GENES, target_sum: float = TARGET_SUM
) -> tuple[sp.csr_matrix, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Run preprocess.py on raw counts: align, filter cells, normalise, log2; vectorised, float32 like scanpy.

    Returns ``(log2 values of the kept cells as a CSR matrix with sorted indices, kept row positions,
    number of expressed reference genes per input row)``. Arithmetic mirrors scanpy 1.11: float64 row sums stored as
    float32, ``x / (sum / target_sum)`` in float32, ``log1p`` in float32 divided by ``ln 2`` in float64.
    """
    parts: list[sp.csr_matrix] = []
    kept: list[npt.NDArray[np.int64]] = []
    n_expressed = np.zeros(counts.shape[0], dtype=np.int64)
    for start in range(0, counts.shape[0], PREPROCESS_CHUNK):
        block = counts[start : start + PREPROCESS_CHUNK]
        block = sp.csr_matrix(block, dtype=np.float32) if sp.issparse(block) else sp.csr_matrix(
            np.asarray(block, dtype=np.float32))
        aligned = (block @ selection).tocsr()
        aligned.eliminate_zeros()
        aligned.sort_indices()
        expressed = np.diff(aligned.indptr)
        n_expressed[start : start + aligned.shape[0]] = expressed
        rows = np.flatnonzero(expressed >= min_genes)
        aligned = aligned[rows]
        sums = np.asarray(aligned.sum(axis=1, dtype=np.float64)).ravel().astype(np.float32)
        factor = sums / np.float32(target_sum)
        factor[factor == 0] = 1  # scanpy: a zero-count cell stays zero
        data = aligned.data / np.repeat(factor, np.diff(aligned.indptr))
        data = (np.log1p(data).astype(np.float64) / np.log(LOG_BASE)).astype(np.float32)
        parts.append(sp.csr_matrix((data, aligned.indices, aligned.indptr), shape=aligned.shape))
        kept.append(rows + start)
    matrix = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, selection.shape[1]), dtype=np.float32)
    matrix.sort_indices()
    kept_rows = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    return matrix, kept_rows.astype(np.int64), n_expressed


def bin_values(values: npt.NDArray[np.floating], bin_num: int = BIN_NUM) -> npt.NDArray[np.int8]:
    """Return ``min(trunc(v), bin_num)``: predict.py's ``v[v > 5] = 5`` then ``.long()`` (truncation)."""
    return np.minimum(np.trunc(values), bin_num).astype(np.int8)


def preprocessed_cells(
    adata: ad.AnnData, reference: npt.NDArray[np.str_], *, layer: str | None, gene_key: str | None,
    min_genes: int, model: str,
) -> tuple[sp.csr_matrix, npt.NDArray[np.int64], dict[int, str], int]:
    """Align ``adata`` to ``reference`` and run preprocess.py; return (log2, kept rows, dropped, n matched).

    Raises
    ------
    SchemaError
        When no gene of the data is in the reference (symbols expected).
    """
    genes = data_gene_names(adata, gene_key)
    selection = reference_selection(genes, reference)
    n_matched = int(selection.nnz)
    if n_matched == 0:
        msg = (f"{model}: none of the {genes.size} genes of the data (e.g. {list(genes[:3])}) is in the model's "
               f"{reference.size} reference genes (e.g. {list(reference[:3])}). It expects gene symbols: "
               "harmonise the genes (var['gene_symbol']) or name the column with gene_key.")
        raise SchemaError(msg)
    log.debug("%s: %d of %d reference genes found in the data", model, n_matched, reference.size)
    matrix, kept, n_expressed = preprocess_log2(expression_matrix(adata, layer), selection, min_genes=min_genes)
    dropped_rows = np.setdiff1d(np.arange(adata.n_obs), kept)
    dropped = {int(r): f"{int(n_expressed[r])} reference genes expressed, fewer than min_genes={min_genes}"
               for r in dropped_rows}
    return matrix, kept, dropped, n_matched


# --- model --------------------------------------------------------------------------------------------------


def build_scbert_model(config: ScBERTConfig, *, seed: int = 0) -> PerformerLM:
    """Return the official ``PerformerLM`` architecture (state-dict keys as in ``panglao_pretrain.pth``)."""
    from scdrugmap.models._performer import PerformerLM

    return PerformerLM(num_tokens=config.num_tokens, pos_rows=config.max_seq_len, dim=config.dim,
                       depth=config.depth, heads=config.heads, dim_head=config.dim_head,
                       nb_features=config.nb_features, ff_mult=config.ff_mult, qkv_bias=config.qkv_bias,
                       feature_redraw_interval=config.feature_redraw_interval, seed=seed)


# --- loader ---------------------------------------------------------------------------------------------


def _single(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    return found[0] if len(found) == 1 else None


def locate_official_files(path: Path, checkpoint_name: str, reference_names: Sequence[str]) -> tuple[Path, Path | None]:
    """Return (checkpoint file, reference gene file or None) from a file or an official-layout folder."""
    if path.is_file():
        folder, checkpoint = path.parent, path
    else:
        folder = path
        checkpoint = folder / checkpoint_name
        if not checkpoint.exists():
            checkpoint = _single(folder, "*.pth") or checkpoint
    reference = next((folder / n for n in reference_names if (folder / n).exists()), None)
    if reference is None:
        reference = _single(folder, "*.h5ad")
    return checkpoint, reference


def resolve_official(source: WeightsSource, path_or_name: str | Path | None, sources: Mapping[str, WeightsSource],
                     manual_steps: str) -> Path:
    """Return the local weights path: ``path_or_name`` if it is a path, else the cached variant.

    The official files sit behind share pages that need a request or a browser, so nothing is
    downloaded automatically: a missing cache raises with the manual steps.
    """
    if path_or_name is not None and str(path_or_name) not in sources:
        return resolve_weights(source, path_or_name)
    variant = sources[str(path_or_name)] if path_or_name is not None else source
    folder = cache_path(variant)
    if all((folder / remote.filename).exists() for remote in variant.files):  # copied in by hand: no manifest
        return folder
    try:
        return resolve_weights(variant, allow_download=False)
    except WeightsNotFoundError as err:
        msg = f"{err} {manual_steps}"
        raise WeightsNotFoundError(msg) from err


class PerformerEncoder(TorchEncoder):
    """What the scBERT and CellLM encoders share: the switchable key max and the model width."""

    module: PerformerLM

    @property
    def key_max(self) -> KeyMax:
        """``"batch"`` (official: a cell's output depends on its batch) or ``"cell"`` (batch-independent)."""
        return self.module.performer.key_max

    @key_max.setter
    def key_max(self, value: KeyMax) -> None:
        self.module.performer.key_max = value

    @property
    def embedding_dim(self) -> int:
        return self.config.dim

    @classmethod
    def _load_official(cls, path_or_name: str | Path | None, *, config: Any, genes: Any, device: str | None,
                       options: Mapping[str, Any]) -> tuple[PerformerLM, npt.NDArray[np.str_], Any, Path]:
        """Resolve, read and strictly load an official checkpoint; return (module, genes, config, checkpoint).

        The models differ only in their files, config class, network builder and messages: the hooks
        `_default_config`, `_build`, `_missing_genes_message`, `_gene_count_message` and `_checkpoint_fix`.
        """
        if options:
            msg = f"unknown {cls.name} options {sorted(options)}."
            raise ConfigError(msg)
        from scdrugmap.models._performer import load_state_dict_strict, read_checkpoint

        default = next(iter(cls.weights_sources.values()))
        path = resolve_official(default, path_or_name, cls.weights_sources, cls.MANUAL_STEPS)
        checkpoint, reference = locate_official_files(Path(path), cls.CHECKPOINT_FILE,
                                                      (cls.REFERENCE_H5AD, *GENE_LIST_FILES))
        if config is None:
            config = cls._default_config(checkpoint.parent / "config.json")
        if genes is None:
            if reference is None:
                raise CheckpointError(cls._missing_genes_message(checkpoint.parent, config))
            genes = reference
        gene_list = read_gene_list(genes)
        if gene_list.size != config.gene_num:
            raise CheckpointError(cls._gene_count_message(genes, gene_list.size, config))
        module = cls._build(config)
        state = read_checkpoint(checkpoint, model=cls.MODEL_LABEL)
        missing_head = load_state_dict_strict(module, state, source=str(checkpoint), optional_prefixes=("to_out.",),
                                              fix=cls._checkpoint_fix(config))
        if missing_head:
            module.to_out = None  # a fine-tuned head (finetune.py's Identity) or none: embeddings do not use it
        if device is not None:
            module.to(device)
        module.eval()
        return module, gene_list, config, checkpoint


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
        from scdrugmap.models._performer import flat_offsets

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
