"""Read expression data into AnnData, with errors that name the file and the fix.

Also imports the scDrugMap distribution format: one tab-separated file per data
set, column 0 the cell id, column 1 ``Condition`` (sensitive/resistant), then one
column per gene symbol; the file name carries the data set's subgroup name.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scdrugmap.data import schema
from scdrugmap.data.gate import HDF5_SIGNATURE
from scdrugmap.errors import SchemaError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import anndata as ad
    import scipy.sparse as sp

log = logging.getLogger(__name__)

#: Rows per block of `iter_row_blocks`.
CHUNK_ROWS = 10_000
#: Values per dense block of `iter_row_blocks` (fewer rows where genes are many): 128 MiB of float32.
DENSE_BLOCK_VALUES = 2**25


def read_h5ad(path: str | Path, *, backed: bool = False) -> ad.AnnData:
    """Read an ``.h5ad`` file, refusing a missing file or one that is not h5ad.

    Parameters
    ----------
    path
        The file.
    backed
        Open read-only in backed mode, leaving ``X`` on disk.

    Raises
    ------
    SchemaError
        When the file does not exist, is not HDF5, or is HDF5 but not AnnData.
    """
    import anndata as ad

    path = Path(path)
    if not path.exists():
        msg = f"{path}: no such file. Check the path."
        raise SchemaError(msg)
    if path.is_dir():
        msg = f"{path}: is a folder, not an .h5ad file."
        raise SchemaError(msg)
    with open(path, "rb") as handle:
        head = handle.read(len(HDF5_SIGNATURE))
    if head != HDF5_SIGNATURE:
        msg = f"{path}: not an h5ad file (no HDF5 signature). Convert it with anndata/scanpy and write_h5ad."
        raise SchemaError(msg)
    try:
        with warnings.catch_warnings():  # duplicate names: the gate and `check` report them as errors, once
            warnings.filterwarnings("ignore", message=r"(Observation|Variable) names are not unique")
            return ad.read_h5ad(path, backed="r" if backed else None)
    except PermissionError as err:
        msg = f"{path}: permission denied: this user cannot read the file. Fix its permissions (chmod u+r)."
        raise SchemaError(msg) from err
    except (KeyError, OSError, ValueError, TypeError, IndexError, AttributeError, _registry_error()) as err:
        reason = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        msg = f"{path}: HDF5 but not a readable AnnData file ({reason}). Write it with AnnData.write_h5ad."
        raise SchemaError(msg) from err


def _registry_error() -> type[Exception]:
    """Return anndata's error for an element in an encoding it cannot read (private module; Exception if moved)."""
    try:
        from anndata._io.specs.registry import IORegistryError
    except ImportError:  # pragma: no cover - a later anndata moved it; unknown encodings still end as one line
        return LookupError
    return IORegistryError


