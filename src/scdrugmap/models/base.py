"""The encoder contract every foundation model and baseline follows, and the registry that finds them.

An encoder turns an AnnData into one embedding per cell. Torch models split that
into three steps so that training code can reuse them:

``tokenize(adata) -> TokenizedCells``
    the model's own preprocessing, vectorised over cells, as the official code does it;
``collate(tokens, rows) -> dict[str, Tensor]``
    one batch of model inputs for the chosen rows of ``tokens``;
``encode(batch) -> Tensor``
    a differentiable forward pass giving (cells x dim) embeddings with the official pooling.

``embed(adata)`` chains them with batches bucketed by length under ``torch.inference_mode``.
LoRA fine-tuning calls ``collate`` and ``encode`` directly with gradients on.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import numpy as np

from scdrugmap.data.schema import expression_matrix, require_value_kind
from scdrugmap.errors import CheckpointError, ConfigError, SchemaError
from scdrugmap.models.precision import resolve_dtype
from scdrugmap.models.weights import resolve_weights, sha256_file

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt
    import torch

    from scdrugmap.models.precision import BFloat16Parity, RunDtype
    from scdrugmap.models.weights import WeightsSource

log = logging.getLogger(__name__)

#: A callback told how many cells are done out of how many.
Progress = Callable[[int, int], None]


@dataclass
class TokenizedCells:
    """Model inputs for the cells of one AnnData, in the model's own encoding.

    Attributes
    ----------
    cell_index
        Row of ``adata`` each tokenized cell came from (cells the model drops are absent).
    lengths
        Sequence length per cell, used to bucket batches (all equal for fixed-length models).
    arrays
        The model's inputs, first axis per cell. Ragged sequences are stored flat with
        ``offsets`` (CSR style) under names the model chooses.
    dropped
        Reason per dropped cell: ``{row: reason}``.
    n_genes_matched
        How many of the data's genes the model's vocabulary knows.
    gene_known
        One entry per var column of the input: True where the model's vocabulary knows that column's gene
        (the matching that gives ``n_genes_matched``). `gene_overlap` turns it into a fraction per cell.
    """

    cell_index: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]
    arrays: dict[str, Any] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)
    n_genes_matched: int | None = None
    gene_known: npt.NDArray[np.bool_] | None = None

    @property
    def n_cells(self) -> int:
        return int(self.cell_index.shape[0])


#: Values per dense block read by `gene_overlap` (fewer rows per block where genes are many): 256 MiB of float64.
DENSE_BLOCK_VALUES = 2**25


def gene_overlap(adata: ad.AnnData, known: npt.ArrayLike, *, layer: str | None = None,
                 chunk_rows: int = 10_000) -> npt.NDArray[np.float32]:
    """Return, per cell, the fraction of its expressed genes that a model's vocabulary knows.

    Parameters
    ----------
    adata
        The cells, in memory or backed (``read_h5ad(path, backed=True)``): the matrix is read in blocks.
    known
        One bool per var column: True where the model knows the column's gene (`TokenizedCells.gene_known`).
    layer
        Expression to read (``adata.X`` when None).
    chunk_rows
        Rows per block (dense blocks hold at most `DENSE_BLOCK_VALUES` values). A CSC matrix is read in
        blocks of as many columns as hold about the same number of values, since slicing the rows of a
        backed CSC matrix reads all of it.

    Returns
    -------
    float32 array of ``n_obs``: expressed genes (value != 0) the vocabulary knows / expressed genes;
    NaN for a cell that expresses no gene.

    Raises
    ------
    SchemaError
        When ``known`` does not have one entry per var column.
    """
    import scipy.sparse as sp

    known = np.asarray(known, dtype=bool).ravel()
    if known.shape[0] != adata.n_vars:
        msg = f"gene_overlap: {known.shape[0]} vocabulary flags for {adata.n_vars} var columns; give one per column."
        raise SchemaError(msg)
    X = expression_matrix(adata, layer)
    n_cells, n_genes = adata.n_obs, adata.n_vars
    expressed = np.zeros(n_cells, dtype=np.int64)
    hits = np.zeros(n_cells, dtype=np.int64)
    weights = known.astype(np.float32)

    def count(block, columns: slice) -> tuple[np.ndarray, np.ndarray]:
        """Return (expressed genes, known expressed genes) per row of a block of ``columns``."""
        if sp.issparse(block):
            block = sp.csc_matrix(block) if block.format == "csc" else sp.csr_matrix(block)
            # 1 where a value is stored and non-zero: two mat-vec products count exactly (far below 2**24)
            pattern = type(block)(((block.data != 0).astype(np.float32), block.indices, block.indptr),
                                  shape=block.shape)
            totals = pattern @ np.ones(block.shape[1], dtype=np.float32), pattern @ weights[columns]
            return np.rint(totals[0]).astype(np.int64), np.rint(totals[1]).astype(np.int64)
        nonzero = np.asarray(block) != 0
        return nonzero.sum(axis=1), nonzero[:, known[columns]].sum(axis=1)

    chunk_rows = max(1, int(chunk_rows))
    # scipy or anndata's backed CSR/CSC datasets have a format; numpy and h5py datasets are dense
    layout = getattr(X, "format", None) if sp.issparse(X) or hasattr(X, "format") else "dense"
    if layout == "csc":
        step = max(1, -(-chunk_rows * n_genes // max(1, n_cells)))
        for start in range(0, n_genes, step):
            columns = slice(start, min(start + step, n_genes))
            block_expressed, block_hits = count(X[:, columns], columns)
            expressed += block_expressed
            hits += block_hits
    else:
        if layout == "dense":
            chunk_rows = min(chunk_rows, max(1, DENSE_BLOCK_VALUES // max(1, n_genes)))
        for start in range(0, n_cells, chunk_rows):
            block = X[start : start + chunk_rows]
            stop = start + block.shape[0]
            expressed[start:stop], hits[start:stop] = count(block, slice(None))
    with np.errstate(invalid="ignore", divide="ignore"):
        overlap = hits / expressed
    return np.where(expressed > 0, overlap, np.nan).astype(np.float32)


def length_buckets(lengths: npt.NDArray[np.int64], batch_size: int) -> list[npt.NDArray[np.int64]]:
    """Split row positions into batches of similar length (longest first), so padding stays small."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, order.size, batch_size)]


