"""The Geneformer V1 and V2 rank-value tokenizer, vectorised over cells and streamed in row chunks.

Official code: https://huggingface.co/ctheodoris/Geneformer @ ``05fcbeb8a27d49e0a7a4349152202ee2c1cbfd28``,
``geneformer/tokenizer.py`` (``TranscriptomeTokenizer``, ``sum_ensembl_ids``, ``rank_genes``). The encoder
that runs the tokens is `scdrugmap.models.geneformer`; this module imports no torch, so tokenizing
(a whole data set, in a process of its own) does not pay for it.

Tokens
    ``count / n_counts * 10_000 / median[gene]`` in float64 for the genes of the model's dictionary,
    sorted descending ("rank value encoding"), truncated to 2,048 genes (V1) or 4,094 genes framed by
    ``<cls>`` and ``<eos>`` (V2). Ensembl ids are upper-cased and mapped through the official mapping
    dictionary; columns that map to the same id are summed. Cells with ``filter_pass != 1`` and cells with
    no dictionary gene are dropped, as the official h5ad path does.
Dictionaries
    The official token, median and mapping dictionaries are pickles; they are read with a restricted
    unpickler (`load_dictionary`) that can build nothing but dicts of strings and numbers.

Ties. The official ranking is ``np.argsort(-values)`` (quicksort, not stable), so genes with exactly equal
values come out in a platform-dependent order. Here ties keep gene-column order (a stable sort over the
columns as the official h5ad path lays them out after collapsing duplicates): reproducible everywhere, and
equal to the official output outside tie groups and as a multiset inside them.

Quirks of the official tokenizer and what this module does about them:

* The official h5ad path sums duplicated ids only when the mapping renames some id onto another; two
  columns carrying the *same* id are otherwise tokenized twice. Here duplicates are always summed.
* Explicitly stored zeros in a sparse ``X`` reach the official h5ad ranking as zero values (last ranks);
  here zeros are dropped, as the tokenizer's contract (and its loom path) says.
* A dense ``X`` is normalised by true division in the official code, a sparse one by multiplying with
  reciprocals; both are reproduced bit for bit, since the last bit decides near-ties.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp

from scdrugmap.data.schema import expression_matrix
from scdrugmap.errors import CheckpointError, ConfigError, SchemaError
from scdrugmap.models.base import TokenizedCells

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

log = logging.getLogger(__name__)

# --- official constants ---------------------------------------------------------------------------------

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

    def plan_genes(self, gene_ids: Sequence[str] | np.ndarray) -> GenePlan:
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
    if inverse_medians is None:
        assert medians is not None, "normalise_counts needs medians or inverse_medians"
        inverse = np.divide(1.0, medians)
    else:
        inverse = inverse_medians
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
    out: np.ndarray = np.empty(int(ends[-1]) + 1 if ends.size else 1, dtype=dtype)  # + one slot for the padding
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
    the chunk's output in cell order. Speed against the official tokenizer, as measured by
    ``benchmarks/bench_geneformer_tokenizer.py`` (20,000 cells x 20,000 genes from an h5ad, ~1,650 expressed
    per cell, 2 shared cores) against a faithful copy of the official per-cell loop on the same file and the
    same tokens: 5.8x in process (the tokenising work alone, after imports and dictionaries; 10.6x in another
    run), 3.2x and 2.1x as whole processes (interpreter start, imports and dictionaries included: what a
    user waits for). An earlier "~24x" divided this tokenizer's ~34,000 cells/s by the ~1,400 cells/s
    quoted for the official one, not by a measured run of it; rerun the benchmark for this machine's figures.
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
             n_counts: np.ndarray | None, filter_pass: np.ndarray | None, obs_names: Sequence[str] | _LazyNames,
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
        if filter_pass is not None:  # without it every cell passes
            flags = np.asarray(filter_pass).tolist()
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
                        passing: np.ndarray, obs_names: Sequence[str] | _LazyNames,
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


def find_dictionary(folder: Path, version: str, role: str) -> Path | None:
    """Return the first official dictionary file of ``role`` found in ``folder`` or an official repo layout."""
    places = [folder] + [folder.parent / sub for sub in DICTIONARY_SUBDIRS[version]]
    for place in places:
        for name in DICTIONARY_FILES[version][role]:
            if (place / name).is_file():
                return place / name
    return None
