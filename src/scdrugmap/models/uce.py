"""UCE (Universal Cell Embeddings): a transformer over sampled, chromosome-ordered protein tokens.

Paper: Rosen, Roohani et al., "Universal Cell Embeddings: a foundation model for cell biology",
bioRxiv 2023.11.28.568918. Official code: https://github.com/snap-stanford/UCE at commit
``8ead6e07af0c80f75653598138bb704e865b45c8`` (``eval_single_anndata.py``, ``evaluate.py``,
``eval_data.py``, ``model.py``, ``data_proc/data_utils.py``).

Input: raw counts with gene symbols. Per cell, 1024 genes are drawn with replacement with
probability proportional to ``log1p(count)``; they are grouped by chromosome (chromosomes in a
random order), sorted by genomic start inside each group, and written as
``[CLS] [chrom] genes... [close] [chrom] genes... [close] ... [PAD]...``. Each token is a row of a
frozen table of ESM2 protein embeddings (plus special and chromosome rows), L2-normalised.

Pooling: the CLS position after the decoder MLP, L2-normalised (``model.py``: ``gene_output[0]``).

Quirks of the official code and what this module does about them (see
``../shared/golden/uce/README.md``):

* The official sampler draws from numpy's *unseeded* global RNG, so official embeddings change
  from run to run. Here sampling is seeded: by default a vectorised sampler with a
  `numpy.random.Generator` (same distribution, different stream); ``sampling="legacy"`` replays the
  official per-cell calls on a ``RandomState(seed)``, which reproduces an official run made after
  ``np.random.seed(seed)`` bit for bit (the only per-cell loop here, because the legacy stream
  interleaves ``choice`` and ``shuffle`` cell by cell).
* The padding mask is passed to ``nn.TransformerEncoder`` as a *float* ``1 - mask``, so it is
  *added* to the attention logits: pad keys get +1 and are attended to (even up-weighted), and a
  cell's embedding depends on how much padding its batch of 25 cells adds. The model was trained
  that way, so ``padding_mask="additive"`` (default) reproduces it, padding every cell to the length
  of its official batch of `UCEConfig.batch_size` consecutive cells whatever batches we compute
  in. ``padding_mask="blocking"`` masks pads out (a bool mask), which makes each cell's embedding
  independent of its neighbours; on the golden fixture the two differ by up to 1.3e-3.
* ``nn.MultiheadAttention`` packs q/k/v in ``in_proj_weight`` and calls ``out_proj`` functionally,
  so LoRA adapters on it never run. Here attention has explicit ``q_proj``/``k_proj``/``v_proj``/
  ``out_proj`` Linears and uses SDPA; `OFFICIAL_RENAMES` splits/merges ``in_proj_*`` on load.
* Ties: inside a chromosome the official code orders genes with numpy's unstable quicksort on
  their start. Distinct genes with an identical start are ordered by their column in the data in
  the vectorised sampler (the legacy sampler calls ``np.argsort`` exactly as the official code).
* The official code crashes when a gene has a protein embedding but no row in the chromosome csv,
  when a cell has no counts left, or when a sentence exceeds ``pad_length``; here such genes are
  left out (logged as a warning) and such cells are dropped with the reason.
"""

from __future__ import annotations

import builtins
import io
import json
import logging
import math
import pickle
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from scdrugmap.data.schema import expression_matrix
from scdrugmap.errors import CheckpointError, ConfigError, SchemaError
from scdrugmap.models._layers import TransformerEncoderLayer
from scdrugmap.models.base import Progress, TokenizedCells, TorchEncoder
from scdrugmap.models.weights import MANIFEST, RemoteFile, WeightsSource, resolve_weights, sha256_file

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

log = logging.getLogger(__name__)

# --- constants (official sources cited) ---------------------------------------------------------------

#: eval_single_anndata.py argparse defaults: --pad_token_idx 0, --chrom_token_left_idx 1 (never written),
#: --chrom_token_right_idx 2 (closes every chromosome group), --cls_token_idx 3.
PAD_TOKEN = 0
CHROM_LEFT_TOKEN = 1
CHROM_RIGHT_TOKEN = 2
CLS_TOKEN = 3
#: evaluate.get_ESM2_embeddings: a token file with CHROM_TOKEN_OFFSET rows gets the chromosome rows
#: appended from torch.manual_seed(23); torch.normal(0, 1, (n_chrom, token_dim)).
CHROM_TOKEN_SEED = 23
#: evaluate.run_eval / get_eval_model: torch.zeros(145469, 5120) before the strict load; 143574 is the
#: --CHROM_TOKEN_OFFSET default and 1895 the hard-coded number of chromosome tokens.
OFFICIAL_N_TOKENS = 145469
OFFICIAL_CHROM_TOKEN_OFFSET = 143574
#: data_proc/data_utils.get_species_to_pe: one ESM2 protein-embedding dict per species.
PROTEIN_EMBEDDING_FILES: dict[str, str] = {
    "human": "Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt",
    "mouse": "Mus_musculus.GRCm39.gene_symbol_to_embedding_ESM2.pt",
    "frog": "Xenopus_tropicalis.Xenopus_tropicalis_v9.1.gene_symbol_to_embedding_ESM2.pt",
    "zebrafish": "Danio_rerio.GRCz11.gene_symbol_to_embedding_ESM2.pt",
    "mouse_lemur": "Microcebus_murinus.Mmur_3.0.gene_symbol_to_embedding_ESM2.pt",
    "pig": "Sus_scrofa.Sscrofa11.1.gene_symbol_to_embedding_ESM2.pt",
    "macaca_fascicularis": "Macaca_fascicularis.Macaca_fascicularis_6.0.gene_symbol_to_embedding_ESM2.pt",
    "macaca_mulatta": "Macaca_mulatta.Mmul_10.gene_symbol_to_embedding_ESM2.pt",
}
#: Official file names (evaluate.AnndataProcessor.check_paths, README).
MODEL_FILES = ("4layer_model.torch", "33l_8ep_1024t_1280.torch")
TOKEN_FILE = "all_tokens.torch"
CHROM_CSV = "species_chrom.csv"
OFFSETS_PKL = "species_offsets.pkl"
PROTEIN_DIR = "protein_embeddings"
PROTEIN_TARBALL = "protein_embeddings.tar.gz"