class Encoder(ABC):
    """One model that turns cells into embeddings.

    Class attributes the pipeline reads (like drevalpy's model flags):

    ``name``: the registry key; ``family``: ``"scfm"``, ``"llm"`` or ``"baseline"``;
    ``input_kind``: ``"counts"`` (needs raw counts), ``"nonnegative"`` (ranks genes) or ``"any"``;
    ``lora_targets``: module names LoRA adapts (empty when LoRA does not apply).
    """

    name: ClassVar[str]
    family: ClassVar[Literal["scfm", "llm", "baseline"]] = "scfm"
    input_kind: ClassVar[Literal["counts", "nonnegative", "any"]] = "counts"
    lora_targets: ClassVar[tuple[str, ...]] = ()
    #: Extra peft ``LoraConfig`` settings the architecture needs (e.g. GPT-2's Conv1D: fan_in_fan_out=True).
    lora_options: ClassVar[Mapping[str, Any]] = {}
    #: Official weights per variant name; the first is the default (see `scdrugmap.models.weights`).
    weights_sources: ClassVar[Mapping[str, WeightsSource]] = {}

    #: True when a cell's embedding depends only on that cell (no batch-wide statistics, no cell-to-cell
    #: attention, no random stream shared across cells, nothing fitted on the data set), so the cells can be
    #: embedded in shards on different workers with identical results (see `scdrugmap.models.sharded`).
    #: Checked for every model in tests/models/test_benchmark_integration.py.
    shardable: ClassVar[bool] = False

    #: sha256 of the loaded checkpoint (or of its main file), recorded in results and uns.
    checkpoint_sha256: str | None = None

    #: Set by `embed`: per input cell, the fraction of its expressed genes the model's vocabulary knows
    #: (float32, NaN for a cell with no expressed gene; see `gene_overlap`). None before a call, and for
    #: models that read every gene (baselines).
    gene_overlap_: npt.NDArray[np.float32] | None = None

    @property
    @abstractmethod
    def embedding_dim(self) -> int:
        """Width of the embeddings this encoder returns."""

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path_or_name: str | Path | None = None, **options: Any) -> Encoder:
        """Load the official checkpoint from a folder or file, the cache, or a download."""

    def check_input(self, adata: ad.AnnData, *, layer: str | None = None) -> None:
        """Refuse expression this model cannot read (see `input_kind`)."""
        require_value_kind(adata, needs=self.input_kind, model=self.name, layer=layer)

    @abstractmethod
    def embed(
        self, adata: ad.AnnData, *, layer: str | None = None, batch_size: int | None = None,
        progress: Progress | None = None
    ) -> npt.NDArray[np.float32]:
        """Return (n_obs x embedding_dim) float32 embeddings; rows of dropped cells are NaN.

        ``batch_size`` None means the model's own default (`default_batch_size`); models whose
        official outputs depend on the batch (cells attending to cells) batch as the official code.
        """

    def to_device(self, device: str) -> Encoder:
        """Move the model to ``device`` ("cpu", "cuda", "cuda:1"); encoders without a network ignore it."""
        return self

    def use_dtype(self, dtype: str | None = "auto") -> Encoder:
        """Run forward passes in ``dtype`` (see `scdrugmap.models.precision`); encoders without a network
        compute in float32 whatever is asked."""
        resolve_dtype(type(self), dtype, "cpu")
        return self

    @property
    def compute_dtype(self) -> str:
        """The dtype forward passes run in ("float32", "bfloat16", "float16"), recorded with the embeddings."""
        return "float32"

    def describe(self) -> dict[str, Any]:
        """Return facts shown by ``scdrugmap models info``."""
        return {"name": self.name, "family": self.family, "input": self.input_kind,
                "embedding_dim": self.embedding_dim, "lora_targets": list(self.lora_targets)}