def write_atomic(path: str | Path, write: Callable[[str], object], *, suffix: str = ".tmp") -> Path:
    """Write ``path`` through ``write(tmp)`` into a temporary file beside it, then rename it into place.

    A killed or failed write leaves ``path`` as it was and no temporary file; concurrent writers each
    have their own temporary file (the last rename wins, whole).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=suffix)
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_h5ad_atomic(adata: ad.AnnData, path: str | Path) -> Path:
    """Write ``adata`` to ``path`` through a temporary file, so a killed write leaves no half file."""
    return write_atomic(path, adata.write_h5ad, suffix=".h5ad.tmp")


def add_obsm_atomic(source: str | Path, target: str | Path, key: str, values: np.ndarray, *,
                    facts: dict[str, str] | None = None, obs_columns: dict[str, np.ndarray] | None = None) -> Path:
    """Write the ``.h5ad`` at ``source`` to ``target`` with ``obsm[key] = values``, without reading its matrix.

    The file is copied, the embedding written into the copy (and ``facts`` into ``uns['scdrugmap'][key]``,
    ``obs_columns`` into ``obs``, replacing columns of the same name), and the copy renamed over ``target``:
    a killed run leaves ``target`` as it was, and memory stays small however large ``X`` is.
    """
    import shutil

    import h5py
    from anndata.io import read_elem, write_elem

    source = Path(source)

    def write(tmp: str) -> None:
        shutil.copyfile(source, tmp)
        with h5py.File(tmp, "a") as store:
            obs = store["obs"]
            n_obs = obs[obs.attrs["_index"]].shape[0]
            if values.shape[0] != n_obs:
                msg = f"{source}: {values.shape[0]} embeddings for {n_obs} cells."
                raise SchemaError(msg)
            if obs_columns:
                frame = read_elem(obs)
                for column, column_values in obs_columns.items():
                    if len(column_values) != n_obs:
                        msg = f"{source}: {len(column_values)} values for obs[{column!r}] but {n_obs} cells."
                        raise SchemaError(msg)
                    frame[column] = np.asarray(column_values)
                del store["obs"]
                write_elem(store, "obs", frame)
            if "obsm" not in store:
                write_elem(store, "obsm", {})
            if key in store["obsm"]:
                del store["obsm"][key]
            write_elem(store["obsm"], key, values)
            if facts is not None:
                if "uns" not in store:
                    write_elem(store, "uns", {})
                previous = read_elem(store["uns"]["scdrugmap"]) if "scdrugmap" in store["uns"] else {}
                if "scdrugmap" in store["uns"]:
                    del store["uns"]["scdrugmap"]
                write_elem(store["uns"], "scdrugmap", {**previous, key: facts})

    return write_atomic(target, write, suffix=".h5ad.tmp")


def write_h5ad_changes(adata: ad.AnnData, source: str | Path, target: str | Path, *,
                       changed: tuple[str, ...] = ("obs", "uns")) -> Path:
    """Write ``adata``, read from the ``.h5ad`` at ``source`` and changed only in ``changed``, to ``target``.

    What ``adata.write_h5ad(target)`` writes (read back equal, tested), without encoding the matrix again:
    every other element of ``source`` is copied as stored (HDF5 object copies, no decoding) and the
    ``changed`` ones are written from ``adata``. As ``write_h5ad`` does, string columns of ``obs`` and
    ``var`` become categoricals first; ``var`` is written again when that changes it. Where ``raw`` would
    change, or ``target`` is ``source``, the file is written whole.
    """
    import h5py
    from anndata.io import write_elem

    source, target = Path(source), Path(target)
    var_types = adata.var.dtypes.to_dict()
    raw_types = None if adata.raw is None else adata.raw.var.dtypes.to_dict()
    adata.strings_to_categoricals()
    if adata.raw is not None:
        adata.strings_to_categoricals(adata.raw.var)
    raw_changed = adata.raw is not None and adata.raw.var.dtypes.to_dict() != raw_types
    if raw_changed or target.resolve() == source.resolve():
        adata.write_h5ad(target)
        return target
    if adata.var.dtypes.to_dict() != var_types:
        changed = (*changed, "var")
    with h5py.File(source, "r") as stored, h5py.File(target, "w") as store:
        for key, value in stored.attrs.items():
            store.attrs[key] = value
        for name in stored:
            if name not in changed:
                stored.copy(stored[name], store, name=name)
        for name in changed:
            write_elem(store, name, getattr(adata, name) if name != "uns" else dict(adata.uns))
    return target


def _open_text(path: Path) -> IO[bytes]:
    import gzip

    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")  # noqa: SIM115


def _first_line(path: Path, bad: Callable[[list[str]], str | None]) -> tuple[int, str] | None:
    """Return (line number, what is wrong) of the first data line ``bad`` describes, reading the file once."""
    with _open_text(path) as handle:
        handle.readline()  # the header
        for number, raw in enumerate(handle, start=2):
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not text.strip():
                continue
            problem = bad(text.split("\t"))
            if problem:
                return number, problem
    return None


def _not_utf8(path: Path) -> tuple[int, str] | None:
    with _open_text(path) as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return number, f"byte 0x{raw[err.start]:02x} at column {err.start + 1}"
    return None


def _not_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return field.strip() != ""
    return False


def _read_tsv_frame(path: Path) -> pd.DataFrame:
    """Parse one distribution file strictly: every line as wide as the header, UTF-8, numbers, finite."""
    fix = "Fix the file (tab-separated: cell id, Condition, one column per gene) and import again."
    try:
        with _open_text(path) as handle:
            header_bytes = handle.readline()
    except OSError as err:
        msg = f"{path}: cannot be read ({err.strerror or err}). Check the file and its permissions."
        raise SchemaError(msg) from err
    if not header_bytes.strip():
        msg = f"{path}: the file is empty (no header line). {fix}"
        raise SchemaError(msg)
    bad_text = _not_utf8(path)
    if bad_text:
        msg = f"{path}: line {bad_text[0]} is not UTF-8 text ({bad_text[1]}). Save the file as UTF-8."
        raise SchemaError(msg)
    header = header_bytes.decode("utf-8").rstrip("\r\n").split("\t")
    genes = header[2:]
    if len(header) < 3 or header[1] != "Condition":
        msg = (f"{path}: line 1 must be a cell id column, 'Condition' (sensitive/resistant), then gene columns; "
               f"found {header[:3]}.")
        raise SchemaError(msg)
    duplicated = pd.Index(genes)[pd.Index(genes).duplicated()].unique().tolist()
    if duplicated:
        msg = f"{path}: line 1 names genes twice (e.g. {duplicated[:3]}). Sum or drop the duplicate columns."
        raise SchemaError(msg)
    width = len(header)

    def wrong_width(fields: list[str]) -> str | None:
        return None if len(fields) == width else f"has {len(fields)} fields; the header has {width}"

    def wrong_value(fields: list[str]) -> str | None:
        for column, field in zip(header[2:], fields[2:], strict=False):
            if _not_number(field):
                return f"has {field[:40]!r} for gene {column!r}, not a number"
            if field.strip() and not np.isfinite(float(field)):
                return f"has {field.strip()!r} for gene {column!r}; values must be finite"
            if not field.strip():
                return f"has no value for gene {column!r}"
        return None

    found = _first_line(path, wrong_width) or _first_line(path, wrong_value)
    if found:
        msg = f"{path}: line {found[0]} {found[1]}. {fix}"
        raise SchemaError(msg)
    try:
        frame = pd.read_csv(path, sep="\t", index_col=0, dtype={header[1]: str}, keep_default_na=False,
                            na_values=[""], skip_blank_lines=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        msg = f"{path}: cannot be parsed ({reason}). {fix}"
        raise SchemaError(msg) from err
    if frame.empty:
        msg = f"{path}: only a header, no cells. {fix}"
        raise SchemaError(msg)
    return frame


def read_distribution_tsv(path: str | Path, *, catalog: pd.DataFrame | None = None) -> ad.AnnData:
    """Read one scDrugMap distribution file into the data contract.

    The subgroup name is the file name without extension; when it matches a
    catalog row's ``subgroup`` (or ``dataset_id``), obs gets that row's study,
    tissue, cancer type, therapy and regimen.

    Raises
    ------
    SchemaError
        Naming the file and line: an empty or header-only file, no ``Condition`` column, a line
        wider or narrower than the header, text that is not UTF-8, a value that is not a finite
        number, unknown labels, duplicate cell ids or gene names.
    """
    import anndata as ad
    import scipy.sparse as sp

    from scdrugmap.data.gate import validate_adata

    path = Path(path)
    frame = _read_tsv_frame(path)
    labels = frame.pop("Condition")
    codes = schema.encode_labels(labels.to_numpy(), column="Condition", source=str(path))
    values = frame.to_numpy(dtype=np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(values), obs=pd.DataFrame(index=frame.index.astype(str)),
                       var=pd.DataFrame(index=frame.columns.astype(str)))
    validate_adata(adata, source=str(path))  # duplicate cell ids, a non-finite value: one line naming the file
    adata.obs[schema.RESPONSE] = pd.Categorical(np.where(codes == 1, schema.SENSITIVE, schema.RESISTANT))
    subgroup = path.name.split(".")[0]
    adata.obs[schema.DATASET] = subgroup
    row = None if catalog is None else match_catalog_row(subgroup, catalog, source=str(path))
    if row is not None:
        for column, field in ((schema.STUDY, "study"), (schema.TISSUE, "tissue"), (schema.CANCER_TYPE, "cancer_type"),
                              (schema.THERAPY, "therapy"), (schema.REGIMEN, "regimen")):
            adata.obs[column] = str(row[field])
        adata.obs[schema.DATASET] = str(row["dataset_id"])
        adata.uns["scdrugmap"] = {"catalog_id": str(row["dataset_id"]), "subgroup": subgroup}
    elif catalog is not None:
        log.warning("%s: %r matches no catalog data set; study, tissue and the other categories stay unset. "
                    "Name the file after its catalog id (e.g. P07.tsv) to fill them.", path, subgroup)
    return adata


def match_catalog_row(name: str, catalog: pd.DataFrame, *, source: str = "") -> pd.Series | None:
    """Return the catalog row a distribution file name stands for, or None.

    Tried in order: the catalog id (``P07``), the subgroup, the original data set name;
    a name that ends with a subgroup shared by several data sets (``GSE161801_pre``)
    must also contain the original data set name (``GSE161801_PI_GSE161801_pre``).

    Raises
    ------
    SchemaError
        When the name fits several data sets equally.
    """
    lowered = name.lower()
    by_id = catalog[catalog["dataset_id"].str.lower() == lowered]
    if len(by_id):
        return by_id.iloc[0]
    subgroups = catalog["subgroup"].fillna("").str.lower()
    originals = catalog["original_dataset"].fillna("").str.lower()
    candidates = catalog[(subgroups != "") & subgroups.map(lambda s: lowered == s or lowered.endswith("_" + s))]
    if len(candidates) > 1:
        narrowed = candidates[candidates["original_dataset"].str.lower().map(lambda o: o in lowered)]
        candidates = narrowed if len(narrowed) else candidates
    if len(candidates) == 0:
        candidates = catalog[(subgroups == "") & (originals == lowered)]
    if len(candidates) > 1:
        ids = ", ".join(candidates["dataset_id"])
        msg = f"{source}: {name!r} fits several catalog data sets ({ids}); rename the file to one of those ids."
        raise SchemaError(msg)
    return candidates.iloc[0] if len(candidates) else None


def import_distribution(source_dir: str | Path, out_dir: str | Path, *,
                        catalog: pd.DataFrame | None = None) -> list[Path]:
    """Convert every ``*.tsv``/``*.txt`` file of ``source_dir`` into an ``.h5ad`` in ``out_dir``: all, or none.

    Every file is converted into a temporary folder beside ``out_dir`` first; only when all of them
    converted are they moved into place, so a bad file (named with its line in the error) leaves
    ``out_dir`` as it was.

    Raises
    ------
    SchemaError
        When the folder holds no distribution file or one of them is malformed (see `read_distribution_tsv`).
    """
    import shutil

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if not source_dir.is_dir():
        msg = f"{source_dir}: no such folder. Point to the folder of the scDrugMap distribution."
        raise SchemaError(msg)
    files = sorted(p for p in source_dir.iterdir() if p.suffix in {".tsv", ".txt"} or p.name.endswith(".tsv.gz"))
    if not files:
        msg = f"{source_dir}: no .tsv files found. Point to the folder of the scDrugMap distribution."
        raise SchemaError(msg)
    names = [f"{path.name.split('.')[0]}.h5ad" for path in files]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        msg = f"{source_dir}: several files would become {clashes[0]}; keep one file per data set."
        raise SchemaError(msg)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.import-", dir=out_dir.parent))
    try:
        for path, name in zip(files, names, strict=True):
            adata = read_distribution_tsv(path, catalog=catalog)
            adata.write_h5ad(staging / name)
            log.info("converted %s: %d cells x %d genes", path.name, adata.n_obs, adata.n_vars)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in names:
            os.replace(staging / name, out_dir / name)
            written.append(out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("imported %d files into %s", len(written), out_dir)
    return written


def data_fingerprint(adata: ad.AnnData, *, layer: str | None = None, chunk_rows: int = 10000) -> str:
    """Return a sha256 of the expression values, cell names and gene names (read in row chunks)."""
    import hashlib

    import scipy.sparse as sp

    digest = hashlib.sha256()
    digest.update("\x00".join(map(str, adata.obs_names)).encode())
    digest.update("\x01".join(map(str, adata.var_names)).encode())
    digest.update(str(layer).encode())
    X = adata.layers[layer] if layer else adata.X
    for start in range(0, adata.n_obs, chunk_rows):
        block = X[start : start + chunk_rows]
        if sp.issparse(block):
            block = sp.csr_matrix(block)
            for part, dtype in ((block.data, np.float32), (block.indices, np.int64), (block.indptr, np.int64)):
                _update_in_slices(digest, part, dtype)
        else:
            _update_in_slices(digest, np.asarray(block).reshape(-1), np.float32)
    return digest.hexdigest()


def _update_in_slices(digest: Any, values: np.ndarray, dtype: type, size: int = 1 << 22) -> None:
    """Feed ``values`` as ``dtype`` to ``digest`` a slice at a time: the same bytes as the whole, no whole copy."""
    for start in range(0, values.size, size):
        digest.update(np.ascontiguousarray(values[start : start + size], dtype=dtype))


def iter_row_blocks(X, *, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray | sp.csr_matrix]]:
    """Yield ``(first row, block)`` over the rows of ``X`` in order, one block in memory at a time.

    Parameters
    ----------
    X
        Cells x genes, in memory (numpy, scipy sparse) or backed (an h5py dataset, or anndata's on-disk
        CSR/CSC datasets from ``read_h5ad(path, backed=True)``).
    chunk_rows
        Rows per block; dense blocks hold at most `DENSE_BLOCK_VALUES` values (fewer rows where genes are
        many).

    Yields
    ------
    The first row of the block and the block: CSR for sparse ``X``, a numpy array for dense ``X``.

    Notes
    -----
    A row-major matrix (CSR, dense; in memory or backed) is read one block of rows at a time. Rows of a
    column-major matrix cannot be sliced cheaply: a CSC (or COO, ...) matrix in memory is converted to CSR
    once, and a backed CSC matrix is read whole (both logged), so prefer CSR files for large data.
    """
    import scipy.sparse as sp

    chunk_rows = max(1, int(chunk_rows))
    n_cells, n_genes = (int(n) for n in X.shape)
    layout = getattr(X, "format", None) if sp.issparse(X) or hasattr(X, "format") else "dense"
    if layout not in ("csr", "dense"):
        log.info("X is stored as %s, not by row: converting it to CSR whole to read it in row blocks", layout)
        X = sp.csr_matrix(X.to_memory() if hasattr(X, "to_memory") else X)
        layout = "csr"
    if layout == "dense":
        chunk_rows = min(chunk_rows, max(1, DENSE_BLOCK_VALUES // max(1, n_genes)))
    for start in range(0, n_cells, chunk_rows):
        block = schema.row_block(X, start, start + chunk_rows)
        yield start, (sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block))
