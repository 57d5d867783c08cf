"""Geneformer V1 and V2 as a scDrugMap encoder: rank-value tokenizer and BERT cell embeddings.

Papers: Theodoris et al., "Transfer learning enables predictions in network biology", Nature 618,
616-624 (2023) (V1, Genecorpus-30M); Chen et al., "Quantized multi-task learning for context-specific
representations of gene network dynamics", bioRxiv 2024.08.16.608180 (V2, ~104M cells).
Official code and weights: https://huggingface.co/ctheodoris/Geneformer @ ``05fcbeb8a27d49e0a7a4349152202ee2c1cbfd28``
(``geneformer/tokenizer.py``: ``TranscriptomeTokenizer``, ``sum_ensembl_ids``, ``rank_genes``;
``geneformer/emb_extractor.py``: ``EmbExtractor.extract_embs``/``get_embs``;
``geneformer/perturber_utils.py``: ``load_model``, ``mean_nonpadding_embs``).

Input
    Non-negative expression; the authors feed raw counts with ``obs['n_counts']`` (total counts per cell) and
    ``var['ensembl_id']``. Each cell's ranking depends only on ``count / median[gene]`` (``n_counts`` is a
    per-cell constant), so any per-cell-scaled expression (TPM) ranks alike.
Tokens
    ``count / n_counts * 10_000 / median[gene]`` in float64 for the genes of the model's dictionary,
    sorted descending ("rank value encoding"), truncated to 2,048 genes (V1) or 4,094 genes framed by
    ``<cls>`` and ``<eos>`` (V2). Ensembl ids are upper-cased and mapped through the official mapping
    dictionary; columns that map to the same id are summed. Cells with ``filter_pass != 1`` and cells with
    no dictionary gene are dropped, as the official h5ad path does.
Model
    The Hugging Face ``BertModel`` of ``transformers`` (the published ``BertForMaskedLM`` without its
    pretraining head), with SDPA attention. Parameter names are the official state-dict keys. Variants
    are subfolders of the official repository: ``Geneformer-V1-10M`` (formerly ``gf-6L-30M-i2048``),
    ``gf-12L-30M-i2048`` (V1, 12 layers), ``gf-12L-95M-i4096`` (V2, gc95M), ``Geneformer-V2-104M``,
    ``Geneformer-V2-104M_CLcancer`` and ``Geneformer-V2-316M`` (see `WEIGHTS_SOURCES`).
Dictionaries
    The official token, median and mapping dictionaries are pickles; they are read with a restricted
    unpickler (`load_dictionary`) that can build nothing but dicts of strings and numbers.
Pooling
    ``EmbExtractor(emb_mode="cell", emb_layer=-1)``: the mean over the non-padding positions of
    ``hidden_states[n_layers - 1]``, the output of the penultimate layer; V2 leaves ``<cls>`` and ``<eos>``
    out of the mean. ``pooling="cls"`` gives the ``<cls>`` state (``emb_mode="cls"``, V2 only); ``emb_layer=0``
    the last layer. Only the layers up to the chosen one are run.

Ties. The official ranking is ``np.argsort(-values)`` (quicksort, not stable), so genes with exactly equal
values come out in a platform-dependent order. Here ties keep gene-column order (a stable sort over the
columns as the official h5ad path lays them out after collapsing duplicates): reproducible everywhere, and
equal to the official output outside tie groups and as a multiset inside them.

Quirks of the official code and what this module does about them:

* ``EmbExtractor`` hard-codes CUDA; here any device works.
* ``EmbExtractor(max_ncells=1000)`` silently sub-samples larger inputs; every cell is embedded here.
* ``EmbExtractor``'s default ``emb_mode`` is ``"cls"`` for V2 and ``"cell"`` for V1; scDrugMap pools with
  the mean for both by default (``pooling="cls"`` gives the V2 default).
* The official h5ad path sums duplicated ids only when the mapping renames some id onto another; two
  columns carrying the *same* id are otherwise tokenized twice. Here duplicates are always summed.
* Explicitly stored zeros in a sparse ``X`` reach the official h5ad ranking as zero values (last ranks);
  here zeros are dropped, as the tokenizer's contract (and its loom path) says.
* A dense ``X`` is normalised by true division in the official code, a sparse one by multiplying with
  reciprocals; both are reproduced bit for bit, since the last bit decides near-ties.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from scdrugmap.data.schema import expression_matrix
from scdrugmap.errors import CheckpointError, ConfigError, SchemaError
from scdrugmap.models.base import TokenizedCells, TorchEncoder
from scdrugmap.models.weights import WeightsSource, hf_file, resolve_weights, sha256_file

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

log = logging.getLogger(__name__)

# --- official constants ---------------------------------------------------------------------------------

HF_REPO = "ctheodoris/Geneformer"
#: The Hugging Face commit the golden fixture was made from (layout: Geneformer-V1-10M/, Geneformer-V2-*/).
HF_REVISION = "05fcbeb8a27d49e0a7a4349152202ee2c1cbfd28"
#: A commit from before the 2025 re-organisation, for the folders it removed (gf-12L-30M-i2048/,
#: gf-12L-95M-i4096/ and the *_gc95M.pkl dictionaries). Taken from a public report of that commit; the
#: file list at it could not be checked offline.
HF_LEGACY_REVISION = "a13a2cfc39aeaf4a2d223502930a6d041277d6f0"

#: Scale of the per-cell normalisation (tokenizer.py: tokenize_anndata(target_sum=10_000)).
TARGET_SUM = 10_000
#: Input sizes (tokenizer.py: model_version "V1" -> model_input_size=2048, special_token=False;
#: defaults model_input_size=4096, special_token=True for V2).
V1_INPUT_SIZE = 2048
V2_INPUT_SIZE = 4096
#: Special tokens of the token dictionaries (<pad>=0 and <mask>=1 in both; V2 adds <cls>=2, <eos>=3).
PAD_TOKEN, MASK_TOKEN, CLS_TOKEN, EOS_TOKEN = "<pad>", "<mask>", "<cls>", "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, MASK_TOKEN, CLS_TOKEN, EOS_TOKEN)
#: obs/var columns the official tokenizer reads (tokenizer.py: sum_ensembl_ids, tokenize_anndata).
N_COUNTS_KEY = "n_counts"
FILTER_PASS_KEY = "filter_pass"
GENE_ID_KEY = "ensembl_id"
#: emb_extractor.py: EmbExtractor(emb_layer=-1) -> hidden_states[n_layers - 1], the 2nd-to-last layer.
DEFAULT_EMB_LAYER = -1
#: Vocabulary sizes of the two dictionaries (gc30M: 25,426 tokens; gc104M == gc95M: 20,275 tokens).
V1_VOCAB_SIZE = 25_426
V2_VOCAB_SIZE = 20_275

#: Dictionary file names per version, in the order they are looked for (official names first; the
#: shared copies in ../shared/vocab and the pre-2024 repository use the others).
DICTIONARY_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "V1": {
        "token": ("token_dictionary_gc30M.pkl", "geneformer_token_dictionary.pkl", "token_dictionary.pkl"),
        "median": ("gene_median_dictionary_gc30M.pkl", "geneformer_gene_median_dictionary.pkl",
                   "gene_median_dictionary.pkl"),
        "mapping": ("ensembl_mapping_dict_gc30M.pkl",),
    },
    "V2": {
        "token": ("token_dictionary_gc104M.pkl", "token_dictionary_gc95M.pkl"),
        "median": ("gene_median_dictionary_gc104M.pkl", "gene_median_dictionary_gc95M.pkl"),
        "mapping": ("ensembl_mapping_dict_gc104M.pkl", "ensembl_mapping_dict_gc95M.pkl"),
    },
}
#: Where the dictionaries sit relative to a model folder inside a clone of the official repository.
DICTIONARY_SUBDIRS = {"V1": ("geneformer/gene_dictionaries_30m", "geneformer"), "V2": ("geneformer",)}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"


# --- dictionaries: a restricted unpickler ---------------------------------------------------------------

#: numpy dtype codes a dictionary may hold, with their struct format (the only numpy globals allowed).
_STRUCT_FORMATS = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q",
                   "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "b1": "?"}


class _DtypeSpec:
    """Stand-in for ``numpy.dtype(code)`` while unpickling: holds a struct format, runs nothing."""

    def __init__(self, code: str) -> None:
        self.format = "<" + _STRUCT_FORMATS[code]

    def __setstate__(self, state: tuple) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"unexpected numpy dtype state {state!r}")
        self.format = {">": ">", "=": "="}.get(state[1], "<") + self.format[1:]


def _safe_dtype(code: Any, align: Any = False, copy: Any = True) -> _DtypeSpec:
    if not isinstance(code, str) or code not in _STRUCT_FORMATS:
        raise pickle.UnpicklingError(f"numpy dtype {code!r} is not allowed in a dictionary file")
    return _DtypeSpec(code)


def _safe_scalar(spec: Any, data: Any = None) -> int | float | bool:
    if not isinstance(spec, _DtypeSpec) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar with an unexpected dtype or payload")
    try:
        return struct.unpack(spec.format, data)[0]
    except struct.error as err:
        raise pickle.UnpicklingError(f"numpy scalar of {len(data)} bytes for format {spec.format}") from err


class _DictionaryUnpickler(pickle.Unpickler):
    """Unpickle a plain ``dict`` whose values may be numpy scalars, and nothing else.

    ``pickle.load`` would import and call whatever a file names, so a tampered dictionary could run code.
    This unpickler resolves only two globals, to local functions that build no numpy objects from the
    stream: ``numpy.dtype`` (a code from a short list of numeric dtypes) and
    ``numpy.core.multiarray.scalar`` (bytes of exactly that dtype's size, read with ``struct.unpack``).
    Everything else in the stream can only be built-in containers, strings and numbers.
    """

    def find_class(self, module: str, name: str) -> Callable[..., Any]:
        if (module, name) == ("numpy", "dtype"):
            return _safe_dtype
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return _safe_scalar
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a dictionary file")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in a dictionary file")


def load_dictionary(path: str | Path, *, value_type: type) -> dict[str, Any]:
    """Read one official Geneformer dictionary pickle without running code from it.

    Parameters
    ----------
    path
        A ``*.pkl`` file of the official repository (token, median or mapping dictionary).
    value_type
        ``int`` (token ids), ``float`` (medians) or ``str`` (Ensembl mapping); values are converted to it.

    Returns
    -------
    A plain dict from gene id to plain Python values.

    Raises
    ------
    CheckpointError
        When the file is missing, is not a pickled dict of the expected types, or names any other global.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            loaded = _DictionaryUnpickler(handle).load()
    except FileNotFoundError as err:
        msg = f"{path}: Geneformer dictionary not found. Pass the official file or download the weights."
        raise CheckpointError(msg) from err
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        msg = f"{path}: not a Geneformer dictionary pickle ({err}). Download the official file again."
        raise CheckpointError(msg) from err
    if not isinstance(loaded, dict):
        msg = f"{path}: holds a {type(loaded).__name__}, expected a dict. Use the official dictionary file."
        raise CheckpointError(msg)
    accepted = (str,) if value_type is str else (int, float) if value_type is float else (int,)
    bad = [(k, v) for k, v in loaded.items()
           if not isinstance(k, str) or not isinstance(v, accepted) or isinstance(v, bool)]
    if bad:
        msg = (f"{path}: {len(bad)} entries are not str -> {value_type.__name__} (e.g. {bad[0]!r}). "
               "Use the official dictionary file.")
        raise CheckpointError(msg)
    return {k: value_type(v) for k, v in loaded.items()}


@dataclass(frozen=True)
class GeneformerVocabulary:
    """The three dictionaries of one Geneformer version, as the official tokenizer holds them.

    ``mapping`` is already restricted to values in ``token_ids`` (``TranscriptomeTokenizer.__init__``);
    without a mapping file it is the identity on the token dictionary's keys (the 2023 V1 tokenizer).
    """

    token_ids: dict[str, int]
    medians: dict[str, float]
    mapping: dict[str, str]
    version: Literal["V1", "V2"]

    @classmethod
    def from_files(cls, token_file: str | Path, median_file: str | Path, mapping_file: str | Path | None,
                   *, version: Literal["V1", "V2"]) -> GeneformerVocabulary:
        """Read the official dictionaries (see `load_dictionary`) and check they fit together.

        Raises
        ------
        CheckpointError
            When a dictionary is unreadable, a gene token has no median, or V2 lacks ``<cls>``/``<eos>``.
        """
        token_ids = load_dictionary(token_file, value_type=int)
        medians = load_dictionary(median_file, value_type=float)
        if mapping_file is not None:
            raw = load_dictionary(mapping_file, value_type=str)
        else:
            raw = {k: k for k in token_ids}
        mapping = {k: v for k, v in raw.items() if v in token_ids}
        no_median = [g for g in token_ids if g not in SPECIAL_TOKENS and g not in medians]
        if no_median:
            msg = (f"{median_file}: {len(no_median)} genes of {token_file} have no median (e.g. {no_median[:3]}). "
                   "Use the median and token dictionaries of the same Geneformer version.")
            raise CheckpointError(msg)
        if version == "V2" and not (CLS_TOKEN in token_ids and EOS_TOKEN in token_ids):
            msg = f"{token_file}: V2 needs <cls> and <eos> in the token dictionary; is this the V1 (gc30M) file?"
            raise CheckpointError(msg)
        return cls(token_ids=token_ids, medians=medians, mapping=mapping, version=version)

    @property
    def special_tokens(self) -> bool:
        """Whether cells are framed by ``<cls>``/``<eos>`` (V2)."""
        return self.version == "V2"

    def plan_genes(self, gene_ids: Sequence[str]) -> GenePlan:
        """Return how the columns ``gene_ids`` of a data set map onto dictionary genes (see `GenePlan`)."""
        # One dictionary look-up per gene (not per cell): var['ensembl_id'].str.upper().map(mapping).
        mapping = self.mapping
        collapsed = [mapping.get(str(g).upper()) for g in gene_ids]
        special = set(SPECIAL_TOKENS)
        column_list = [j for j, c in enumerate(collapsed) if c is not None and c not in special]
        columns = np.array(column_list, dtype=np.int64)
        id_list = [collapsed[j] for j in column_list]
        ids = np.array(id_list, dtype=object)
        counts = Counter(id_list)
        # sum_ensembl_ids (h5ad): columns whose id is unique keep their order, summed ids are appended
        # in order of first occurrence; this order breaks ties.
        if len(counts) == len(id_list):
            unique_mask, dup_ids = np.ones(len(id_list), dtype=bool), []
        else:
            unique_mask = np.array([counts[i] == 1 for i in id_list], dtype=bool)
            dup_ids = list(dict.fromkeys(i for i in id_list if counts[i] > 1))
        kept_ids = list(ids[unique_mask]) + dup_ids
        col_to_kept = np.full(len(gene_ids), -1, dtype=np.int64)
        col_to_kept[columns[unique_mask]] = np.arange(int(unique_mask.sum()))
        if dup_ids:
            dup_pos = {g: unique_mask.sum() + k for k, g in enumerate(dup_ids)}
            col_to_kept[columns[~unique_mask]] = [dup_pos[i] for i in ids[~unique_mask]]
        median_of, token_of = self.medians, self.token_ids
        medians = np.array([median_of[g] for g in kept_ids], dtype=np.float64)
        n_bits = max(1, (len(kept_ids) - 1).bit_length())
        return GenePlan(
            gene_of_column=np.where(col_to_kept >= 0, col_to_kept, 1 << n_bits).astype(np.uint32),
            dropped_gene=1 << n_bits,
            n_bits=n_bits,
            tokens=np.array([token_of[g] for g in kept_ids], dtype=np.int64),
            medians=medians,
            inverse_medians=np.divide(1.0, medians),
            has_duplicates=bool(dup_ids),
            n_matched=int(columns.size),
        )


@dataclass(frozen=True)
class GenePlan:
    """Column bookkeeping for one gene list.

    ``gene_of_column[j]`` is the index of column ``j``'s dictionary gene among the kept genes
    (``dropped_gene`` when the column is dropped); ``tokens`` and ``medians`` describe the kept genes in
    tie-breaking order; gene indices fit in ``n_bits`` bits.
    """

    gene_of_column: npt.NDArray[np.uint32]
    dropped_gene: int
    n_bits: int
    tokens: npt.NDArray[np.int64]
    medians: npt.NDArray[np.float64]
    inverse_medians: npt.NDArray[np.float64]
    has_duplicates: bool
    n_matched: int


@dataclass(frozen=True)
class _Lookup:
    """Per-entry tables of one tokenizer run, indexed by column (or by gene, once duplicates are summed).

    The last entry, ``pad``, serves padding slots (and dropped columns map to the same gene): its factors,
    1/median 0 and median inf, turn any count into the value 0, which ranks after every expressed gene.
    ``genes`` gives the gene index (the tie-breaking order; the padding gene comes after the last gene).
    """

    pad: int
    genes: np.ndarray
    inverse_medians: npt.NDArray[np.float64]
    medians: npt.NDArray[np.float64]
    used: npt.NDArray[np.bool_]


@dataclass(frozen=True)
class _Tables:
    """The look-up tables of one tokenizer run.

    ``tokens``, ``inverse_medians`` and ``medians`` are indexed by gene index, with one more entry for the
    padding gene; ``columns`` and ``genes`` (`_Lookup`) map a chunk's entries to them. ``field`` is the
    unsigned dtype of gene indices in sort keys.
    """

    field: type
    tokens: np.ndarray
    inverse_medians: npt.NDArray[np.float64]
    medians: npt.NDArray[np.float64]
    columns: _Lookup
    genes: _Lookup
    some_dropped: bool

    @classmethod
    def from_plan(cls, plan: GenePlan, token_dtype: type) -> _Tables:
        n_genes = plan.tokens.size
        field = np.uint16 if n_genes < np.iinfo(np.uint16).max else np.uint32
        inverse_medians = np.append(plan.inverse_medians, 0.0)
        medians = np.append(plan.medians, np.inf)

        def lookup(gene_index: np.ndarray) -> _Lookup:
            genes = np.append(np.minimum(gene_index, n_genes), n_genes)
            return _Lookup(pad=genes.size - 1, genes=genes.astype(field), inverse_medians=inverse_medians[genes],
                           medians=medians[genes], used=genes < n_genes)

        columns = lookup(plan.gene_of_column)
        return cls(field=field, tokens=np.append(plan.tokens, 0).astype(token_dtype),
                   inverse_medians=inverse_medians, medians=medians, columns=columns,
                   genes=lookup(np.arange(n_genes)), some_dropped=not columns.used[:-1].all())

    def value_bounds(self, count_range: tuple[Any, Any], totals: np.ndarray, dtype: np.dtype, *,
                     dense: bool) -> tuple[float, float]:
        """Return bounds on every ``normalise_counts`` value of positive counts in ``count_range`` (of
        ``dtype``) with these ``totals`` and any dictionary gene.

        The normalisation is a chain of correctly rounded products (or quotients), each monotone in every
        argument, so the extreme inputs give exact bounds.
        """
        low_count, high_count = np.array([count_range[0]], dtype=dtype), np.array([count_range[1]], dtype=dtype)
        low_total = np.array([totals.min()], dtype=totals.dtype)
        high_total = np.array([totals.max()], dtype=totals.dtype)
        if dense:
            medians = self.medians[:-1]
            low = normalise_counts(low_count, high_total, medians.max(keepdims=True), dense=True)
            high = normalise_counts(high_count, low_total, medians.min(keepdims=True), dense=True)
        else:
            inverse = self.inverse_medians[:-1]
            low = normalise_counts(low_count, high_total, None, inverse_medians=inverse.min(keepdims=True))
            high = normalise_counts(high_count, low_total, None, inverse_medians=inverse.max(keepdims=True))
        return float(low[0]), float(high[0])

    def tie_factors(self, counts: np.ndarray, count_max: Any, *, dense: bool) -> np.ndarray | None:
        """The per-gene factor of the normalisation when equal factors prove equal values (see `_rank_block`).

        Two distinct float32 (or float16) counts differ by at least 2**-24 relative, as do integers below
        2**24, and each rounded step of the normalisation moves that by at most ~2**-53: their values then
        differ in their top 36 mantissa bits. So two values of equal factor that agree in those bits come
        from equal counts and are equal. float64 counts have no such gap: None.
        """
        kind = counts.dtype.kind
        coarse = (kind == "f" and counts.dtype.itemsize <= 4) or (kind in "iub" and count_max < 1 << 24)
        if not coarse:
            return None
        return self.medians if dense else self.inverse_medians


# --- the tokenizer --------------------------------------------------------------------------------------

@dataclass
class _RowChunk:
    """Rows ``start:stop`` of an expression matrix as CSR arrays; ``dense`` says the source was dense."""

    start: int
    stop: int
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    dense: bool


class _LazyNames:
    """Obs names of an open h5ad, read one at a time (they only appear in messages)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitem__(self, row: int) -> str:
        value = self.dataset[int(row)]
        return value.decode() if isinstance(value, bytes) else str(value)


def _numeric(column: Any) -> np.ndarray:
    """Return ``n_counts`` as a numpy number array, keeping its dtype (a float32 column changes the bits)."""
    values = np.asarray(column)
    if values.dtype.kind in "iuf":
        return values
    import pandas as pd

    return pd.Series(column).to_numpy(dtype=np.float64, na_value=np.nan)


#: Chunks near the end shrink to no fewer rows than this, so that the threads finish together.
SMALLEST_CHUNK = 256


def _chunk_ranges(n_obs: int, size: int, workers: int) -> Iterator[tuple[int, int]]:
    """Yield row ranges of at most ``size`` rows; with several workers the last ones shrink (guided
    scheduling), so that no thread is left with a whole chunk to do alone at the end."""
    start = 0
    while start < n_obs:
        step = size
        if workers > 1:
            step = min(size, max(SMALLEST_CHUNK, -(-(n_obs - start) // (2 * workers))))
        yield start, min(start + step, n_obs)
        start += step


def _csr_chunk(matrix: Any, start: int, stop: int) -> _RowChunk:
    """Read rows ``start:stop`` of an in-memory or backed matrix as CSR."""
    block = matrix[start:stop]
    dense = not sp.issparse(block)
    csr = sp.csr_matrix(np.asarray(block)) if dense else sp.csr_matrix(block)
    return _RowChunk(start, stop, csr.data, csr.indices, csr.indptr, dense)


def normalise_counts(counts: np.ndarray, n_counts: np.ndarray, medians: np.ndarray | None, *,
                     dense: bool = False, inverse_medians: np.ndarray | None = None,
                     lengths: np.ndarray | None = None) -> npt.NDArray[np.float64]:
    """Return ``count / n_counts * 10_000 / median`` element-wise, bit for bit as the official tokenizer.

    ``tokenize_anndata`` computes ``X / n_counts * target_sum / norm_factor_vector``. With a sparse ``X``
    scipy turns each division into a multiplication by the reciprocal (``scipy.sparse._base._divide``), so
    the float64 result is ``count * (1 / n_counts) * 10_000 * (1 / median)``; with a dense ``X`` numpy divides.
    Dtypes follow numpy's promotion as in the official code (a float32 ``n_counts`` keeps the first two
    steps in float32). ``inverse_medians`` (``1 / medians``, computed in float64) may be given instead of
    ``medians`` for the sparse formula. With ``lengths``, ``n_counts`` holds one value per cell and
    ``counts`` the cells' entries back to back.
    """
    if dense:
        per_entry = n_counts if lengths is None else np.repeat(n_counts, lengths)
        return np.asarray(counts / per_entry * TARGET_SUM / medians, dtype=np.float64)
    inverse = np.divide(1.0, medians) if inverse_medians is None else inverse_medians
    reciprocal = np.divide(1, n_counts)
    values = counts * (reciprocal if lengths is None else np.repeat(reciprocal, lengths))
    values *= TARGET_SUM
    if values.dtype == np.float64:
        values *= inverse
        return values
    return np.asarray(values * inverse, dtype=np.float64)


#: Cells are ranked in groups of similar length, each padded to its longest cell and sorted as one 2-D
#: block; a group holds about this many entries, so that its working arrays stay in the CPU cache.
GROUP_ENTRIES = 1 << 17
#: A group's longest cell is at most this much longer than its shortest (relative).
GROUP_SPREAD = 0.1
#: `rank_genes` splits its cells into at least this many such groups.
RANK_GROUPS = 8
_LITTLE_ENDIAN = sys.byteorder == "little"


@dataclass(frozen=True)
class _Layout:
    """Rows of a ragged (CSR-like) array in groups of similar length, each group padded to its longest row.

    Group ``k`` is rows ``order[bounds[k]:bounds[k + 1]]``, padded to ``widths[k]`` entries.
    """

    order: np.ndarray
    bounds: np.ndarray
    widths: np.ndarray

    def groups(self) -> Iterator[tuple[np.ndarray, int]]:
        for k in range(self.widths.size):
            yield self.order[self.bounds[k]:self.bounds[k + 1]], int(self.widths[k])


def _layout(lengths: np.ndarray, rows: np.ndarray, *, min_groups: int = 1) -> _Layout:
    """Group ``rows`` (of rows with ``lengths`` entries each) by length (see `_Layout`).

    Rows are sorted by length and cut into groups whose longest row is at most `GROUP_SPREAD` longer
    than their shortest (little padding) and that hold about `GROUP_ENTRIES` entries.
    """
    order = rows[np.argsort(lengths[rows], kind="stable")]
    sorted_lengths = lengths[order]
    most_rows = max(1, -(-order.size // max(1, min_groups)))
    bounds = [0]
    while bounds[-1] < order.size:
        start = bounds[-1]
        shortest = max(1, int(sorted_lengths[start]))
        stop = int(np.searchsorted(sorted_lengths, shortest * (1 + GROUP_SPREAD), side="right"))
        bounds.append(max(start + 1, min(stop, start + max(1, GROUP_ENTRIES // shortest), start + most_rows)))
    bounds_array = np.array(bounds, dtype=np.int64)
    widths = sorted_lengths[bounds_array[1:] - 1] if order.size else np.zeros(0, dtype=lengths.dtype)
    return _Layout(order, bounds_array, widths)


def _padded_slots(starts: np.ndarray, lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the ``(rows, width)`` indices ``starts[i] + j`` and the mask of the padding, ``j >= lengths[i]``."""
    columns = np.arange(width)
    return starts[:, None] + columns, columns >= lengths[:, None]