class TorchEncoder(Encoder):
    """An encoder backed by a ``torch.nn.Module`` (`module`), split into tokenize / collate / encode."""

    module: torch.nn.Module
    #: Cells per forward pass when the caller does not say.
    default_batch_size: ClassVar[int] = 32
    #: Mixed precision the official inference uses on GPU ("float16", "bfloat16"), None for float32: what
    #: ``dtype="auto"`` means on CUDA (`scdrugmap.models.precision.default_dtype`). CPU results stay float32.
    gpu_autocast: ClassVar[str | None] = None
    #: bfloat16 against float32 as benchmarks/bench_bf16.py measures it, for a model added by a plug-in (the
    #: built-in models' rows are in `scdrugmap.models.precision.MEASURED_PARITY`). ``dtype="bfloat16"`` is
    #: refused unless it holds, and by every model with none (`scdrugmap.models.precision.refuse_bfloat16`).
    bfloat16_parity: ClassVar[BFloat16Parity | None] = None
    #: How bfloat16 is applied: ``autocast`` (weights stay float32; matmuls and attention in bfloat16, norms
    #: and softmax in float32) or ``weights`` (the network cast to bfloat16: half the memory of a large LM;
    #: `load_encoder` then asks the loader for its ``dtype`` option, so the weights are read in bfloat16).
    bfloat16_mode: ClassVar[Literal["autocast", "weights"]] = "autocast"
    #: Autocast dtype in use (set by `to_device` / `use_dtype`, or by a model's own option); None runs in the
    #: weights' dtype.
    autocast_dtype: torch.dtype | None = None
    #: The dtype asked for with `use_dtype`, resolved again when the model moves; None until asked.
    dtype_choice: str | None = None

    @abstractmethod
    def tokenize(self, adata: ad.AnnData, *, layer: str | None = None) -> TokenizedCells:
        """Preprocess cells exactly as the official embedding path does, vectorised."""

    @abstractmethod
    def collate(self, tokens: TokenizedCells, rows: npt.NDArray[np.int64]) -> dict[str, torch.Tensor]:
        """Build one batch of model inputs for positions ``rows`` of ``tokens``."""

    @abstractmethod
    def encode(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Run the model on one batch and pool to (cells x dim); differentiable."""

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to_device(self, device: str) -> TorchEncoder:
        """Move the network to ``device``; on CUDA use the official inference's autocast (`gpu_autocast`).

        A dtype asked for with `use_dtype` is resolved again for the new device.
        """
        import torch

        target = torch.device(device)
        self.module.to(target)
        if self.dtype_choice is not None:
            self.use_dtype(self.dtype_choice)
        elif target.type == "cuda" and self.gpu_autocast and self.autocast_dtype is None:
            self.autocast_dtype = getattr(torch, self.gpu_autocast)
        return self

    def use_dtype(self, dtype: str | None = "auto") -> TorchEncoder:
        """Run forward passes in ``dtype`` on the model's device (`scdrugmap.models.precision.resolve_dtype`).

        Raises
        ------
        ConfigError
            When ``dtype`` is unknown, or bfloat16 is asked of a model whose parity does not hold.
        """
        resolved = resolve_dtype(type(self), dtype, str(self.device))
        self.dtype_choice = dtype or "auto"
        return self.apply_dtype(resolved)

    def apply_dtype(self, dtype: RunDtype) -> TorchEncoder:
        """Run forward passes in ``dtype`` without checking the model's parity: for benchmarks that measure it.

        Everything else calls `use_dtype`. `bfloat16_mode` says whether the weights are cast or autocast is used;
        a network cast to bfloat16 and back to float32 keeps bfloat16-rounded weights (reload it instead).
        """
        import torch

        if self.bfloat16_mode == "weights":
            if dtype == "float32" and self.compute_dtype != "float32":
                log.warning("%s: casting bfloat16 weights back to float32 keeps their rounding; reload the model for "
                            "float32 results", self.name)
            self.module.to(getattr(torch, dtype))
            self.autocast_dtype = None
        else:
            self.autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)
        log.debug("%s runs in %s on %s", self.name, dtype, self.device)
        return self

    @property
    def compute_dtype(self) -> str:
        if self.autocast_dtype is not None:
            return str(self.autocast_dtype).removeprefix("torch.")
        if self.bfloat16_mode == "weights":  # the network's own dtype (an LM may be loaded in bfloat16)
            found = next((p.dtype for p in self.module.parameters() if p.is_floating_point()), None)
            return "float32" if found is None else str(found).removeprefix("torch.")
        return "float32"

    def autocast(self):
        """Return the autocast context of a forward pass: mixed precision when set (`use_dtype`), else a no-op."""
        import contextlib

        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def iter_batches(self, tokens: TokenizedCells, batch_size: int) -> Iterator[tuple[np.ndarray, dict]]:
        """Yield (rows, batch) in length buckets, longest first."""
        for rows in length_buckets(tokens.lengths, batch_size):
            yield rows, self.collate(tokens, rows)

    def embed_tokens(
        self, tokens: TokenizedCells, *, batch_size: int | None = None, progress: Progress | None = None
    ) -> npt.NDArray[np.float32]:
        """Return (tokens.n_cells x dim) embeddings in token order."""
        import torch

        batch_size = batch_size or self.default_batch_size
        out = np.empty((tokens.n_cells, self.embedding_dim), dtype=np.float32)
        done = 0
        self.module.eval()
        with torch.inference_mode():
            for rows, batch in self.iter_batches(tokens, batch_size):
                batch = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}
                with self.autocast():
                    pooled = self.encode(batch)
                out[rows] = pooled.float().cpu().numpy()
                done += rows.size
                if progress is not None:
                    progress(done, tokens.n_cells)
        return out

    def embed(
        self, adata: ad.AnnData, *, layer: str | None = None, batch_size: int | None = None,
        progress: Progress | None = None
    ) -> npt.NDArray[np.float32]:
        start = time.perf_counter()
        log.info("embedding %d cells with %s", adata.n_obs, self.name)
        self.check_input(adata, layer=layer)
        self.gene_overlap_ = None
        tokens = self.tokenize(adata, layer=layer)
        self.measure_gene_overlap(adata, tokens, layer=layer)
        if tokens.dropped:
            log.warning("%s dropped %d of %d cells (e.g. %s)", self.name, len(tokens.dropped), adata.n_obs,
                        next(iter(tokens.dropped.values())))
        embeddings = np.full((adata.n_obs, self.embedding_dim), np.nan, dtype=np.float32)
        embeddings[tokens.cell_index] = self.embed_tokens(tokens, batch_size=batch_size, progress=progress)
        log.info("    finished embedding with %s in %.1fs", self.name, time.perf_counter() - start)
        return embeddings

    def measure_gene_overlap(self, adata: ad.AnnData, tokens: TokenizedCells | None = None, *,
                             layer: str | None = None) -> npt.NDArray[np.float32] | None:
        """Set and return `gene_overlap_` for ``adata`` from ``tokens.gene_known`` (tokenizing when not given).

        None when the tokenizer reports no per-gene matching.
        """
        if tokens is None:
            tokens = self.tokenize(adata, layer=layer)
        known = tokens.gene_known
        self.gene_overlap_ = None if known is None else gene_overlap(adata, known, layer=layer)
        return self.gene_overlap_

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts["parameters"] = sum(p.numel() for p in self.module.parameters())
        return facts


HubEncoderT = TypeVar("HubEncoderT", bound="HubModelEncoder")


class HubModelEncoder(TorchEncoder):
    """A network plus a tokenizer object, loaded from an official Hugging Face model folder.

    Geneformer and tGPT have this shape: a folder with ``config.json`` and one weights file of
    `weight_files`; a tokenizer whose ``tokenize(adata, layer=...)`` gives `TokenizedCells` with flat
    ``input_ids`` and their ``offsets``; batches right-padded with the tokenizer's pad id. What they share
    lives here: the constructor, ``tokenize``, ``collate``, and the steps of ``from_pretrained`` that do
    not depend on the model (`_check_options`, `_locate_weights`, `_assemble`).

    Subclasses set `model_label`, `folder_hint` and `known_options`, implement `pad_token_id`, and build
    their config, tokenizer and network in ``from_pretrained``.

    Parameters
    ----------
    module
        The network with loaded weights.
    tokenizer
        The model's tokenizer.
    checkpoint_sha256
        sha256 of the weights file.
    """

    #: The model's name in messages ("Geneformer", "tGPT").
    model_label: ClassVar[str]
    #: Weights files looked for in a model folder, in this order.
    weight_files: ClassVar[tuple[str, ...]] = ("model.safetensors", "pytorch_model.bin")
    #: The end of the message when a folder holds no weights file: what to point to instead.
    folder_hint: ClassVar[str]
    #: Options ``from_pretrained`` accepts (others are refused by `_check_options`).
    known_options: ClassVar[frozenset[str]]

    def __init__(self, module: torch.nn.Module, tokenizer: Any, *, checkpoint_sha256: str | None = None) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.checkpoint_sha256 = checkpoint_sha256

    @property
    @abstractmethod
    def pad_token_id(self) -> int:
        """The token id ``collate`` pads with."""

    @classmethod
    def _check_options(cls, options: Mapping[str, Any]) -> None:
        """Refuse options ``from_pretrained`` does not know.

        Raises
        ------
        ConfigError
            Naming the unknown options and the known ones.
        """
        if unknown := sorted(set(options) - cls.known_options):
            msg = f"unknown {cls.model_label} options {unknown}; known: {sorted(cls.known_options)}."
            raise ConfigError(msg)

    @classmethod
    def _locate_weights(cls, variant_or_path: str | Path | None) -> tuple[Path, Path]:
        """Return (model folder, weights file) of a variant of `weights_sources` (None: the first) or a path.

        A variant is resolved through the cache (downloaded when missing); a path is a model folder or the
        weights file itself.

        Raises
        ------
        CheckpointError
            When the path does not exist, or the folder holds none of `weight_files`.
        """
        if variant_or_path is None or str(variant_or_path) in cls.weights_sources:
            source = cls.weights_sources[str(variant_or_path or next(iter(cls.weights_sources)))]
            location = resolve_weights(source)
        else:
            location = Path(variant_or_path).expanduser()
            if not location.exists():
                msg = (f"{location}: no such file or folder, and not a {cls.model_label} variant "
                       f"({', '.join(cls.weights_sources)}).")
                raise CheckpointError(msg)
        folder = location if location.is_dir() else location.parent
        weights_path = location if location.is_file() else next(
            (folder / f for f in cls.weight_files if (folder / f).is_file()), None)
        if weights_path is None:
            msg = f"{folder}: no {' or '.join(cls.weight_files)}. {cls.folder_hint}"
            raise CheckpointError(msg)
        return folder, weights_path

    @classmethod
    def _assemble(cls: type[HubEncoderT], module: torch.nn.Module, tokenizer: Any, weights_path: Path, *,
                  device: str | None = None) -> HubEncoderT:
        """Move the loaded network to ``device`` (when given) and return the encoder, with the file's sha256."""
        if device:
            module.to(device)
        return cls(module, tokenizer, checkpoint_sha256=sha256_file(weights_path))

    def tokenize(self, adata: ad.AnnData, *, layer: str | None = None) -> TokenizedCells:
        return self.tokenizer.tokenize(adata, layer=layer)

    def collate(self, tokens: TokenizedCells, rows: npt.NDArray[np.int64]) -> dict[str, torch.Tensor]:
        """Right-pad the chosen cells with `pad_token_id` to the batch's longest; ``attention_mask`` is 1 on tokens."""
        import torch

        rows = np.asarray(rows, dtype=np.int64)
        flat, offsets = tokens.arrays["input_ids"], tokens.arrays["offsets"]
        lengths = offsets[rows + 1] - offsets[rows]
        width = int(lengths.max(initial=1))
        positions = np.arange(width)
        mask = positions[None, :] < lengths[:, None]
        index = np.where(mask, offsets[rows][:, None] + positions[None, :], 0)
        ids = np.where(mask, flat[index] if flat.size else 0, self.pad_token_id)
        return {"input_ids": torch.from_numpy(ids.astype(np.int64)),
                "attention_mask": torch.from_numpy(mask.astype(np.int64))}


# --- registry -------------------------------------------------------------------------------------------

#: Built-in encoders: registry key -> "module:Class". Modules are imported only when used,
#: so listing models never imports torch or transformers.
BUILTIN_ENCODERS: dict[str, str] = {
    "pca": "scdrugmap.models.baselines:PCAEncoder",
    "hvg": "scdrugmap.models.baselines:HVGEncoder",
    "majority": "scdrugmap.models.baselines:MajorityEncoder",
    "geneformer": "scdrugmap.models.geneformer:GeneformerEncoder",
    "tgpt": "scdrugmap.models.tgpt:TGPTEncoder",
    "scgpt": "scdrugmap.models.scgpt:ScGPTEncoder",
    "scfoundation": "scdrugmap.models.scfoundation:ScFoundationEncoder",
    "uce": "scdrugmap.models.uce:UCEEncoder",
    "cellplm": "scdrugmap.models.cellplm:CellPLMEncoder",
    "scbert": "scdrugmap.models.scbert:ScBERTEncoder",
    "celllm": "scdrugmap.models.celllm:CellLMEncoder",
    "minilm": "scdrugmap.models.llm:MiniLMEncoder",
    "llm": "scdrugmap.models.llm:LLMEncoder",
}
ENTRY_POINT_GROUP = "scdrugmap.encoders"

#: Size of each built-in model's default published variant: (parameters, embedding width, variant), from the
#: state-dict key lists in ../shared/golden/*/keys_full.json and the model cards. Shown by `models list`
#: without loading any weights; None where the size depends on the data (baselines).
PUBLISHED_SIZES: dict[str, tuple[int | None, int | None, str]] = {
    "geneformer": (10_288_722, 256, "Geneformer-V1-10M"),
    "tgpt": (123_478_016, 1024, "transcriptome-gpt-1024-8-16-64"),
    "scgpt": (51_330_049, 512, "scGPT_human"),
    "scfoundation": (99_941_692, 3072, "models.ckpt (encoder path)"),
    "uce": (106_066_177, 1280, "4layer (plus the 145,469 x 5,120 protein-token table)"),
    "cellplm": (65_827_344, 512, "20230926_85M (without the pretraining decoder)"),
    "scbert": (8_388_607, 200, "panglao_pretrain"),
    "celllm": (51_926_536, 512, "CellLM"),
    "minilm": (22_713_216, 384, "all-MiniLM-L6-v2"),
    "llm": (8_030_261_248, 4096, "Meta-Llama-3-8B"),
    "pca": (None, 50, "50 components of 2,000 HVGs"),
    "hvg": (None, 2000, "2,000 HVGs"),
    "majority": (None, 0, "class prior"),
}


def registry() -> dict[str, str]:
    """Return every known encoder: built-ins, then those other packages register by entry point."""
    found = dict(BUILTIN_ENCODERS)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name.lower(), entry.value)
    return found