#: Cells processed together by the vectorised tokenizer (bounds memory; results do not depend on it).
TOKENIZE_CHUNK = 256

_FIGSHARE = "https://figshare.com/ndownloader/files/"
_COMPANIONS = (
    # evaluate.py download_urls["figshare"]; the publisher gives no checksums.
    RemoteFile(TOKEN_FILE, _FIGSHARE + "42706585"),
    RemoteFile(CHROM_CSV, _FIGSHARE + "42706558"),
    RemoteFile(OFFSETS_PKL, _FIGSHARE + "42706555"),
    RemoteFile(PROTEIN_TARBALL, _FIGSHARE + "42715213"),
)
_HOMEPAGE = "https://github.com/snap-stanford/UCE"


# --- config -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UCEConfig:
    """Architecture and tokenizer settings; defaults are the published 4-layer model and the official CLI.

    ``d_model`` (1280), ``nhead`` (20) and the token-table sizes are hard-coded in ``evaluate.run_eval``;
    the others are ``eval_single_anndata.py`` arguments (``--nlayers 33`` for the 33-layer model).
    """

    token_dim: int = 5120
    d_model: int = 1280
    nhead: int = 20
    d_hid: int = 5120
    nlayers: int = 4
    output_dim: int = 1280
    decoder_hidden: int = 1024  # model.py: full_block(d_model, 1024)
    binary_decoder_hidden: tuple[int, ...] = (2048, 512, 128)  # model.py binary_decoder widths
    dropout: float = 0.05
    max_len: int = 1536  # PositionalEncoding max_len
    n_tokens: int = OFFICIAL_N_TOKENS
    chrom_token_offset: int = OFFICIAL_CHROM_TOKEN_OFFSET
    # tokenizer (eval_single_anndata.py defaults)
    species: str = "human"
    sample_size: int = 1024
    pad_length: int = 1536
    batch_size: int = 25  # official batch: sets how much padding a cell sees under the additive mask
    filter: bool = True  # sc.pp.filter_genes(min_cells=10); sc.pp.filter_cells(min_genes=25)
    min_cells: int = 10
    min_genes: int = 25
    # reproducibility and quirks
    sampling: Literal["generator", "legacy"] = "generator"
    seed: int = 0
    padding_mask: Literal["additive", "blocking"] = "additive"

    def __post_init__(self) -> None:
        if self.d_model % self.nhead:
            msg = f"UCE d_model {self.d_model} is not divisible by nhead {self.nhead}; pass a divisor of it."
            raise ConfigError(msg)
        if self.sampling not in ("generator", "legacy"):
            msg = f"UCE sampling={self.sampling!r}; expected 'generator' or 'legacy'."
            raise ConfigError(msg)
        if self.padding_mask not in ("additive", "blocking"):
            msg = f"UCE padding_mask={self.padding_mask!r}; expected 'additive' (official) or 'blocking'."
            raise ConfigError(msg)
        if self.pad_length > self.max_len:
            msg = f"UCE pad_length {self.pad_length} exceeds the positional table ({self.max_len} rows)."
            raise ConfigError(msg)

    @property
    def n_chrom_tokens(self) -> int:
        """Chromosome rows at the end of the token table (official 1895)."""
        return self.n_tokens - self.chrom_token_offset

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> UCEConfig:
        """Read the sizes of an official state dict (``nhead`` is not stored: official 20)."""
        try:
            shapes = {
                "token_dim": state_dict["encoder.0.weight"].shape[1],
                "d_model": state_dict["encoder.0.weight"].shape[0],
                "d_hid": state_dict["transformer_encoder.layers.0.linear1.weight"].shape[0],
                "output_dim": state_dict["decoder.3.weight"].shape[0],
                "decoder_hidden": state_dict["decoder.0.0.weight"].shape[0],
                "binary_decoder_hidden": tuple(state_dict[f"binary_decoder.{i}.0.weight"].shape[0]
                                               for i in range(3)),
                "max_len": state_dict["pos_encoder.pe"].shape[0],
                "n_tokens": state_dict["pe_embedding.weight"].shape[0],
            }
        except KeyError as err:
            msg = f"UCE checkpoint lacks {err.args[0]!r}, needed to read its sizes; is it an official UCE state dict?"
            raise CheckpointError(msg) from err
        layers = {int(k.split(".")[2]) for k in state_dict if k.startswith("transformer_encoder.layers.")}
        shapes["nlayers"] = max(layers) + 1 if layers else 0
        return cls(**{**shapes, **overrides})

    @classmethod
    def from_official(cls, path: str | Path, **overrides: Any) -> UCEConfig:
        """Read the sizes of an official ``.torch`` model file (memory-mapped, nothing loaded)."""
        return cls.from_state_dict(_load_torch_file(Path(path)), **overrides)


# --- official companion files -------------------------------------------------------------------------

class _OffsetsUnpickler(pickle.Unpickler):
    """Unpickle only literal dicts of str -> int.

    A pickle can call any importable callable while it loads (its GLOBAL/STACK_GLOBAL, INST, OBJ and
    EXT opcodes all resolve names through `find_class`, then REDUCE calls them). Refusing every name
    but the three builtins below means the file can only build plain data, so a tampered
    ``species_offsets.pkl`` cannot run code. A plain ``{str: int}`` pickle needs no names at all.
    """

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {("builtins", "dict"), ("builtins", "str"), ("builtins", "int")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return getattr(builtins, name)
        msg = f"refused global {module}.{name}: only a plain dict of str -> int is accepted"
        raise pickle.UnpicklingError(msg)

    def persistent_load(self, pid: Any) -> Any:
        msg = "refused a persistent id: only a plain dict of str -> int is accepted"
        raise pickle.UnpicklingError(msg)


def read_species_offsets(path: str | Path) -> dict[str, int]:
    """Read ``species_offsets.pkl`` ({species: first token-table row}) without running pickled code.

    Raises
    ------
    CheckpointError
        When the file holds anything but a dict of str -> int.
    """
    path = Path(path)
    try:
        offsets = _OffsetsUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, OSError) as err:
        msg = (f"{path}: cannot read the UCE species offsets ({err}). Download species_offsets.pkl again, "
               "or pass species_offset=<first token row of your species>.")
        raise CheckpointError(msg) from err
    if not isinstance(offsets, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in offsets.items()):
        msg = f"{path}: expected a dict of species -> int offset, found {type(offsets).__name__}."
        raise CheckpointError(msg)
    return offsets


