"""CellLM: a Performer over the expressed genes of a cell, with a CLS token.

Paper: Zhao et al., "Large-scale cell representation learning via divide-and-conquer contrastive
learning" (CellLM), arXiv:2306.04371 (2023).
Official code: https://github.com/PharMolix/OpenBioMed (commit ``ce3ccab``):
``open_biomed/models/cell/performer_celllm.py`` (``PerformerLM_CellLM``), loaded by
``open_biomed/models/task_model/ctc_model.py``; published config ``configs/ctc/cellLM.json``.

Input: raw counts. OpenBioMed has no normalisation code: its cell data sets are scBERT-preprocessed
``.h5ad`` files, so cells go through scBERT's ``preprocess.py`` (align to the model's 19,379 genes,
drop cells with fewer than 200 of them expressed, normalise to 1e4, ``log2(1 + x)``; see
`scdrugmap.models._performer.preprocessed_cells`). That step is an inferred contract, not CellLM
code. ``forward`` then keeps, per cell and in gene-index order, the genes with value > 0 as tokens ``min(floor(v), 5)``
(values below 1 keep token 0), prepends CLS (token 6, gene row ``gene_num`` = ones), keeps the
**first** 6,000 tokens, and pads to exactly 6,000 (token 7, gene row ``gene_num + 1`` = zeros,
mask False). Here that tokenisation is vectorised in `CellLMEncoder.tokenize` / ``collate``.

Pooling: the official code defines none (its heads read every token through a Conv2d); we take the
CLS state ``hidden[:, 0]`` (``pooling="cls"``, the golden README's choice), or the masked mean with
(``"mean"``) or without (``"mean_genes"``) CLS.

Quirks reproduced:

1. Pad positions still act as keys: only V is zeroed, so they enter the FAVOR+ normaliser and the
   global key max; the output depends on padding to ``max_seq_len`` (dropping them moves the tiny
   fixture's hidden states by up to 0.46). By default the padding is *compressed*: one weighted pad
   slot stands for all pads of a cell, an exact rewrite (see `scdrugmap.models._performer`) that
   saves the compute on 6,000 - n positions; ``compress_padding=False`` pads literally.
2. Batch-dependent outputs: the key stabiliser is a max over the whole batch (``key_max="batch"``,
   default, consecutive cells per batch). ``key_max="cell"`` makes every cell's output what it gets
   alone, whatever the batch, and then batches are bucketed by length. On the golden fixture the
   two differ by up to 2.1e-3 in the hidden states (1.8e-3 in the CLS embedding; see the tests).
3. ``PerformerLM_CellLM.__init__`` freezes every parameter except the final norm and the last
   layer (``tune_layer=[-1]``); reproduced, it matters only for full fine-tuning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

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
)
from scdrugmap.models.base import TokenizedCells, length_buckets
from scdrugmap.models.weights import RemoteFile, WeightsSource, sha256_file

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt
    import torch

log = logging.getLogger(__name__)

Pooling = Literal["cls", "mean", "mean_genes"]
POOLING_CHOICES: tuple[str, ...] = ("cls", "mean", "mean_genes")

#: configs/ctc/cellLM.json: gene2vec_19379_512.npy rows, the model's gene order.
GENE_NUM = 19379
#: configs/ctc/cellLM.json ``max_seq_len``: tokens per cell, CLS included, after truncation and padding.
MAX_SEQ_LEN = 6000
#: configs/ctc/cellLM.json ``num_tokens``: bins 0-5, CLS (num_tokens - 2), PAD (num_tokens - 1).
NUM_TOKENS = 8
CHECKPOINT_FILE = "checkpoint4_fixed.pth"
GENE2VEC_FILE = "gene2vec_19379_512.npy"
#: The OpenBioMed CTC data (scBERT-preprocessed, gene order = the model's) whose var_names give the genes.
REFERENCE_H5AD = "zheng68k_hgnc.h5ad"
#: docs/ctc.md: "CellLM [here](https://pan.baidu.com/s/1iAMBkuoZnNAylhopP5OgEg) (password is `7a6b`)".
BAIDU_SHARE = "https://pan.baidu.com/s/1iAMBkuoZnNAylhopP5OgEg"


@dataclass(frozen=True)
class CellLMConfig:
    """``PerformerLM_CellLM`` arguments of ``configs/ctc/cellLM.json`` (others at their defaults).

    ``dim_head`` keeps the default 64 (inner width 1024); ``nb_features=None`` is ``int(64 ln 64) = 266``.
    ``tune_layers`` are the layers left trainable by the constructor (official ``tune_layer=[-1]``).
    """

    num_tokens: int = NUM_TOKENS
    dim: int = 512
    depth: int = 10
    max_seq_len: int = MAX_SEQ_LEN
    gene_num: int = GENE_NUM
    heads: int = 16
    dim_head: int = 64
    nb_features: int | None = None
    ff_mult: int = 4
    qkv_bias: bool = False
    feature_redraw_interval: int | None = 1000
    tune_layers: tuple[int, ...] = (-1,)

    @property
    def cls_token_id(self) -> int:
        return self.num_tokens - 2

    @property
    def pad_token_id(self) -> int:
        return self.num_tokens - 1

    @property
    def cls_gene_id(self) -> int:
        return self.gene_num

    @property
    def pad_gene_id(self) -> int:
        return self.gene_num + 1

    @property
    def max_bin(self) -> int:
        """``exp[exp > cls_token_id - 1] = cls_token_id - 1``: the largest expression token."""
        return self.cls_token_id - 1

    @classmethod
    def from_official(cls, path: str | Path) -> CellLMConfig:
        """Read OpenBioMed's ``configs/ctc/cellLM.json`` (``network.structure``) or flat kwargs.

        Raises
        ------
        ConfigError
            When the file asks for features this port does not run.
        """
        raw = json.loads(Path(path).read_text())
        kwargs = official_performer_kwargs(raw)
        if "tune_layer" in kwargs:
            kwargs["tune_layers"] = tuple(kwargs.pop("tune_layer"))
        return cls(**checked_performer_kwargs(cls, kwargs, path))


# --- model --------------------------------------------------------------------------------------------------


def build_celllm_model(config: CellLMConfig, *, seed: int = 0) -> PerformerLM:
    """Return the ``PerformerLM_CellLM`` architecture, frozen as its constructor leaves it."""
    module = PerformerLM(num_tokens=config.num_tokens, pos_rows=config.gene_num + 2, dim=config.dim,
                         depth=config.depth, heads=config.heads, dim_head=config.dim_head,
                         nb_features=config.nb_features, ff_mult=config.ff_mult, qkv_bias=config.qkv_bias,
                         feature_redraw_interval=config.feature_redraw_interval, seed=seed)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    for parameter in module.norm.parameters():
        parameter.requires_grad_(True)
    for layer in config.tune_layers:
        for parameter in module.performer.net.layers[layer].parameters():
            parameter.requires_grad_(True)
    return module


# --- encoder --------------------------------------------------------------------------------------------


class CellLMEncoder(PerformerEncoder):
    """CellLM cell embeddings: the CLS state by default (see the module docstring).

    Parameters
    ----------
    module
        The ``PerformerLM_CellLM`` with loaded weights.
    genes
        The model's gene order (``gene_num`` genes).
    config
        The architecture.
    key_max
        ``"batch"`` (official, batch-dependent) or ``"cell"`` (batch-independent).
    pooling
        ``"cls"``, ``"mean"`` (valid tokens incl. CLS) or ``"mean_genes"`` (excl. CLS).
    compress_padding
        Stand one weighted slot in for all pad positions (exact); False pads to ``max_seq_len``.
    min_genes, gene_key
        As in `scdrugmap.models.scbert.ScBERTEncoder`.
    """

    name: ClassVar[str] = "celllm"
    family: ClassVar = "scfm"
    input_kind: ClassVar = "counts"
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v")
    module: PerformerLM
    config: CellLMConfig
    weights_sources: ClassVar[Mapping[str, WeightsSource]] = {
        "celllm": WeightsSource(
            name="celllm",
            files=(
                # docs/ctc.md: one Baidu share (password 7a6b) holds the CellLM checkpoint folder
                # (ckpts/cell_ckpts/celllm/) and the CTC data whose var_names give the gene order.
                # gene2vec_19379_512.npy is not needed: its table (+ CLS/PAD rows) is in the checkpoint.
                RemoteFile(CHECKPOINT_FILE, BAIDU_SHARE),
                RemoteFile(REFERENCE_H5AD, BAIDU_SHARE),
            ),
            homepage="https://github.com/PharMolix/OpenBioMed",
            license="MIT (OpenBioMed code)",
        ),
    }
    MANUAL_STEPS: ClassVar[str] = (
        f"CellLM's files are on a Baidu share ({BAIDU_SHARE}, password 7a6b, see OpenBioMed docs/ctc.md) that "
        f"needs a browser: download {CHECKPOINT_FILE} and {REFERENCE_H5AD} (its var_names are the model's "
        "gene order) and pass their folder as the weights path (or copy them into the cache folder named above)."
    )

    def __init__(self, module: PerformerLM, genes: Sequence[str] | npt.NDArray[np.str_], config: CellLMConfig, *,
                 key_max: KeyMax = "batch", pooling: Pooling = "cls", compress_padding: bool = True,
                 min_genes: int = MIN_GENES, gene_key: str | None = None) -> None:
        if pooling not in POOLING_CHOICES:
            msg = f"pooling={pooling!r}; expected one of {POOLING_CHOICES}."
            raise ConfigError(msg)
        self.module = module
        self.genes = np.asarray(genes)
        self.config = config
        self.pooling = pooling
        self.compress_padding = compress_padding
        self.min_genes = min_genes
        self.gene_key = gene_key
        self.key_max = key_max

    CHECKPOINT_FILE: ClassVar[str] = CHECKPOINT_FILE
    REFERENCE_H5AD: ClassVar[str] = REFERENCE_H5AD
    MODEL_LABEL: ClassVar[str] = "CellLM"

    @staticmethod
    def _default_config(config_path: Path) -> CellLMConfig:
        return CellLMConfig.from_official(config_path) if config_path.exists() else CellLMConfig()

    @staticmethod
    def _build(config: CellLMConfig) -> PerformerLM:
        return build_celllm_model(config)

    @staticmethod
    def _missing_genes_message(folder: Path, config: CellLMConfig) -> str:
        return (f"{folder}: no gene list ({REFERENCE_H5AD} or genes.txt) beside the checkpoint. "
                f"Pass genes=PATH: the var_names of OpenBioMed's CTC data, {config.gene_num} genes.")

    @staticmethod
    def _gene_count_message(genes: Any, n_genes: int, config: CellLMConfig) -> str:
        shown = genes if isinstance(genes, str | Path) else "genes"
        return (f"{shown}: {n_genes} genes, but the model has gene_num={config.gene_num}. "
                "Pass the gene order the checkpoint was trained on.")

    @staticmethod
    def _checkpoint_fix(config: CellLMConfig) -> str:
        return "Pass config=CellLMConfig.from_official(the cellLM.json it was trained with)."

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path | None = None, *, config: CellLMConfig | None = None,
                        genes: str | Path | Sequence[str] | None = None, key_max: KeyMax = "batch",
                        pooling: Pooling = "cls", compress_padding: bool = True, min_genes: int = MIN_GENES,
                        gene_key: str | None = None, device: str | None = None, **options: Any) -> CellLMEncoder:
        """Load ``checkpoint4_fixed.pth`` (a file, or its folder with the gene list and optional config).

        As ``CTCModel``: ``torch.load(ckpt_path)['model_state_dict']``, here with ``weights_only=True``.
        The gene2vec table (with its CLS and PAD rows) is inside the checkpoint. ``config`` defaults to
        ``config.json`` beside the checkpoint (OpenBioMed layout), else the published one.

        Raises
        ------
        CheckpointError
            When keys are missing, unexpected or mis-shaped, or the file is corrupted.
        WeightsNotFoundError
            When nothing is given and nothing is cached.
        """
        module, gene_list, config, checkpoint = cls._load_official(path_or_name, config=config, genes=genes,
                                                                   device=device, options=options)
        encoder = cls(module, gene_list, config, key_max=key_max, pooling=pooling,
                      compress_padding=compress_padding, min_genes=min_genes, gene_key=gene_key)
        encoder.checkpoint_sha256 = sha256_file(checkpoint)
        log.info("loaded CellLM from %s (%d genes, key_max=%s, pooling=%s)", checkpoint, gene_list.size,
                 key_max, pooling)
        return encoder

    def tokenize(self, adata: ad.AnnData, *, layer: str | None = None) -> TokenizedCells:
        """Preprocess as scBERT, then keep the expressed genes in index order, truncated to fit CLS + genes."""
        matrix, kept, dropped, n_matched = preprocessed_cells(
            adata, self.genes, layer=layer, gene_key=self.gene_key, min_genes=self.min_genes, model=self.name)
        per_row = np.diff(matrix.indptr)
        rank_in_row = np.arange(matrix.nnz) - np.repeat(matrix.indptr[:-1], per_row)
        keep = rank_in_row < self.config.max_seq_len - 1  # CLS takes one of max_seq_len slots
        n_tokens = np.minimum(per_row, self.config.max_seq_len - 1)
        tokens = np.minimum(np.trunc(matrix.data[keep]), self.config.max_bin).astype(np.int8)
        return TokenizedCells(
            cell_index=kept,
            lengths=(n_tokens + 1).astype(np.int64),
            arrays={"offsets": flat_offsets(n_tokens), "gene_ids": matrix.indices[keep].astype(np.int32),
                    "tokens": tokens},
            dropped=dropped,
            n_genes_matched=n_matched,
            gene_known=known_gene_columns(adata, self.genes, gene_key=self.gene_key),
        )

    def collate(self, tokens: TokenizedCells, rows: npt.NDArray[np.int64]) -> dict[str, torch.Tensor]:
        """Return ``input_ids``, ``gene_pos``, ``mask`` and (compressed padding) ``key_weight``.

        Padded literally, every cell has ``max_seq_len`` positions. Compressed, the batch is as long
        as its longest cell plus one pad slot; that slot's ``key_weight`` is the number of pads it
        stands for, and slots past it have weight 0 (they fill the rectangle and are ignored).
        """
        import torch

        config = self.config
        lengths = tokens.lengths[rows]
        if self.compress_padding:
            width = config.max_seq_len if lengths.max() >= config.max_seq_len else int(lengths.max()) + 1
        else:
            width = config.max_seq_len
        input_ids = np.full((rows.size, width), config.pad_token_id, dtype=np.int64)
        gene_pos = np.full((rows.size, width), config.pad_gene_id, dtype=np.int64)
        input_ids[:, 0] = config.cls_token_id
        gene_pos[:, 0] = config.cls_gene_id
        offsets = tokens.arrays["offsets"]
        starts, sizes = offsets[rows], offsets[rows + 1] - offsets[rows]
        entries = np.repeat(starts - np.cumsum(np.r_[0, sizes[:-1]]), sizes) + np.arange(sizes.sum())
        batch_row = np.repeat(np.arange(rows.size), sizes)
        column = 1 + entries - np.repeat(starts, sizes)
        input_ids[batch_row, column] = tokens.arrays["tokens"][entries]
        gene_pos[batch_row, column] = tokens.arrays["gene_ids"][entries]
        mask = np.arange(width)[None, :] < lengths[:, None]
        batch = {"input_ids": torch.from_numpy(input_ids), "gene_pos": torch.from_numpy(gene_pos),
                 "mask": torch.from_numpy(mask)}
        if self.compress_padding:
            weight = mask.astype(np.float32)
            has_pads = lengths < config.max_seq_len
            weight[np.flatnonzero(has_pads), lengths[has_pads]] = config.max_seq_len - lengths[has_pads]
            batch["key_weight"] = torch.from_numpy(weight)
        return batch

    def iter_batches(self, tokens: TokenizedCells, batch_size: int) -> Iterator[tuple[np.ndarray, dict]]:
        """Consecutive cells per batch when outputs depend on the batch (official), else length buckets."""
        if self.key_max == "batch":
            order = np.arange(tokens.n_cells)
            groups = [order[i : i + batch_size] for i in range(0, order.size, batch_size)]
        else:
            groups = length_buckets(tokens.lengths, batch_size)
        for rows in groups:
            yield rows, self.collate(tokens, rows)

    def hidden_states(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return the masked final hidden states (cells x positions x dim); pad rows are 0."""
        return self.module(batch["input_ids"], batch["gene_pos"], batch["mask"], batch.get("key_weight"),
                           return_encodings=True)

    def encode(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return the pooled embedding (``pooling``) of each cell of the batch."""
        hidden = self.hidden_states(batch)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch["mask"].to(hidden.dtype)
        if self.pooling == "mean":
            return hidden.sum(dim=1) / mask.sum(dim=1, keepdim=True)
        return hidden[:, 1:].sum(dim=1) / mask[:, 1:].sum(dim=1, keepdim=True).clamp(min=1)

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts.update(config=asdict(self.config), key_max=self.key_max, pooling=self.pooling,
                     compress_padding=self.compress_padding, n_genes=int(self.genes.size))
        return facts