def get_encoder_class(name: str) -> type[Encoder]:
    """Return the encoder class registered under ``name``.

    Raises
    ------
    ConfigError
        When no encoder has that name.
    """
    key = name.lower()
    target = BUILTIN_ENCODERS.get(key)  # built-ins come first in `registry`: no entry points to read for them
    if target is None:
        known = registry()
        if key not in known:
            msg = f"unknown model {name!r}; known models: {', '.join(sorted(known))}. See `scdrugmap models list`."
            raise ConfigError(msg)
        target = known[key]
    module_name, _, class_name = target.partition(":")
    return getattr(import_module(module_name), class_name)


def resolve_device(device: str | None = "auto") -> str:
    """Return the torch device to use: ``auto`` (or None) picks CUDA when a GPU is visible, else the CPU.

    Raises
    ------
    ConfigError
        When CUDA is asked for and no GPU is visible, or the name is not a device.
    """
    import torch

    name = (device or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        msg = f"--device {device} is not a device; use auto, cpu, cuda or cuda:N."
        raise ConfigError(msg)
    if name.startswith("cuda") and not torch.cuda.is_available():
        msg = f"--device {device}: no CUDA GPU is visible to this process; use --device cpu (or auto)."
        raise ConfigError(msg)
    return name


def load_encoder(name: str, weights: str | Path | None = None, *, device: str | None = None,
                 dtype: str | None = None, **options: Any) -> Encoder:
    """Instantiate a registered encoder from its weights (a path, or the cache/download when None).

    ``device`` ("auto", "cpu", "cuda") moves the model there after loading; None leaves it where the
    model's own loader put it. ``dtype`` ("auto", "float32", "bfloat16"; see `scdrugmap.models.precision`)
    is checked before any weights are read, then applied; None leaves the loader's choice.
    """
    cls = get_encoder_class(name)
    # a refusal does not depend on the device: refuse before reading weights
    wanted = resolve_dtype(cls, dtype, "cpu") if dtype is not None and issubclass(cls, TorchEncoder) else None
    if wanted == "bfloat16" and getattr(cls, "bfloat16_mode", None) == "weights":
        options.setdefault("dtype", "bfloat16")  # load in it: never a float32 copy of a large LM
    encoder = cls.from_pretrained(weights, **options)
    if device is not None:
        encoder = encoder.to_device(resolve_device(device))
    return encoder if dtype is None else encoder.use_dtype(dtype)