def read_protein_symbols(path: str | Path) -> list[str]:
    """Return the upper-cased gene symbols of one species' protein-embedding dict, in token order.

    ``get_species_to_pe`` rebuilds the dict as ``{k.upper(): v}``; a symbol's token is its position in
    that dict (so an upper-cased duplicate keeps the position of its first spelling).
    """
    table = _load_torch_file(Path(path))
    if not isinstance(table, Mapping):
        msg = f"{path}: expected a dict of gene symbol -> embedding, found {type(table).__name__}."
        raise CheckpointError(msg)
    return list(dict.fromkeys(str(k).upper() for k in table))


def read_chrom_table(path: str | Path) -> tuple[pd.DataFrame, pd.Index]:
    """Read ``species_chrom.csv``; return (rows with a ``chrom_code`` column, all chromosome categories).

    Codes are those of ``pd.Categorical(species + "_" + chromosome)`` over the whole file
    (``get_spec_chrom_csv``): the index in the sorted list of every ``species_chromosome``.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype={"chromosome": str, "species": str})
    except (OSError, ValueError, pd.errors.ParserError) as err:
        msg = f"{path}: cannot read the UCE chromosome table ({err})."
        raise CheckpointError(msg) from err
    missing = {"gene_symbol", "chromosome", "start", "species"} - set(table.columns)
    if missing:
        msg = f"{path}: columns {sorted(missing)} are missing; found {list(table.columns)}."
        raise CheckpointError(msg)
    spec_chrom = pd.Categorical(table["species"] + "_" + table["chromosome"])
    table = table.assign(chrom_code=spec_chrom.codes)
    return table, spec_chrom.categories


@dataclass(frozen=True)
class UCEGeneTable:
    """The genes of one species UCE can place: token row, chromosome code and genomic start."""

    species: str
    symbols: pd.Index  # upper-case symbols, unique
    token_ids: npt.NDArray[np.int64]
    chrom_codes: npt.NDArray[np.integer]  # dtype as pandas cat.codes (int8 / int16), used by the legacy sampler
    starts: npt.NDArray[np.int64]
    chrom_categories: pd.Index

    @classmethod
    def build(cls, symbols: list[str], offset: int, chrom_table: pd.DataFrame, categories: pd.Index,
              species: str) -> UCEGeneTable:
        """Join a species' protein-embedding symbols (token order) with its chromosome rows."""
        rows = chrom_table[chrom_table["species"] == species]
        duplicated = rows["gene_symbol"].duplicated()
        if duplicated.any():
            log.warning("UCE chromosome table: %d duplicated %s symbols (e.g. %s); the first row of each is used",
                        int(duplicated.sum()), species, list(rows["gene_symbol"][duplicated][:3]))
            rows = rows[~duplicated]
        where = pd.Index(rows["gene_symbol"]).get_indexer(symbols)
        known = where >= 0
        if not known.all():
            # Official adata_path_to_prot_chrom_starts raises KeyError for such a gene; we leave it out.
            log.warning("UCE: %d of %d %s protein-embedding genes have no chromosome row and are left out (e.g. %s)",
                        int((~known).sum()), len(symbols), species, list(np.asarray(symbols)[~known][:3]))
        found = rows.iloc[where[known]]
        return cls(species=species, symbols=pd.Index(np.asarray(symbols, dtype=object)[known]),
                   token_ids=np.flatnonzero(known).astype(np.int64) + offset,
                   chrom_codes=found["chrom_code"].to_numpy(), starts=found["start"].to_numpy(np.int64),
                   chrom_categories=categories)


# --- tokenizer ----------------------------------------------------------------------------------------

def sampling_weights(counts: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    """Return each cell's gene-sampling probabilities, float32, computed as the official code does.

    ``eval_data``: ``w = log1p(counts)`` (torch, float32), ``w / torch.sum(w)``, then again
    ``w / sum(w)`` with Python's sequential float32 ``sum``. Rows are cells.
    """
    logs = torch.log1p(torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int64)))
    first = (logs / logs.sum(dim=1, keepdim=True)).numpy()
    # np.cumsum over float32 is the same left-to-right accumulation as Python's sum().
    return (first / np.cumsum(first, axis=1, dtype=np.float32)[:, -1:]).astype(np.float32, copy=False)