def _rank_block(values: np.ndarray, genes: np.ndarray, lengths: np.ndarray, max_genes: int, ceiling: int,
                tie_factors: np.ndarray | None = None) -> np.ndarray:
    """Rank the genes of each row of a padded block by value, descending, ties by gene index.

    ``values`` (float64) and ``genes`` (uint16 or uint32) have one row per cell; a row's entries may sit
    anywhere in it, with value 0 in the other slots, and ``lengths`` counts its positive values.
    ``ceiling`` bounds the keys of positive values (the key of the smallest value); it only guides the
    sort. Returns the first ``min(lengths.max(), max_genes)`` ranked genes of every row.

    Each entry's sort key is its float's bit pattern (monotone for positive floats), inverted so that larger
    values come first, with the low 16 (or 32) bits replaced by the gene index. Sorting these uint64 keys
    along each row gives value order with ties in gene order. Two neighbours that agree in all but those
    low bits (among a row's first ``max_genes + 1`` ranks) are an exact tie, ranked right, or values within
    ~2**-36 of each other, maybe not. With ``tie_factors`` (per gene, see `_Tables.tie_factors`) a pair of
    equal factor is known to be an exact tie; every other such pair sends its row to an exact ``np.lexsort``.
    """
    n_rows, width = values.shape
    step = 8 // genes.itemsize
    low = np.uint64((1 << (8 * genes.itemsize)) - 1)
    keys = np.invert(values.view(np.uint64))
    if _LITTLE_ENDIAN:  # the low bytes of each key are its slot in the uint16/uint32 view
        keys.view(genes.dtype)[:, ::step] = genes
    else:
        keys &= ~low
        keys |= genes
    # np.sort of a row of ~2,000 uint64 keys costs ~15 ns a key. Instead, the keys are first put in order
    # of a 16-bit bucket, their offset from the block's smallest key scaled to the range up to ``ceiling``
    # (numpy's stable argsort of uint16 is a radix sort), which leaves rows almost sorted (~1 key per
    # bucket), and a stable sort (timsort, fast on nearly sorted rows) finishes: ~40% less time.
    top = keys.min(initial=np.iinfo(np.uint64).max)
    shift = np.uint64(max(0, int(np.uint64(ceiling) - min(top, np.uint64(ceiling))).bit_length() - 16))
    buckets = keys - top
    buckets >>= shift
    np.minimum(buckets, np.iinfo(np.uint16).max, out=buckets)
    keys = np.take_along_axis(keys, np.argsort(buckets.astype(np.uint16), axis=1, kind="stable"), axis=1)
    keys.sort(axis=1, kind="stable")
    # All pairs left of the group's shortest row are real; right of it, pairs past a row's length are not.
    span = min(width, max_genes + 1)
    common = max(1, min(span, int(lengths.min(initial=0))))
    close = np.zeros(n_rows, dtype=bool)
    if common > 1:
        close |= np.bitwise_xor(keys[:, 1:common], keys[:, : common - 1]).min(axis=1) <= low
    if span > common:
        tail = np.bitwise_xor(keys[:, common:span], keys[:, common - 1:span - 1]) <= low
        tail &= np.arange(common, span) < lengths[:, None]
        close |= tail.any(axis=1)
    suspect = np.flatnonzero(close)
    if suspect.size and tie_factors is not None:
        pairs = np.bitwise_xor(keys[suspect, 1:span], keys[suspect, : span - 1]) <= low
        pairs &= np.arange(1, span) < lengths[suspect, None]
        row, rank = np.nonzero(pairs)
        first = (keys[suspect[row], rank] & low).astype(np.intp)
        second = (keys[suspect[row], rank + 1] & low).astype(np.intp)
        suspect = np.unique(suspect[row[tie_factors[first] != tie_factors[second]]])
    if suspect.size:
        exact = np.lexsort((genes[suspect], -values[suspect]), axis=-1)
        keys[suspect, :width] = np.take_along_axis(genes[suspect], exact, axis=1)
    kept = min(width, max_genes, int(lengths.max(initial=0)))
    if _LITTLE_ENDIAN:
        return keys.view(genes.dtype)[:, : kept * step : step]
    return (keys[:, :kept] & low).astype(genes.dtype)


def _rank_layout(layout: _Layout, lengths: np.ndarray, max_genes: int,
                 block: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], lookup: np.ndarray | None,
                 dtype: type, smallest_value: float, *, frame: tuple[int, int] | None = None,
                 tie_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rank every group of ``layout``; return ``lookup[gene]`` (or the gene) for the first ranked genes of
    each laid-out row, in ascending row order.

    ``block(rows, width)`` gives a group's padded values and genes (see `_rank_block`); ``lengths`` counts
    each row's positive values, none below ``smallest_value`` (a bound: it only guides the sort). With
    ``frame=(first, last)`` every row is framed by those two ids. Returns the ids, concatenated as
    ``dtype``, and their count per row.
    """
    ceiling = int(np.invert(np.array(smallest_value, dtype=np.float64).view(np.uint64)))
    rows_sorted = np.sort(layout.order)
    kept = np.minimum(lengths, max_genes)
    n_special = 0 if frame is None else 2
    out_lengths = kept[rows_sorted] + n_special
    ends = np.cumsum(out_lengths)
    out = np.empty(int(ends[-1]) + 1 if ends.size else 1, dtype=dtype)  # + one slot for the padding
    first = np.zeros(lengths.size, dtype=np.int64)
    first[rows_sorted] = ends - out_lengths + n_special // 2
    for rows, width in layout.groups():
        values, genes = block(rows, width)
        ranked = _rank_block(values, genes, lengths[rows], max_genes, ceiling, tie_factors)
        slots, padding = _padded_slots(first[rows], kept[rows], ranked.shape[1])
        np.putmask(slots, padding, out.size - 1)
        out[slots] = ranked if lookup is None else lookup.take(ranked, mode="clip")
    if frame is not None:
        out[ends - out_lengths] = frame[0]
        out[ends - 1] = frame[1]
    return out[:-1], out_lengths


def rank_genes(values: np.ndarray, genes: np.ndarray, lengths: np.ndarray, n_bits: int,
               max_genes: int, *, lookup: np.ndarray | None = None,
               groups: int = RANK_GROUPS) -> tuple[np.ndarray, np.ndarray]:
    """Rank each cell's genes by value, descending, ties by gene index; keep the first ``max_genes``.

    Parameters
    ----------
    values
        Positive normal float64 values, grouped by cell (cell ``i`` holds the next ``lengths[i]`` entries).
    genes
        Unsigned gene index of each value (< 2**n_bits); ties are broken by ascending gene index.
    lengths
        Entries per cell.
    n_bits
        Bits that hold a gene index (at most 32).
    max_genes
        Truncation length.
    lookup
        If given, ``lookup[gene]`` (e.g. token ids) is returned instead of gene indices.
    groups
        Cells are sorted in at least this many groups of similar length (less padding).

    Returns
    -------
    The ranked gene indices (or their ``lookup``) of all cells, concatenated in cell order, and the number
    kept per cell.

    Notes
    -----
    Cells of similar length are padded into 2-D blocks and each block is sorted along its rows, on uint64
    keys that pack the value and the gene (see `_rank_block`); the tokenizer ranks its chunks the same way.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    kept = np.minimum(lengths, max_genes)
    if values.size == 0:
        return np.zeros(0, dtype=np.uint64 if lookup is None else lookup.dtype), kept
    if values.min() < np.finfo(np.float64).tiny or not np.isfinite(values.max()):
        msg = "rank_genes needs positive, normal, finite float64 values."
        raise ValueError(msg)
    if n_bits > 32:
        msg = f"rank_genes takes gene indices of at most 32 bits, not {n_bits}."
        raise ValueError(msg)
    field = np.uint16 if n_bits <= 16 else np.uint32
    layout = _layout(lengths, np.flatnonzero(lengths > 0), min_groups=groups)
    starts = np.cumsum(lengths) - lengths
    values = np.asarray(values, dtype=np.float64)
    genes = genes.astype(field)

    def block(rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        slots, padding = _padded_slots(starts[rows], lengths[rows], width)
        block_values = values.take(slots, mode="clip")
        np.putmask(block_values, padding, 0.0)
        return block_values, genes.take(slots, mode="clip")

    ranked, _ = _rank_layout(layout, lengths, max_genes, block, None, field, float(values.min()))
    return (ranked.astype(np.uint64) if lookup is None else np.asarray(lookup)[ranked]), kept


class GeneformerTokenizer:
    """The official rank-value tokenizer, vectorised over cells and streamed in row chunks.

    Parameters
    ----------
    vocabulary
        The dictionaries of the model's version (`GeneformerVocabulary`).
    model_input_size
        Maximum sequence length including special tokens (2,048 for V1, 4,096 for V2 by default).
    chunk_size
        Cells per chunk (the last chunks of a run are smaller); memory grows with chunk size times genes
        per cell.
    n_threads
        Chunks tokenized in parallel (numpy releases the GIL); default: up to 4, the CPUs available.

    Notes
    -----
    Per chunk, cells are grouped by length (`_layout`), each group is gathered into padded 2-D blocks of
    counts and gene factors, normalised exactly as the official code (`normalise_counts`), and ranked by
    sorting packed (value, gene) keys along the rows (`_rank_block`); tokens are written straight into
    the chunk's output in cell order. On 2 cores this runs ~34,000 cells/s from an h5ad (20,000 genes,
    ~1,650 expressed per cell; ``benchmarks/bench_geneformer_tokenizer.py``), ~24x the official tokenizer.
    """

    def __init__(self, vocabulary: GeneformerVocabulary, *, model_input_size: int | None = None,
                 chunk_size: int = 2048, n_threads: int | None = None) -> None:
        self.vocabulary = vocabulary
        default_size = V2_INPUT_SIZE if vocabulary.special_tokens else V1_INPUT_SIZE
        self.model_input_size = int(model_input_size or default_size)
        self.chunk_size = int(chunk_size)
        self.n_threads = int(n_threads or min(4, os.cpu_count() or 1))
        n_special = 2 if vocabulary.special_tokens else 0
        if self.model_input_size <= n_special or self.chunk_size < 1:
            msg = f"model_input_size={self.model_input_size} and chunk_size={self.chunk_size} must be positive."
            raise ConfigError(msg)
        #: Genes kept per cell: V2 keeps model_input_size - 2 genes, then adds <cls> and <eos>.
        self.max_genes = self.model_input_size - n_special
        top = max(vocabulary.token_ids.values())
        self.token_dtype = np.int16 if top <= np.iinfo(np.int16).max else np.int32

    # -- public entry points --

    def tokenize(self, adata: ad.AnnData, *, layer: str | None = None,
                 gene_id_key: str = GENE_ID_KEY) -> TokenizedCells:
        """Tokenize an in-memory or backed AnnData (rows are read ``chunk_size`` at a time)."""
        matrix = expression_matrix(adata, layer)
        gene_ids = self._gene_ids(adata.var, gene_id_key, source="adata")
        obs = adata.obs
        n_counts = _numeric(obs[N_COUNTS_KEY]) if N_COUNTS_KEY in obs else None
        filter_pass = obs[FILTER_PASS_KEY].to_numpy() if FILTER_PASS_KEY in obs else None
        chunks = (_csr_chunk(matrix, start, stop)
                  for start, stop in _chunk_ranges(adata.n_obs, self.chunk_size, self.n_threads))
        row_nnz = np.diff(matrix.indptr) if sp.issparse(matrix) and matrix.format == "csr" else None
        return self._run(chunks, gene_ids=gene_ids, n_obs=adata.n_obs, n_counts=n_counts,
                         filter_pass=filter_pass, obs_names=adata.obs_names, source="adata", row_nnz=row_nnz)

    def tokenize_h5ad(self, path: str | Path, *, layer: str | None = None, chunk_size: int | None = None,
                      gene_id_key: str = GENE_ID_KEY) -> TokenizedCells:
        """Tokenize an ``.h5ad`` file on disk, reading ``chunk_size`` rows of ``X`` at a time.

        Only ``obs['n_counts']``, ``obs['filter_pass']``, the gene ids and one chunk of the matrix per
        thread are in memory at once (plus the tokens produced). ``X`` (or ``layers[layer]``) must be CSR
        or dense; CSC would need the whole matrix per chunk.

        Raises
        ------
        SchemaError
            When the file lacks the matrix or gene ids, holds CSC, or has negative or non-finite values.
        """
        import h5py
        from anndata.io import read_elem

        path = Path(path)
        size = int(chunk_size or self.chunk_size)
        with h5py.File(path, "r") as handle:
            where = "X" if layer is None else f"layers/{layer}"
            if where not in handle:
                msg = f"{path}: no {where} in the file. Pass layer=None or one of the stored layers."
                raise SchemaError(msg)
            node = handle[where]
            var_group = handle["var"]
            if gene_id_key in var_group:
                gene_ids = np.asarray(read_elem(var_group[gene_id_key]), dtype=object)
            else:
                log.info("%s: var has no %r column; using var_names as gene ids", path, gene_id_key)
                gene_ids = np.asarray(read_elem(var_group[var_group.attrs["_index"]]), dtype=object)
            obs_group = handle["obs"]
            index = obs_group[obs_group.attrs["_index"]]
            n_obs = index.shape[0]
            obs_names = _LazyNames(index)  # read only for error messages
            n_counts = read_elem(obs_group[N_COUNTS_KEY]) if N_COUNTS_KEY in obs_group else None
            filter_pass = read_elem(obs_group[FILTER_PASS_KEY]) if FILTER_PASS_KEY in obs_group else None
            indptr = self._h5_indptr(node, path, where)
            chunks = self._h5_chunks(node, indptr, n_obs, size, self.n_threads)
            return self._run(chunks, gene_ids=gene_ids, n_obs=n_obs,
                             n_counts=None if n_counts is None else _numeric(n_counts),
                             filter_pass=None if filter_pass is None else np.asarray(filter_pass),
                             obs_names=obs_names, source=str(path),
                             row_nnz=None if indptr is None else np.diff(indptr))

    # -- helpers --

    @staticmethod
    def _gene_ids(var: Any, gene_id_key: str, *, source: str) -> np.ndarray:
        if gene_id_key in var:
            return np.asarray(var[gene_id_key], dtype=object)
        names = np.asarray(var.index, dtype=object)
        log.info("%s: var has no %r column; using var_names as gene ids", source, gene_id_key)
        return names

    @staticmethod
    def _h5_indptr(node: Any, path: Path, where: str) -> np.ndarray | None:
        """Return the row pointers of a CSR matrix group (None for a dense dataset)."""
        import h5py

        if isinstance(node, h5py.Dataset):
            return None
        encoding = node.attrs.get("encoding-type", "")
        if encoding != "csr_matrix":
            msg = (f"{path}: {where} is stored as {encoding or 'an unknown group'}; streaming needs rows, i.e. "
                   "CSR or dense. Convert with adata.X = adata.X.tocsr() and write the file again.")
            raise SchemaError(msg)
        return node["indptr"][:].astype(np.int64)

    @staticmethod
    def _h5_chunks(node: Any, indptr: np.ndarray | None, n_obs: int, size: int,
                   workers: int) -> Iterator[_RowChunk]:
        if indptr is None:
            for start, stop in _chunk_ranges(n_obs, size, workers):
                csr = sp.csr_matrix(node[start:stop])
                yield _RowChunk(start, stop, csr.data, csr.indices, csr.indptr, True)
            return
        data_set, index_set = node["data"], node["indices"]
        for start, stop in _chunk_ranges(n_obs, size, workers):
            low, high = int(indptr[start]), int(indptr[stop])
            yield _RowChunk(start, stop, data_set[low:high], index_set[low:high], indptr[start:stop + 1] - low,
                            False)

    def _run(self, chunks: Iterator[_RowChunk], *, gene_ids: np.ndarray, n_obs: int,
             n_counts: np.ndarray | None, filter_pass: np.ndarray | None, obs_names: Sequence[str],
             source: str, row_nnz: np.ndarray | None = None) -> TokenizedCells:
        start_time = time.perf_counter()
        plan = self.vocabulary.plan_genes(gene_ids)
        if plan.n_matched == 0:
            example = ", ".join(map(str, gene_ids[:3]))
            msg = (f"{source}: none of the {len(gene_ids)} gene ids (e.g. {example}) is in the Geneformer "
                   f"{self.vocabulary.version} dictionary. Give Ensembl ids in var['{GENE_ID_KEY}'].")
            raise SchemaError(msg)
        passing = np.ones(n_obs, dtype=bool) if filter_pass is None else np.asarray(filter_pass) == 1
        max_tokens = None
        if row_nnz is not None:  # each cell gives at most max_genes tokens, plus <cls> and <eos>
            max_tokens = int(np.minimum(row_nnz, self.max_genes).sum()) + (2 * n_obs if self.vocabulary.special_tokens else 0)
        if n_counts is None:
            log.info("%s: obs has no %r; using each cell's total over all genes", source, N_COUNTS_KEY)
        tables = _Tables.from_plan(plan, self.token_dtype)
        # Tokens are copied into one array as chunks finish (preallocated when the matrix gives an upper
        # bound on their number), so that chunk outputs are freed and reused as the run goes.
        flat = np.empty(0 if max_tokens is None else max_tokens, dtype=self.token_dtype)
        filled, parts, lengths_parts, index_parts = 0, [], [], []

        def work(chunk: _RowChunk) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            return self._tokenize_chunk(chunk, plan, tables, n_counts, passing, obs_names, source)

        def collect(result: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
            nonlocal filled
            tokens, chunk_lengths, chunk_index = result
            if filled + tokens.size <= flat.size:
                flat[filled:filled + tokens.size] = tokens
            else:
                parts.append(tokens)
            filled += tokens.size
            lengths_parts.append(chunk_lengths)
            index_parts.append(chunk_index)

        if self.n_threads > 1:
            with ThreadPoolExecutor(self.n_threads) as pool:
                pending = []
                for chunk in chunks:
                    pending.append(pool.submit(work, chunk))
                    if len(pending) > self.n_threads:
                        collect(pending.pop(0).result())
                for future in pending:
                    collect(future.result())
        else:
            for chunk in chunks:
                collect(work(chunk))

        flat = np.concatenate([flat[:filled - sum(p.size for p in parts)], *parts]) if parts else flat[:filled]
        lengths = np.concatenate(lengths_parts) if lengths_parts else np.zeros(0, np.int64)
        cell_index = np.concatenate(index_parts) if index_parts else np.zeros(0, np.int64)
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        dropped: dict[int, str] = {}
        flags = None if filter_pass is None else np.asarray(filter_pass).tolist()
        for row in np.flatnonzero(~passing):
            dropped[int(row)] = f"obs['{FILTER_PASS_KEY}'] is {flags[row]!r}, not 1"
        empty = np.setdiff1d(np.flatnonzero(passing), cell_index, assume_unique=True)
        for row in empty:
            dropped[int(row)] = f"no expressed gene is in the Geneformer {self.vocabulary.version} dictionary"
        if empty.size:
            log.warning("%s: %d cells express no gene of the Geneformer dictionary and are dropped "
                        "(as the official tokenizer does), e.g. %s", source, empty.size, obs_names[empty[0]])
        log.info("tokenized %d of %d cells for Geneformer %s in %.2fs", cell_index.size, n_obs,
                 self.vocabulary.version, time.perf_counter() - start_time)
        return TokenizedCells(cell_index=cell_index, lengths=lengths,
                              arrays={"input_ids": flat, "offsets": offsets}, dropped=dropped,
                              n_genes_matched=plan.n_matched,
                              gene_known=plan.gene_of_column != plan.dropped_gene)

    def _tokenize_chunk(self, chunk: _RowChunk, plan: GenePlan, tables: _Tables, n_counts: np.ndarray | None,
                        passing: np.ndarray, obs_names: Sequence[str],
                        source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokenize one chunk; return (flat tokens, lengths, row index) for its non-empty passing cells."""
        n_rows = chunk.stop - chunk.start
        data, indices = np.asarray(chunk.data), np.asarray(chunk.indices)
        indptr = np.asarray(chunk.indptr, dtype=np.int64)
        smallest, largest = (data.min(), data.max()) if data.size else (1, 0)
        if not (smallest >= 0 and np.isfinite(largest)):
            bad = int(np.flatnonzero(~(np.isfinite(data) & (data >= 0)))[0])
            cell = obs_names[chunk.start + int(np.searchsorted(indptr, bad, side="right")) - 1]
            msg = (f"{source}: cell {cell!r} has expression {data[bad]!r}; Geneformer needs non-negative finite "
                   "values (raw counts). Pass the counts layer.")
            raise SchemaError(msg)
        if n_counts is None:
            running = np.concatenate([[0.0], np.cumsum(data, dtype=np.float64)])
            totals = running[indptr[1:]] - running[indptr[:-1]]
        else:
            totals = np.asarray(n_counts[chunk.start:chunk.stop])
        chunk_passing = passing[chunk.start:chunk.stop]
        if plan.has_duplicates:  # sum columns that collapse onto one id (sum_ensembl_ids)
            genes = plan.gene_of_column[indices]
            take = genes != plan.dropped_gene
            take &= data != 0
            if not chunk_passing.all():
                take &= np.repeat(chunk_passing, np.diff(indptr))
            kept_before = np.concatenate([[0], np.cumsum(take, dtype=np.int64)])
            merged = sp.csr_matrix((data[take], genes[take], kept_before[indptr]), shape=(n_rows, plan.tokens.size))
            merged.sum_duplicates()
            counts, index, lookup = merged.data, merged.indices, tables.genes
            largest = counts.max(initial=0)
            indptr = merged.indptr.astype(np.int64)
            lengths = positive = np.diff(indptr)
        else:
            counts, index, lookup = data, indices, tables.columns
            lengths = positive = np.diff(indptr)
            # Entries of dropped genes and stored zeros get the value 0, which ranks after every expressed
            # gene; when they are many, they are removed rather than padded and sorted.
            unused = ~lookup.used.take(index) if tables.some_dropped else None
            if smallest == 0:
                unused = counts == 0 if unused is None else unused | (counts == 0)
            if unused is not None:
                used_before = np.zeros(counts.size + 1, dtype=np.int64)
                np.cumsum(~unused, out=used_before[1:])
                positive = np.diff(used_before[indptr])
                if counts.size - used_before[-1] > counts.size // 16:
                    counts, index = counts[~unused], index[~unused]
                    indptr, lengths = used_before[indptr], positive
        rows = np.flatnonzero(chunk_passing & (positive > 0))
        if not (np.isfinite(totals[rows]).all() and (totals[rows] > 0).all()):
            bad = int(rows[~(np.isfinite(totals[rows]) & (totals[rows] > 0))][0])
            msg = (f"{source}: cell {obs_names[chunk.start + bad]!r} has obs['{N_COUNTS_KEY}'] = {totals[bad]!r} but "
                   "expressed genes; n_counts must be the cell's total count (> 0).")
            raise SchemaError(msg)
        smallest_value = 0.0
        if rows.size:
            if smallest > 0 or counts.dtype.kind in "iub":
                least = max(smallest, 1) if counts.dtype.kind in "iub" else smallest
            else:  # stored zeros: the smallest positive count
                least = counts[counts > 0].min(initial=largest)
            smallest_value, largest_value = tables.value_bounds((least, largest), totals[rows], counts.dtype,
                                                                dense=chunk.dense)
            if not (smallest_value >= np.finfo(np.float64).tiny and np.isfinite(largest_value)):
                self._check_values(counts, index, lookup, lengths, rows, totals, chunk.dense, source)
        factors_of = lookup.medians if chunk.dense else lookup.inverse_medians

        def block(block_rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
            slots, padding = _padded_slots(indptr[block_rows], lengths[block_rows], width)
            where = index.take(slots, mode="clip")
            np.putmask(where, padding, lookup.pad)  # padding slots: factor 1/median 0 (median inf) gives 0
            block_counts = counts.take(slots, mode="clip")
            factors = factors_of.take(where)
            block_totals = totals[block_rows][:, None]
            if chunk.dense:
                values = normalise_counts(block_counts, block_totals, factors, dense=True)
            else:
                values = normalise_counts(block_counts, block_totals, None, inverse_medians=factors)
            return values, lookup.genes.take(where)

        frame = None
        if self.vocabulary.special_tokens:
            frame = (self.vocabulary.token_ids[CLS_TOKEN], self.vocabulary.token_ids[EOS_TOKEN])
        tie_factors = tables.tie_factors(counts, largest, dense=chunk.dense)
        flat, out_lengths = _rank_layout(_layout(lengths, rows), positive, self.max_genes, block, tables.tokens,
                                         self.token_dtype, smallest_value, frame=frame, tie_factors=tie_factors)
        return flat, out_lengths.astype(np.int64), rows.astype(np.int64) + chunk.start

    @staticmethod
    def _check_values(counts: np.ndarray, index: np.ndarray, lookup: _Lookup, lengths: np.ndarray,
                      rows: np.ndarray, totals: np.ndarray, dense: bool, source: str) -> None:
        """Normalise the entries of ``rows`` one by one and raise if any value is not a positive normal float."""
        row_of = np.repeat(np.arange(lengths.size), lengths)
        in_rows = np.zeros(lengths.size, dtype=bool)
        in_rows[rows] = True
        take = in_rows[row_of] & (counts != 0) & lookup.used.take(index)
        if dense:
            values = normalise_counts(counts[take], totals[row_of[take]], lookup.medians.take(index[take]), dense=True)
        else:
            values = normalise_counts(counts[take], totals[row_of[take]], None,
                                      inverse_medians=lookup.inverse_medians.take(index[take]))
        if values.size and not (values.min() >= np.finfo(np.float64).tiny and np.isfinite(values.max())):
            msg = (f"{source}: normalised values out of range ({values.min()!r}..{values.max()!r}); check that "
                   f"obs['{N_COUNTS_KEY}'] holds each cell's total count.")
            raise SchemaError(msg)


def token_sequences(tokens: TokenizedCells) -> list[np.ndarray]:
    """Split the flat ``input_ids`` of Geneformer tokens into one array per cell (for inspection)."""
    flat, offsets = tokens.arrays["input_ids"], tokens.arrays["offsets"]
    return [flat[offsets[i]:offsets[i + 1]] for i in range(tokens.n_cells)]


# --- the model ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GeneformerConfig:
    """The BERT configuration of a Geneformer model; defaults are the published Geneformer-V1-10M."""

    vocab_size: int = V1_VOCAB_SIZE
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 512
    hidden_act: str = "relu"
    max_position_embeddings: int = V1_INPUT_SIZE
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.02
    attention_probs_dropout_prob: float = 0.02
    position_embedding_type: str = "absolute"

    @classmethod
    def from_official(cls, path: str | Path) -> GeneformerConfig:
        """Read an official ``config.json`` (a folder or the file); keys this model does not use are ignored.

        Raises
        ------
        CheckpointError
            When the file is missing or unreadable, or describes something other than an absolute-position BERT.
        """
        path = Path(path)
        file = path / CONFIG_FILE if path.is_dir() else path
        try:
            raw = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            msg = f"{file}: cannot read the Geneformer config ({err}). Each official model folder has one."
            raise CheckpointError(msg) from err
        if raw.get("model_type", "bert") != "bert" or raw.get("position_embedding_type", "absolute") != "absolute":
            msg = (f"{file}: model_type={raw.get('model_type')!r}, position_embedding_type="
                   f"{raw.get('position_embedding_type')!r}; Geneformer is a BERT with absolute positions.")
            raise CheckpointError(msg)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names and v is not None})

    def to_transformers(self, attn_implementation: str = "sdpa") -> Any:
        """Return the ``transformers.BertConfig`` of this model."""
        from transformers import BertConfig

        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return BertConfig(**values, attn_implementation=attn_implementation)


#: Published architectures (config.json of each official folder), by official subfolder name.
PUBLISHED_CONFIGS: dict[str, GeneformerConfig] = {
    "Geneformer-V1-10M": GeneformerConfig(),
    "gf-12L-30M-i2048": GeneformerConfig(hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                                         intermediate_size=1024),
    "Geneformer-V2-104M": GeneformerConfig(vocab_size=V2_VOCAB_SIZE, hidden_size=768, num_hidden_layers=12,
                                           num_attention_heads=12, intermediate_size=3072,
                                           max_position_embeddings=V2_INPUT_SIZE, hidden_dropout_prob=0.1,
                                           attention_probs_dropout_prob=0.1),
    "Geneformer-V2-316M": GeneformerConfig(vocab_size=V2_VOCAB_SIZE, hidden_size=1152, num_hidden_layers=18,
                                           num_attention_heads=18, intermediate_size=4608,
                                           max_position_embeddings=V2_INPUT_SIZE, hidden_dropout_prob=0.1,
                                           attention_probs_dropout_prob=0.1),
}


class GeneformerModel(nn.Module):
    """``transformers.BertModel`` (as ``bert``) plus the official cell pooling.

    Parameters
    ----------
    config
        The architecture.
    emb_layer
        ``EmbExtractor``'s ``emb_layer``: -1 for the penultimate layer's output, 0 for the last layer's.
    pooling
        ``"mean"`` (``emb_mode="cell"``) or ``"cls"`` (``emb_mode="cls"``).
    exclude_special
        Leave position 0 and the last position out of the mean (V2: ``<cls>`` and ``<eos>``).
    attn_implementation
        ``"sdpa"`` (default) or ``"eager"``, as in ``transformers``.
    """

    def __init__(self, config: GeneformerConfig, *, emb_layer: int = DEFAULT_EMB_LAYER,
                 pooling: Literal["mean", "cls"] = "mean", exclude_special: bool = False,
                 attn_implementation: str = "sdpa") -> None:
        from transformers import BertModel

        super().__init__()
        if not -config.num_hidden_layers <= emb_layer <= 0:
            msg = f"emb_layer={emb_layer}; expected -{config.num_hidden_layers}..0 (0 = last layer, -1 = penultimate)."
            raise ConfigError(msg)
        if pooling not in ("mean", "cls"):
            msg = f"pooling={pooling!r}; expected 'mean' or 'cls'."
            raise ConfigError(msg)
        self.config = config
        self.bert = BertModel(config.to_transformers(attn_implementation), add_pooling_layer=False)
        #: hidden_states index of EmbExtractor: layer_to_quant = n_layers + emb_layer.
        self.n_layers_run = config.num_hidden_layers + emb_layer
        self.pooling = pooling
        self.exclude_special = exclude_special

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      n_layers: int | None = None) -> torch.Tensor:
        """Return ``hidden_states[n_layers]`` of ``BertModel`` (0 = embedding output), running only those layers."""
        n_layers = self.n_layers_run if n_layers is None else n_layers
        hidden = self.bert.embeddings(input_ids=input_ids)
        if bool(attention_mask.all()):
            mask = None
        elif self.bert.config._attn_implementation == "sdpa":
            mask = attention_mask.bool()[:, None, None, :]
        else:  # eager: an additive mask, as transformers builds it
            mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.bert.encoder.layer[:n_layers]:
            hidden = layer(hidden, mask)
        return hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, attention_mask)
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.to(hidden.dtype)
        if self.exclude_special:  # mean_nonpadding_embs over h[:, 1:] with length - 2
            lengths = attention_mask.sum(dim=1, keepdim=True)
            positions = torch.arange(weights.shape[1], device=weights.device)[None, :]
            weights = ((positions >= 1) & (positions < lengths - 1)).to(hidden.dtype)
        total = torch.einsum("bld,bl->bd", hidden, weights)
        return total / weights.sum(dim=1, keepdim=True)


def build_geneformer_model(config: GeneformerConfig, **options: Any) -> GeneformerModel:
    """Instantiate `GeneformerModel` in eval mode (use ``with torch.device("meta")`` for a shape-only model)."""
    return GeneformerModel(config, **options).eval()


# --- the loader -----------------------------------------------------------------------------------------

#: Keys of the official files for parts this encoder never runs: the masked-LM head (cls.*), the pooler of
#: BertModel checkpoints, and the position_ids buffer that older transformers wrote.
UNUSED_PREFIXES = ("cls.", "bert.pooler.")
UNUSED_KEYS = ("bert.embeddings.position_ids",)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` or ``pytorch_model.bin`` (``torch.load(weights_only=True)``).

    Raises
    ------
    CheckpointError
        When the file is unreadable or holds no tensors.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise many types for corrupted files
        msg = f"{path}: cannot read the checkpoint ({type(err).__name__}: {err}). Download it again."
        raise CheckpointError(msg) from err
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        msg = f"{path}: expected a mapping of parameter names to tensors. Is this an official Geneformer file?"
        raise CheckpointError(msg)
    return dict(state)


def load_official_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
                             prefix: str = "bert.") -> None:
    """Copy an official state dict into ``model`` strictly.

    The one rename: files saved from a bare ``BertModel`` (keys without ``bert.``) get the prefix.
    Keys of parts never run (`UNUSED_PREFIXES`, `UNUSED_KEYS`) are listed in one log line.

    Raises
    ------
    CheckpointError
        Listing every missing, unexpected and mis-shaped key.
    """
    if not any(k.startswith(prefix) for k in state):
        state = {prefix + k: v for k, v in state.items()}
    expected = model.state_dict()
    unused = sorted(k for k in state if k not in expected and (k.startswith(UNUSED_PREFIXES) or k in UNUSED_KEYS))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - set(unused))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if shapes:
        problems.append(f"mis-shaped keys {shapes}")
    if problems:
        msg = (f"{source}: does not match the Geneformer architecture of its config.json: " + "; ".join(problems)
               + ". Use the config.json that was published with these weights.")
        raise CheckpointError(msg)
    if unused:
        log.info("%s: ignoring %d keys of parts not run for embeddings: %s", source, len(unused), ", ".join(unused))
    with torch.no_grad():
        model.load_state_dict({k: state[k] for k in expected}, strict=True)


# --- the encoder ----------------------------------------------------------------------------------------

def _source(name: str, folder: str, weights: str, version: Literal["V1", "V2"], *,
            revision: str = HF_REVISION) -> WeightsSource:
    """Describe one official model folder plus the dictionaries of its version."""
    if version == "V1":
        dictionaries = (
            hf_file(HF_REPO, "geneformer/gene_dictionaries_30m/token_dictionary_gc30M.pkl", revision=revision,
                    sha256="ab9dc40973fa5224d77b793e2fd114cacf3d08423ed9c4c49caf0ba9c7f218f1"),
            hf_file(HF_REPO, "geneformer/gene_dictionaries_30m/gene_median_dictionary_gc30M.pkl", revision=revision,
                    sha256="b3b589bb5ec75040d05fc44dd6bf0184cf87f3c362cf158d196a6ed3b7fe5f39"),
            hf_file(HF_REPO, "geneformer/gene_dictionaries_30m/ensembl_mapping_dict_gc30M.pkl", revision=revision),
        )
    else:
        tag = "gc104M" if revision == HF_REVISION else "gc95M"
        dictionaries = (
            hf_file(HF_REPO, f"geneformer/token_dictionary_{tag}.pkl", revision=revision,
                    sha256="67c445f4385127adfc48dcc072320cd65d6822829bf27dd38070e6e787bc597f"),
            hf_file(HF_REPO, f"geneformer/gene_median_dictionary_{tag}.pkl", revision=revision,
                    sha256="a51c53f6a771d64508dfaf61529df70e394c53bd20856926117ae5d641a24bf5"),
            hf_file(HF_REPO, f"geneformer/ensembl_mapping_dict_{tag}.pkl", revision=revision,
                    sha256="0819bcbd869cfa14279449b037eb9ed1d09a91310e77bd1a19d927465030e95c"),
        )
    files = (hf_file(HF_REPO, f"{folder}/{CONFIG_FILE}", revision=revision),
             hf_file(HF_REPO, f"{folder}/{weights}", revision=revision), *dictionaries)
    return WeightsSource(name=name, files=files, homepage=f"https://huggingface.co/{HF_REPO}/tree/{revision}/{folder}",
                         license="Apache-2.0")


#: Official variants (cache name -> source). Dictionary checksums are those of the official files as
#: recorded in ../shared/golden/geneformer/dictionary_subset.json; the publisher gives none for the weights.
WEIGHTS_SOURCES: dict[str, WeightsSource] = {
    "geneformer-v1-10m": _source("geneformer-v1-10m", "Geneformer-V1-10M", "model.safetensors", "V1"),
    "geneformer-v1-12l-30m": _source("geneformer-v1-12l-30m", "gf-12L-30M-i2048", "pytorch_model.bin", "V1",
                                     revision=HF_LEGACY_REVISION),
    "geneformer-v2-104m": _source("geneformer-v2-104m", "Geneformer-V2-104M", "model.safetensors", "V2"),
    "geneformer-v2-104m-clcancer": _source("geneformer-v2-104m-clcancer", "Geneformer-V2-104M_CLcancer",
                                           "model.safetensors", "V2"),
    "geneformer-v2-316m": _source("geneformer-v2-316m", "Geneformer-V2-316M", "model.safetensors", "V2"),
    "geneformer-v2-95m": _source("geneformer-v2-95m", "gf-12L-95M-i4096", "model.safetensors", "V2",
                                 revision=HF_LEGACY_REVISION),
}
#: Official subfolder names accepted as variant names too.
OFFICIAL_FOLDERS = {"geneformer-v1-10m": "Geneformer-V1-10M", "geneformer-v1-12l-30m": "gf-12L-30M-i2048",
                    "geneformer-v2-104m": "Geneformer-V2-104M",
                    "geneformer-v2-104m-clcancer": "Geneformer-V2-104M_CLcancer",
                    "geneformer-v2-316m": "Geneformer-V2-316M", "geneformer-v2-95m": "gf-12L-95M-i4096"}


def _infer_version(config: GeneformerConfig) -> Literal["V1", "V2"]:
    if config.vocab_size == V1_VOCAB_SIZE:
        return "V1"
    if config.vocab_size == V2_VOCAB_SIZE:
        return "V2"
    return "V1" if config.max_position_embeddings <= V1_INPUT_SIZE else "V2"


def find_dictionary(folder: Path, version: str, role: str) -> Path | None:
    """Return the first official dictionary file of ``role`` found in ``folder`` or an official repo layout."""
    places = [folder] + [folder.parent / sub for sub in DICTIONARY_SUBDIRS[version]]
    for place in places:
        for name in DICTIONARY_FILES[version][role]:
            if (place / name).is_file():
                return place / name
    return None


class GeneformerEncoder(TorchEncoder):
    """Geneformer V1/V2 cell embeddings (see the module docstring for the official contract).

    Build it with `from_pretrained`; ``tokenize`` / ``tokenize_h5ad`` give `TokenizedCells` whose
    ``arrays`` hold the flat ``input_ids`` and their ``offsets``.
    """

    name: ClassVar[str] = "geneformer"
    family: ClassVar[Literal["scfm", "llm", "baseline"]] = "scfm"
    input_kind: ClassVar[Literal["counts", "nonnegative", "any"]] = "nonnegative"
    lora_targets: ClassVar[tuple[str, ...]] = ("query", "key", "value")
    shardable: ClassVar[bool] = True  # each cell is its own sequence
    weights_sources: ClassVar[Mapping[str, WeightsSource]] = WEIGHTS_SOURCES

    def __init__(self, module: GeneformerModel, tokenizer: GeneformerTokenizer, *,
                 checkpoint_sha256: str | None = None) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.checkpoint_sha256 = checkpoint_sha256

    @property
    def embedding_dim(self) -> int:
        return self.module.config.hidden_size

    @property
    def version(self) -> str:
        return self.tokenizer.vocabulary.version

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path | None = None, **options: Any) -> GeneformerEncoder:
        """Load an official Geneformer model folder with its dictionaries.

        Parameters
        ----------
        path_or_name
            None (the default variant, ``geneformer-v1-10m``), a variant name of `weights_sources` or its
            official folder name (``Geneformer-V2-104M``), a model folder (``config.json`` +
            ``model.safetensors`` or ``pytorch_model.bin``), or the weights file itself. Dictionaries are
            looked for in the folder, then where a clone of the official repository keeps them
            (``../geneformer/``, ``../geneformer/gene_dictionaries_30m/``).
        **options
            ``model_version`` ("V1"/"V2"; inferred from the vocabulary size), ``token_dictionary_file``,
            ``gene_median_file``, ``gene_mapping_file`` (None: identity on the token dictionary, the 2023 V1
            behaviour), ``model_input_size``, ``emb_layer`` (-1), ``pooling`` ("mean"/"cls"),
            ``attn_implementation`` ("sdpa"), ``chunk_size``, ``n_threads``, ``device``.

        Raises
        ------
        CheckpointError
            When a file is missing, unreadable or does not fit the architecture (keys named).
        ConfigError
            For an unknown option value.
        """
        known = {"model_version", "token_dictionary_file", "gene_median_file", "gene_mapping_file",
                 "model_input_size", "emb_layer", "pooling", "attn_implementation", "chunk_size", "n_threads",
                 "device"}
        if unknown := sorted(set(options) - known):
            msg = f"unknown Geneformer options {unknown}; known: {sorted(known)}."
            raise ConfigError(msg)
        by_folder = {v.lower(): k for k, v in OFFICIAL_FOLDERS.items()}
        key = None if path_or_name is None else by_folder.get(str(path_or_name).lower(), str(path_or_name))
        if key is None or key in cls.weights_sources:
            source = cls.weights_sources[key or next(iter(cls.weights_sources))]
            location = resolve_weights(source)
        else:
            location = Path(path_or_name).expanduser()
            if not location.exists():
                msg = (f"{location}: no such file or folder, and not a Geneformer variant "
                       f"({', '.join(cls.weights_sources)}).")
                raise CheckpointError(msg)
        folder = location if location.is_dir() else location.parent
        weights_path = location if location.is_file() else next(
            (folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
        if weights_path is None:
            msg = f"{folder}: no {' or '.join(WEIGHT_FILES)}. Point to an official Geneformer model folder."
            raise CheckpointError(msg)
        config = GeneformerConfig.from_official(folder)
        version = options.get("model_version") or _infer_version(config)
        if version not in ("V1", "V2"):
            msg = f"model_version={version!r}; expected 'V1' or 'V2'."
            raise ConfigError(msg)
        vocabulary = cls._vocabulary(folder, version, options)
        top = max(vocabulary.token_ids.values())
        if top >= config.vocab_size:
            msg = (f"{folder}: the {version} token dictionary has ids up to {top} but the model's vocab_size is "
                   f"{config.vocab_size}. Use the dictionaries of this model's version (model_version=).")
            raise CheckpointError(msg)
        tokenizer = GeneformerTokenizer(vocabulary, model_input_size=options.get("model_input_size"),
                                        chunk_size=options.get("chunk_size", 2048),
                                        n_threads=options.get("n_threads"))
        if tokenizer.model_input_size > config.max_position_embeddings:
            msg = (f"model_input_size={tokenizer.model_input_size} exceeds the model's "
                   f"max_position_embeddings={config.max_position_embeddings}.")
            raise ConfigError(msg)
        pooling = options.get("pooling", "mean")
        if pooling == "cls" and version == "V1":
            msg = "pooling='cls' needs a <cls> token, which only Geneformer V2 has; use pooling='mean'."
            raise ConfigError(msg)
        module = build_geneformer_model(config, emb_layer=options.get("emb_layer", DEFAULT_EMB_LAYER),
                                        pooling=pooling, exclude_special=vocabulary.special_tokens,
                                        attn_implementation=options.get("attn_implementation", "sdpa"))
        load_official_state_dict(module, read_state_dict(weights_path), source=str(weights_path))
        if device := options.get("device"):
            module.to(device)
        log.info("loaded Geneformer %s (%d layers, hidden %d) from %s", version, config.num_hidden_layers,
                 config.hidden_size, weights_path)
        return cls(module, tokenizer, checkpoint_sha256=sha256_file(weights_path))

    @staticmethod
    def _vocabulary(folder: Path, version: Literal["V1", "V2"], options: Mapping[str, Any]) -> GeneformerVocabulary:
        token_file = options.get("token_dictionary_file") or find_dictionary(folder, version, "token")
        median_file = options.get("gene_median_file") or find_dictionary(folder, version, "median")
        if token_file is None or median_file is None:
            names = DICTIONARY_FILES[version]["token"][0], DICTIONARY_FILES[version]["median"][0]
            msg = (f"{folder}: no Geneformer {version} dictionaries ({', '.join(names)}) next to the model. "
                   "Pass token_dictionary_file= and gene_median_file=, or download the variant.")
            raise CheckpointError(msg)
        if "gene_mapping_file" in options:
            mapping_file = options["gene_mapping_file"]
        else:
            mapping_file = find_dictionary(folder, version, "mapping")
            if mapping_file is None and version == "V2":
                msg = (f"{folder}: no {DICTIONARY_FILES['V2']['mapping'][0]}; the V2 tokenizer maps ids through it. "
                       "Pass gene_mapping_file= (None for the identity).")
                raise CheckpointError(msg)
            if mapping_file is None:
                log.info("%s: no gc30M mapping dictionary; Ensembl ids map to themselves (2023 V1 tokenizer)", folder)
        return GeneformerVocabulary.from_files(token_file, median_file, mapping_file, version=version)

    # -- tokenize / collate / encode --

    def tokenize(self, adata: ad.AnnData, *, layer: str | None = None) -> TokenizedCells:
        return self.tokenizer.tokenize(adata, layer=layer)

    def tokenize_h5ad(self, path: str | Path, *, layer: str | None = None,
                      chunk_size: int | None = None) -> TokenizedCells:
        """Tokenize an ``.h5ad`` on disk in chunks of rows (see `GeneformerTokenizer.tokenize_h5ad`)."""
        return self.tokenizer.tokenize_h5ad(path, layer=layer, chunk_size=chunk_size)

    def collate(self, tokens: TokenizedCells, rows: npt.NDArray[np.int64]) -> dict[str, torch.Tensor]:
        """Right-pad the chosen cells with ``<pad>`` = 0 to the batch's longest, as ``pad_tensor_list`` does."""
        rows = np.asarray(rows, dtype=np.int64)
        flat, offsets = tokens.arrays["input_ids"], tokens.arrays["offsets"]
        lengths = offsets[rows + 1] - offsets[rows]
        width = int(lengths.max(initial=1))
        positions = np.arange(width)
        mask = positions[None, :] < lengths[:, None]
        index = np.where(mask, offsets[rows][:, None] + positions[None, :], 0)
        ids = np.where(mask, flat[index] if flat.size else 0, self.tokenizer.vocabulary.token_ids[PAD_TOKEN])
        return {"input_ids": torch.from_numpy(ids.astype(np.int64)),
                "attention_mask": torch.from_numpy(mask.astype(np.int64))}

    def encode(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts.update(version=self.version, model_input_size=self.tokenizer.model_input_size,
                     emb_layer=self.module.n_layers_run - self.module.config.num_hidden_layers,
                     pooling=self.module.pooling)
        return facts


def forward_flops(config: GeneformerConfig, lengths: npt.ArrayLike, n_layers: int | None = None) -> float:
    """Count the multiply-add FLOPs (2 per MAC) of the encoder layers for sequences of ``lengths`` (no padding).

    Per layer and token: Q, K, V and output projections (4 h^2) and the feed-forward (2 h f) MACs;
    per layer and sequence: scores and weighted values (2 L^2 h) MACs. Embeddings and pooling are ignored.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    layers = config.num_hidden_layers if n_layers is None else n_layers
    h, f = config.hidden_size, config.intermediate_size
    per_token = 4 * h * h + 2 * h * f
    return float(2.0 * layers * (per_token * lengths.sum() + 2 * h * (lengths ** 2).sum()))


__all__ = ["GeneformerConfig", "GeneformerEncoder", "GeneformerModel", "GeneformerTokenizer",
           "GeneformerVocabulary", "forward_flops", "load_dictionary", "load_official_state_dict",
           "normalise_counts", "read_state_dict", "token_sequences"]