def sample_genes(weights: npt.NDArray[np.float32], sample_size: int,
                 rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Draw ``sample_size`` gene columns per cell with replacement, P(gene) = weight (vectorised).

    The same inverse-CDF rule as ``RandomState.choice``: ``cdf = cumsum(float64(p)); cdf /= cdf[-1];
    searchsorted(cdf, u, 'right')`` with one uniform per draw, for all cells at once.
    """
    n_cells, n_genes = weights.shape
    cdf = np.cumsum(weights, axis=1, dtype=np.float64)
    cdf /= cdf[:, -1:]
    cdf[:, -1] = 1.0
    rows = np.arange(n_cells)
    shifted = (cdf + rows[:, None]).ravel()  # row r spans (r, r + 1]: one sorted array for all cells
    draws = rng.random((n_cells, sample_size)) + rows[:, None]
    flat = np.searchsorted(shifted, draws.ravel(), side="right").reshape(n_cells, sample_size)
    return np.clip(flat - rows[:, None] * n_genes, 0, n_genes - 1).astype(np.int64)


def shuffle_chromosomes(sampled: npt.NDArray[np.int64], gene_chrom_codes: npt.NDArray[np.integer],
                        rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Return each cell's sampled chromosomes in a uniformly random order, padded with -1 (vectorised)."""
    n_cells = sampled.shape[0]
    codes = gene_chrom_codes.astype(np.int64)[sampled]
    n_codes = int(codes.max()) + 1 if codes.size else 1
    pairs = np.unique(np.arange(n_cells)[:, None] * n_codes + codes)  # (cell, chromosome), sorted
    cell = pairs // n_codes
    order = np.lexsort((rng.random(pairs.size), cell))
    per_cell = np.bincount(cell, minlength=n_cells)
    starts = np.concatenate(([0], np.cumsum(per_cell)[:-1]))
    column = np.arange(pairs.size) - starts[cell[order]]
    chrom_order = np.full((n_cells, int(per_cell.max()) if pairs.size else 0), -1, dtype=np.int64)
    chrom_order[cell[order], column] = pairs[order] % n_codes
    return chrom_order


def order_cell_sentences(sampled: npt.NDArray[np.int64], chrom_order: npt.NDArray[np.int64],
                         gene_chrom_codes: npt.NDArray[np.integer],
                         gene_starts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Order each cell's sampled genes: chromosome groups in ``chrom_order``, by start inside a group.

    Repeated draws of a gene stay as adjacent repeats; distinct genes with the same start keep
    column order. Returns gene columns, (cells x sample_size).
    """
    n_cells, sample_size = sampled.shape
    codes = gene_chrom_codes.astype(np.int64)[sampled]
    n_codes = max(int(codes.max()) if codes.size else 0, int(chrom_order.max(initial=0))) + 1
    valid = chrom_order >= 0
    cell_of = np.broadcast_to(np.arange(n_cells)[:, None], chrom_order.shape)
    keys = (cell_of * n_codes + chrom_order)[valid]
    ranks = np.broadcast_to(np.arange(chrom_order.shape[1])[None, :], chrom_order.shape)[valid]
    by_key = np.argsort(keys, kind="stable")
    wanted = (np.arange(n_cells)[:, None] * n_codes + codes).ravel()
    at = np.minimum(np.searchsorted(keys[by_key], wanted), max(keys.size - 1, 0))
    if keys.size == 0 or not np.array_equal(keys[by_key][at], wanted):
        msg = "chrom_order lacks a chromosome that was sampled"
        raise ValueError(msg)
    rank = ranks[by_key][at].reshape(n_cells, sample_size)
    cell = np.repeat(np.arange(n_cells), sample_size).reshape(n_cells, sample_size)
    order = np.lexsort((sampled.ravel(), gene_starts[sampled].ravel(), rank.ravel(), cell.ravel()))
    return sampled.ravel()[order].reshape(n_cells, sample_size)


def sample_sentences_legacy(weights: npt.NDArray[np.float32], sample_size: int,
                            gene_chrom_codes: npt.NDArray[np.integer], gene_starts: npt.NDArray[np.int64],
                            random_state: np.random.RandomState) -> npt.NDArray[np.int64]:
    """Replay ``eval_data.sample_cell_sentences`` call by call on a legacy ``RandomState``.

    One ``choice`` then one ``shuffle`` per cell, with the official argsorts on the same dtypes, so
    an official run seeded with ``np.random.seed(s)`` is reproduced exactly by ``RandomState(s)``.
    A per-cell loop by necessity: the legacy stream interleaves the two draws cell by cell.
    """
    n_cells, n_genes = weights.shape
    ordered = np.empty((n_cells, sample_size), dtype=np.int64)
    genes = np.arange(n_genes)
    for c in range(n_cells):
        choice = random_state.choice(genes, size=sample_size, p=weights[c], replace=True)
        choice = choice[np.argsort(gene_chrom_codes[choice])]
        chosen_chroms = gene_chrom_codes[choice]
        chosen_starts = gene_starts[choice]
        unique_chroms = np.unique(chosen_chroms)
        random_state.shuffle(unique_chroms)
        groups = []
        for chrom in unique_chroms:
            where = np.where(chosen_chroms == chrom)[0]
            groups.append(choice[where[np.argsort(chosen_starts[where])]])
        ordered[c] = np.concatenate(groups)
    return ordered


def assemble_sentences(ordered: npt.NDArray[np.int64], gene_token_ids: npt.NDArray[np.int64],
                       gene_chrom_codes: npt.NDArray[np.integer],
                       chrom_token_offset: int) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
    """Write ``[CLS] ([chrom] genes [close])...`` for every cell; return (flat token ids, lengths).

    ``ordered`` holds gene columns already grouped by chromosome (each chromosome one run).
    """
    n_cells, sample_size = ordered.shape
    codes = gene_chrom_codes.astype(np.int64)[ordered]
    opens = np.ones(ordered.shape, dtype=bool)
    opens[:, 1:] = codes[:, 1:] != codes[:, :-1]
    closes = np.ones(ordered.shape, dtype=bool)
    closes[:, :-1] = opens[:, 1:]
    group = np.cumsum(opens, axis=1) - 1
    lengths = 1 + sample_size + 2 * (group[:, -1] + 1)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    position = offsets[:-1, None] + np.arange(sample_size)[None, :] + 2 * group  # before the open token
    flat = np.empty(int(offsets[-1]), dtype=np.int32)
    flat[offsets[:-1]] = CLS_TOKEN
    flat[position[opens] + 1] = chrom_token_offset + codes[opens]
    flat[position + 2] = gene_token_ids[ordered]
    flat[position[closes] + 3] = CHROM_RIGHT_TOKEN
    return flat, lengths.astype(np.int64)


def official_batch_lengths(lengths: npt.NDArray[np.int64], batch_size: int) -> npt.NDArray[np.int64]:
    """Return, per cell, the longest sentence of its official batch (``batch_size`` consecutive cells).

    The official collator truncates each batch to its longest sentence and pads the others to it.
    """
    starts = np.arange(0, lengths.size, batch_size)
    if starts.size == 0:
        return lengths.copy()
    return np.repeat(np.maximum.reduceat(lengths, starts), np.diff(np.append(starts, lengths.size)))


# --- model --------------------------------------------------------------------------------------------

def full_block(in_features: int, out_features: int, dropout: float) -> nn.Sequential:
    """Linear -> LayerNorm -> GELU -> Dropout (model.py ``full_block``)."""
    return nn.Sequential(nn.Linear(in_features, out_features), nn.LayerNorm(out_features), nn.GELU(),
                         nn.Dropout(dropout))


class PositionalEncoding(nn.Module):
    """Sinusoidal positions added after the input projection; ``pe`` is (max_len, 1, d_model) as official."""

    pe: torch.Tensor

    def __init__(self, d_model: int, dropout: float, max_len: int) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add positions to (batch, length, d_model)."""
        return self.dropout(x + self.pe[: x.shape[1], 0].unsqueeze(0))


class UCETransformerEncoder(nn.Module):
    """``nn.TransformerEncoder`` (no final norm) of post-norm ReLU layers, `scdrugmap.models._layers.TransformerEncoderLayer`.

    The official ``nn.MultiheadAttention`` runs as `scdrugmap.models._layers.SelfAttention` (explicit
    projections, so LoRA on ``out_proj`` runs); the loader splits its ``in_proj_weight`` (`OFFICIAL_RENAMES`).
    """

    def __init__(self, config: UCEConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerEncoderLayer(config.d_model, config.nhead, config.d_hid, config.dropout)
                                    for _ in range(config.nlayers))

    def forward(self, x: torch.Tensor, attention_bias: torch.Tensor, *, cls_only_last: bool = False) -> torch.Tensor:
        """Run all layers; ``cls_only_last`` computes only position 0 in the last one (all the pooling needs).

        ``attention_bias`` (batch, length) is added to every query's logit for that key.
        """
        attn_mask = attention_bias[:, None, None, :]
        for index, layer in enumerate(self.layers):
            x = layer(x, attn_mask, cls_only=cls_only_last and index == len(self.layers) - 1)
        return x


class UCEModel(nn.Module):
    """``model.TransformerModel`` with its token table, batch-first, parameter names as official."""

    def __init__(self, config: UCEConfig) -> None:
        super().__init__()
        self.config = config
        self.d_model = config.d_model
        self.pos_encoder = PositionalEncoding(config.d_model, config.dropout, config.max_len)
        self.encoder = nn.Sequential(nn.Linear(config.token_dim, config.d_model), nn.GELU(),
                                     nn.LayerNorm(config.d_model))
        self.transformer_encoder = UCETransformerEncoder(config)
        self.decoder = nn.Sequential(full_block(config.d_model, config.decoder_hidden, config.dropout),
                                     full_block(config.decoder_hidden, config.output_dim, config.dropout),
                                     full_block(config.output_dim, config.output_dim, config.dropout),
                                     nn.Linear(config.output_dim, config.output_dim))
        # Used only by predict() (pretraining objective), kept so the official file loads strictly.
        widths = (config.output_dim + config.d_model, *config.binary_decoder_hidden)
        self.binary_decoder = nn.Sequential(*(full_block(a, b, config.dropout) for a, b in zip(widths[:-1], widths[1:], strict=True)),
                                            nn.Linear(widths[-1], 1))
        self.gene_embedding_layer = nn.Sequential(nn.Linear(config.token_dim, config.d_model), nn.GELU(),
                                                  nn.LayerNorm(config.d_model))
        self.pe_embedding = nn.Embedding(config.n_tokens, config.token_dim)
        self.pe_embedding.weight.requires_grad_(False)  # nn.Embedding.from_pretrained(freeze=True)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Return ``encoder(normalize(table[ids])) * sqrt(d_model)`` for (batch, length) ids.

        Computed once per distinct token of the batch, then gathered: the same per-token function
        as official, without the (batch x length x 5120) intermediate.
        """
        unique, inverse = torch.unique(token_ids, return_inverse=True)
        rows = F.normalize(self.pe_embedding(unique), dim=-1)
        return self.encoder(rows)[inverse] * math.sqrt(self.d_model)

    def forward(self, token_ids: torch.Tensor, attention_bias: torch.Tensor, *,
                all_positions: bool = False) -> dict[str, torch.Tensor]:
        """Run (batch, length) token ids; ``attention_bias`` (batch, length) is added to every key's logit.

        Returns ``embedding`` (the L2-normalised CLS decoder output) and ``cls_output`` (before
        normalising). Only the CLS row of the last layer is computed unless ``all_positions``, which
        adds ``transformer_output`` and ``gene_output`` (the decoder on every position) as official.
        """
        x = self.pos_encoder(self.embed_tokens(token_ids))
        x = self.transformer_encoder(x, attention_bias, cls_only_last=not all_positions)
        cls_output = self.decoder(x[:, 0])
        out = {"embedding": F.normalize(cls_output, dim=1), "cls_output": cls_output}
        if all_positions:
            out["transformer_output"] = x
            out["gene_output"] = self.decoder(x)
        return out

    def predict(self, cell_embedding: torch.Tensor, gene_embeddings: torch.Tensor) -> torch.Tensor:
        """Return the pretraining head's logit that each gene is expressed (model.py ``predict``)."""
        genes = self.gene_embedding_layer(gene_embeddings)
        return self.binary_decoder(torch.hstack((cell_embedding, genes)))


def padding_bias(attention_mask: torch.Tensor, padded_lengths: torch.Tensor | None,
                 mode: Literal["additive", "blocking"]) -> torch.Tensor:
    """Return the per-key attention bias for real (mask 1) and pad (mask 0) positions.

    ``additive``: official ``src_key_padding_mask = 1 - mask`` as a float, added to the logits (pads +1).
    Keys past a cell's ``padded_lengths`` (its official batch length) are blocked, so a cell sees
    exactly the padding the official batch gave it whatever batch it is computed in.
    ``blocking``: pads are removed from attention (-inf).
    """
    mask = attention_mask.float()
    if mode == "blocking":
        return torch.zeros_like(mask).masked_fill(mask == 0, float("-inf"))
    bias = 1.0 - mask
    if padded_lengths is not None:
        beyond = torch.arange(mask.shape[1], device=mask.device)[None, :] >= padded_lengths[:, None]
        bias = bias.masked_fill(beyond, float("-inf"))
    return bias


# --- loader -------------------------------------------------------------------------------------------

#: The one rename: official ``nn.MultiheadAttention`` packs q, k and v in one matrix (rows q, k, v).
OFFICIAL_RENAMES: dict[str, tuple[str, str, str]] = {
    "self_attn.in_proj_weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attn.in_proj_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
}


def _load_torch_file(path: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped where the format allows; errors name the file."""
    if not path.is_file():
        msg = f"{path}: no such file. Pass the folder of the official UCE model files (model_files/)."
        raise CheckpointError(msg)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err) and "zip" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as err:
        msg = f"{path}: cannot be read as a torch file ({type(err).__name__}: {err}). It may be truncated or corrupted; download it again."
        raise CheckpointError(msg) from err


def to_module_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split each layer's official ``in_proj_*`` into ``q_proj``/``k_proj``/``v_proj`` (`OFFICIAL_RENAMES`)."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        suffix = next((s for s in OFFICIAL_RENAMES if key.endswith("." + s)), None)
        if suffix is None:
            converted[key] = value
            continue
        if value.shape[0] % 3:
            msg = f"UCE checkpoint: {key} has shape {tuple(value.shape)}; its first size must be 3 x d_model."
            raise CheckpointError(msg)
        prefix = key[: -len(suffix)]
        for name, part in zip(OFFICIAL_RENAMES[suffix], value.chunk(3, dim=0), strict=True):
            converted[prefix + name] = part
    return converted


def official_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Return the model's state-dict shapes under the official key names (q/k/v merged back), in order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key, value in model.state_dict().items():
        for official, (first, *rest) in OFFICIAL_RENAMES.items():
            if key.endswith("." + first):
                shapes[key[: -len(first)] + official] = (3 * value.shape[0], *value.shape[1:])
                break
            if any(key.endswith("." + part) for part in rest):
                break
        else:
            shapes[key] = tuple(value.shape)
    return shapes


def load_official_state_dict(model: UCEModel, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load an official state dict strictly: missing, unexpected or mis-shaped keys raise `CheckpointError`."""
    converted = to_module_state_dict(state_dict)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    misshaped = [f"{k} {tuple(converted[k].shape)} (expected {expected[k]})"
                 for k in expected if k in converted and tuple(converted[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {missing[:8]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {unexpected[:8]}")
    if misshaped:
        problems.append(f"mis-shaped: {misshaped[:8]}")
    if problems:
        msg = (f"{source}: not a UCE checkpoint of this configuration ({'; '.join(problems)}). "
               f"Check --nlayers / nhead / the model file (config: nlayers={model.config.nlayers}, "
               f"d_model={model.config.d_model}, token_dim={model.config.token_dim}).")
        raise CheckpointError(msg)
    floats = {k: v.float() if v.is_floating_point() else v for k, v in converted.items()}
    model.load_state_dict(floats, strict=True, assign=True)
    model.pe_embedding.weight.requires_grad_(False)


def _read_token_file(token_path: Path, config: UCEConfig) -> torch.Tensor:
    table = _load_torch_file(token_path)
    if not isinstance(table, torch.Tensor) or table.ndim != 2 or table.shape[1] != config.token_dim:
        found = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        msg = f"{token_path}: expected a (rows x {config.token_dim}) token table, found {found}."
        raise CheckpointError(msg)
    return table


def _token_rows_after_append(rows: int, config: UCEConfig) -> int:
    return rows + config.n_chrom_tokens if rows == config.chrom_token_offset else rows


def official_token_table(token_path: Path, config: UCEConfig) -> torch.Tensor:
    """Read ``all_tokens.torch`` as ``evaluate.get_ESM2_embeddings`` does.

    A file of ``chrom_token_offset`` rows gets the chromosome rows appended:
    ``torch.manual_seed(23); torch.normal(0, 1, (n_chrom, token_dim))`` (here on a private generator).
    """
    table = _read_token_file(token_path, config)
    if table.shape[0] == config.chrom_token_offset:
        generator = torch.Generator().manual_seed(CHROM_TOKEN_SEED)
        chrom = torch.normal(0.0, 1.0, (config.n_chrom_tokens, config.token_dim), generator=generator)
        table = torch.vstack((table.float(), chrom))
    return table.float()


def _find_model_file(folder: Path, model_file: str | None) -> Path:
    if model_file is not None:
        return folder / model_file
    present = [folder / name for name in MODEL_FILES if (folder / name).is_file()]
    if len(present) == 1:
        return present[0]
    others = [p for p in sorted(folder.glob("*.torch")) if p.name != TOKEN_FILE]
    if len(present) > 1 or len(others) != 1:
        found = [p.name for p in (present or others)]
        msg = (f"{folder}: cannot tell which UCE model file to load (found {found}). "
               f"Pass model_file=<name> or the path of the .torch file itself.")
        raise CheckpointError(msg)
    return others[0]


def _find_protein_file(folder: Path, species: str) -> Path:
    if species not in PROTEIN_EMBEDDING_FILES:
        msg = f"UCE has no protein embeddings for species {species!r}; known: {sorted(PROTEIN_EMBEDDING_FILES)}."
        raise ConfigError(msg)
    name = PROTEIN_EMBEDDING_FILES[species]
    direct = folder / PROTEIN_DIR / name
    if direct.is_file():
        return direct
    tarball = folder / PROTEIN_TARBALL
    found = sorted(folder.glob(f"**/{name}"))
    if not found and tarball.is_file():
        log.info("extracting %s", tarball)
        with tarfile.open(tarball) as archive:
            archive.extractall(folder, filter="data")  # refuses absolute paths, links out, devices
        found = sorted(folder.glob(f"**/{name}"))
    if not found:
        msg = (f"{folder}: {PROTEIN_DIR}/{name} is missing. Download and extract the official "
               f"protein_embeddings.tar.gz ({_FIGSHARE}42715213) there.")
        raise CheckpointError(msg)
    return found[0]


def _recorded_sha256(path: Path) -> str:
    """Return the sha256 the weights cache recorded for ``path``, or hash the file."""
    manifest = path.parent / MANIFEST
    if manifest.is_file():
        digest = json.loads(manifest.read_text()).get(path.name)
        if digest:
            return digest
    return sha256_file(path)


# --- encoder ------------------------------------------------------------------------------------------

class UCEEncoder(TorchEncoder):
    """UCE behind the encoder contract: counts in, normalised CLS embeddings out (`UCEConfig`)."""

    name = "uce"
    family = "scfm"
    input_kind = "counts"
    lora_targets = ("out_proj",)
    weights_sources: ClassVar[Mapping[str, WeightsSource]] = {
        # The default is the 4-layer model: the official CLI's default, and the one scDrugMap's UCE scripts load.
        "4layer": WeightsSource(name="uce-4layer", homepage=_HOMEPAGE, license="MIT", files=(
            RemoteFile("4layer_model.torch", _FIGSHARE + "42706576"), *_COMPANIONS)),
        # The paper's 33-layer model (README: figshare article 24320806, file 43423236).
        "33layer": WeightsSource(name="uce-33layer", homepage=_HOMEPAGE, license="MIT", files=(
            RemoteFile("33l_8ep_1024t_1280.torch", _FIGSHARE + "43423236"), *_COMPANIONS)),
    }

    def __init__(self, module: UCEModel, genes: UCEGeneTable, config: UCEConfig) -> None:
        self.module = module
        self.genes = genes
        self.config = config

    @property
    def embedding_dim(self) -> int:
        return self.config.output_dim

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path | None = None, **options: Any) -> UCEEncoder:
        """Load the official files: a model ``.torch`` and, beside it, the token table and gene files.

        Parameters
        ----------
        path_or_name
            None (the default 4-layer weights, cached or downloaded), a variant of `weights_sources`
            (``"33layer"``), the official ``model_files`` folder, or a model ``.torch`` file in it.
        options
            `UCEConfig` fields (``species``, ``seed``, ``sampling``, ``padding_mask``, ``nhead``,
            ``chrom_token_offset``, ...), ``model_file`` (which ``.torch`` of the folder),
            ``species_offset`` (instead of ``species_offsets.pkl``) and ``device``.

        Raises
        ------
        CheckpointError
            When a file is missing, unreadable, or does not match the architecture.
        """
        start = time.perf_counter()
        model_file = options.pop("model_file", None)
        species_offset = options.pop("species_offset", None)
        device = options.pop("device", None)
        unknown = set(options) - {f.name for f in fields(UCEConfig)}
        if unknown:
            msg = f"unknown UCE options {sorted(unknown)}; known: {sorted(f.name for f in fields(UCEConfig))}."
            raise ConfigError(msg)
        if path_or_name is None or str(path_or_name) in cls.weights_sources:
            key = "4layer" if path_or_name is None else str(path_or_name)
            location = resolve_weights(cls.weights_sources[key])
        else:
            location = resolve_weights(next(iter(cls.weights_sources.values())), path_or_name)
        model_path = location if location.is_file() else _find_model_file(location, model_file)
        folder = model_path.parent
        log.info("loading UCE from %s", model_path)

        state_dict = _load_torch_file(model_path)
        if not isinstance(state_dict, Mapping):
            msg = f"{model_path}: expected a state dict (torch.save(model.state_dict())), found {type(state_dict).__name__}."
            raise CheckpointError(msg)
        config = UCEConfig.from_state_dict(state_dict, **options)
        with torch.device("meta"):
            module = UCEModel(config)
        load_official_state_dict(module, state_dict, source=str(model_path))
        token_path = folder / TOKEN_FILE
        if token_path.is_file():
            # get_eval_model: the file replaces the checkpoint's table only when its row count differs
            # (a new-species file); with the published files the checkpoint's table is used.
            rows = _token_rows_after_append(_read_token_file(token_path, config).shape[0], config)
            if rows != config.n_tokens:
                table = official_token_table(token_path, config)
                log.info("UCE: %s has %d rows (checkpoint %d); it replaces the checkpoint's token table as "
                         "official", token_path, rows, config.n_tokens)
                config = replace(config, n_tokens=table.shape[0])
                module.config = config
                module.pe_embedding = nn.Embedding.from_pretrained(table, freeze=True)
        else:
            log.info("UCE: no %s beside the model; using the checkpoint's token table (as official does "
                     "for the published files)", TOKEN_FILE)

        genes = cls._read_genes(folder, config, species_offset)
        module.eval()
        if device is not None:
            module.to(device)
        encoder = cls(module, genes, config)
        encoder.checkpoint_sha256 = _recorded_sha256(model_path)
        log.info("    finished loading UCE (%d layers, %d %s genes) in %.1fs", config.nlayers,
                 len(genes.symbols), config.species, time.perf_counter() - start)
        return encoder

    @staticmethod
    def _read_genes(folder: Path, config: UCEConfig, species_offset: int | None) -> UCEGeneTable:
        if species_offset is None:
            offsets = read_species_offsets(folder / OFFSETS_PKL)
            if config.species not in offsets:
                msg = f"{folder / OFFSETS_PKL}: no offset for species {config.species!r}; found {sorted(offsets)}."
                raise CheckpointError(msg)
            species_offset = offsets[config.species]
        symbols = read_protein_symbols(_find_protein_file(folder, config.species))
        chrom_table, categories = read_chrom_table(folder / CHROM_CSV)
        genes = UCEGeneTable.build(symbols, species_offset, chrom_table, categories, config.species)
        top_gene = int(genes.token_ids.max(initial=0))
        top_chrom = config.chrom_token_offset + len(categories) - 1
        if top_gene >= config.chrom_token_offset or top_chrom >= config.n_tokens:
            msg = (f"{folder}: gene tokens reach row {top_gene} and chromosome tokens row {top_chrom}, but the "
                   f"table has {config.n_tokens} rows with chromosomes from {config.chrom_token_offset}. "
                   "Check chrom_token_offset and the species files.")
            raise CheckpointError(msg)
        return genes

    # --- tokenize / collate / encode -------------------------------------------------------------------

    def tokenize(self, adata: ad.AnnData, *, layer: str | None = None) -> TokenizedCells:
        """Filter, subset and sample each cell's sentence as ``eval_single_anndata.py`` does.

        Returns flat ``token_ids`` (int32) with ``offsets``; ``lengths`` is the length a cell is
        padded to (its official batch's longest sentence in additive mode, its own otherwise).
        """
        config = self.config
        X = expression_matrix(adata, layer)
        X = sp.csr_matrix(X.to_memory() if hasattr(X, "to_memory") else X)
        symbols = pd.Index(adata.var.get("gene_symbol", adata.var_names))
        symbols = symbols.astype(str).str.upper()
        dropped: dict[int, str] = {}

        keep_cells = np.ones(adata.n_obs, dtype=bool)
        keep_genes = np.ones(adata.n_vars, dtype=bool)
        if config.filter:  # process_raw_anndata: on all genes, before the protein-embedding subset
            keep_genes = np.asarray((X > 0).sum(axis=0)).ravel() >= config.min_cells
            genes_per_cell = np.asarray((X[:, keep_genes] > 0).sum(axis=1)).ravel()
            keep_cells = genes_per_cell >= config.min_genes
            for row in np.flatnonzero(~keep_cells):
                dropped[int(row)] = (f"{genes_per_cell[row]} expressed genes < min_genes={config.min_genes} "
                                     f"(after filter_genes(min_cells={config.min_cells}))")
        where = self.genes.symbols.get_indexer(symbols)
        n_matched = int((where >= 0).sum())
        if n_matched == 0:
            msg = (f"none of the {adata.n_vars} genes (e.g. {list(symbols[:3])}) has a UCE {config.species} "
                   "protein embedding. UCE needs gene symbols in var_names or var['gene_symbol'].")
            raise SchemaError(msg)
        columns = np.flatnonzero(keep_genes & (where >= 0))
        gene_rows = where[columns]
        # process_raw_anndata: float32 tensor, written into an int64 memmap (truncation).
        counts = X[:, columns].astype(np.float32).astype(np.int64)
        empty = keep_cells & (np.asarray(counts.sum(axis=1)).ravel() == 0)
        for row in np.flatnonzero(empty):
            dropped[int(row)] = "no counts on genes with a UCE protein embedding"
        cells = np.flatnonzero(keep_cells & ~empty)

        chrom_codes = self.genes.chrom_codes[gene_rows]
        starts = self.genes.starts[gene_rows]
        token_ids = self.genes.token_ids[gene_rows]
        # legacy: the official stream, on purpose; generator: one stream for genes, one for chromosome orders.
        legacy = np.random.RandomState(config.seed)  # noqa: NPY002
        gene_rng, chrom_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(2))
        pieces, lengths = [], []
        for begin in range(0, cells.size, TOKENIZE_CHUNK):
            chunk = cells[begin : begin + TOKENIZE_CHUNK]
            weights = sampling_weights(counts[chunk].toarray())
            if config.sampling == "legacy":
                ordered = sample_sentences_legacy(weights, config.sample_size, chrom_codes, starts, legacy)
            else:
                sampled = sample_genes(weights, config.sample_size, gene_rng)
                chrom_order = shuffle_chromosomes(sampled, chrom_codes, chrom_rng)
                ordered = order_cell_sentences(sampled, chrom_order, chrom_codes, starts)
            flat, chunk_lengths = assemble_sentences(ordered, token_ids, chrom_codes, config.chrom_token_offset)
            pieces.append(flat)
            lengths.append(chunk_lengths)
        flat = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int32)
        lengths_all = np.concatenate(lengths) if lengths else np.empty(0, dtype=np.int64)
        offsets = np.concatenate(([0], np.cumsum(lengths_all)))

        too_long = lengths_all > config.pad_length
        if too_long.any():
            for row, length in zip(cells[too_long], lengths_all[too_long], strict=True):
                dropped[int(row)] = f"sentence of {length} tokens exceeds pad_length={config.pad_length}"
            flat = flat[np.repeat(~too_long, lengths_all)]
            cells, lengths_all = cells[~too_long], lengths_all[~too_long]
            offsets = np.concatenate(([0], np.cumsum(lengths_all)))
        padded = (official_batch_lengths(lengths_all, config.batch_size) if config.padding_mask == "additive"
                  else lengths_all)
        return TokenizedCells(cell_index=cells.astype(np.int64), lengths=padded.astype(np.int64),
                              arrays={"token_ids": flat, "offsets": offsets.astype(np.int64),
                                      "sentence_lengths": lengths_all.astype(np.int64)},
                              dropped=dict(sorted(dropped.items())), n_genes_matched=n_matched,
                              gene_known=where >= 0)

    def collate(self, tokens: TokenizedCells, rows: npt.NDArray[np.int64]) -> dict[str, torch.Tensor]:
        """Pad the chosen sentences to the longest (official) length among them.

        Returns ``token_ids`` (int64), ``attention_mask`` (float, 1 real / 0 pad, as official) and
        ``padded_lengths`` (each cell's official batch length).
        """
        rows = np.asarray(rows, dtype=np.int64)
        offsets = tokens.arrays["offsets"]
        sentence = tokens.arrays["sentence_lengths"][rows]
        width = int(tokens.lengths[rows].max())
        ids = np.full((rows.size, width), PAD_TOKEN, dtype=np.int64)
        position = np.arange(width)[None, :]
        real = position < sentence[:, None]
        ids[real] = tokens.arrays["token_ids"][(offsets[rows][:, None] + position)[real]]
        return {"token_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(real.astype(np.float32)),
                "padded_lengths": torch.from_numpy(tokens.lengths[rows].copy())}

    def encode(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return the L2-normalised CLS embeddings (cells x output_dim); differentiable."""
        device = self.device
        token_ids = batch["token_ids"].to(device)
        padded_lengths = batch.get("padded_lengths")
        bias = padding_bias(batch["attention_mask"].to(device),
                            None if padded_lengths is None else padded_lengths.to(device), self.config.padding_mask)
        return self.module(token_ids, bias)["embedding"]

    def embed(self, adata: ad.AnnData, *, layer: str | None = None, batch_size: int | None = None,
              progress: Progress | None = None) -> npt.NDArray[np.float32]:
        """Embed cells; ``batch_size`` (default `UCEConfig.batch_size`) is a speed knob only.

        Each cell sees the padding of its official batch whatever ``batch_size`` is (see `padding_bias`).
        """
        return super().embed(adata, layer=layer, batch_size=batch_size or self.config.batch_size, progress=progress)

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts.update(species=self.config.species, nlayers=self.config.nlayers, sampling=self.config.sampling,
                     seed=self.config.seed, padding_mask=self.config.padding_mask)
        return facts
