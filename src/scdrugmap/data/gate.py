"""The validation gate: what every command, `scdrugmap.tl` function and the web worker run before heavy work.

One function, `validate_input`, in two steps:

1. **The file** (a path; nothing read into memory): readable, HDF5, AnnData, every element in an
   encoding this anndata can read, no links or external storage, no values declared but never
   written (chunks left to a non-zero fill value: a 1.8 MB file can declare 25,000 x 20,000 ones),
   names as long as the matrix, at least one cell and one gene, a numeric matrix, a consistent
   sparse structure, and the memory it needs against a budget (``--max-memory``; by default most
   of the memory available now, see `default_memory_budget`): commands that hold the matrix need
   about `LOAD_FACTOR` times its size, streaming ones (``check``, ``embed --executor ray``) a block.
2. **The values** (a path opened backed, read in blocks, or an AnnData in memory): NaN, inf,
   negative values where the model needs counts, duplicate cell or gene names. This is the
   first part of ``scdrugmap check`` (`scdrugmap.data.check.matrix_report`), the same code.

Each problem raises a `SchemaError` of one line naming the file, the element and the fix.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from scdrugmap.errors import SchemaError

if TYPE_CHECKING:
    import anndata as ad
    import h5py

log = logging.getLogger(__name__)

Needs = Literal["counts", "nonnegative", "any"]
#: Environment variable holding the default memory budget (e.g. ``8G``), as ``--max-memory`` does.
MEMORY_ENV = "SCDRUGMAP_MAX_MEMORY"
#: Share of the memory available now that the default budget takes (the rest stays for everything else).
AVAILABLE_SHARE = 0.8
#: Peak memory of a command holding the matrix, in multiples of the matrix in memory (measured on a dense
#: 20,000 x 2,000 float32 file: predict with a PCA head 3.2x, embed with PCA 3.9x, over the interpreter).
LOAD_FACTOR = 4
#: Memory of one block a streaming pass holds (`scdrugmap.data.check.DENSE_BLOCK_VALUES` float32 values).
STREAM_BLOCK_BYTES = 2**27
#: Estimated memory of one variable-length string once read (a Python str and its pointer).
STRING_BYTES = 64
#: Most HDF5 objects a file may hold (anndata files hold tens to a few thousands).
MAX_OBJECTS = 200_000
#: A file may expand by at most this factor when read, where a caller asks (the web server does).
DEFAULT_MAX_EXPANSION = 200
#: Expansion is only judged above this many bytes in memory.
EXPANSION_FLOOR = 64 * 2**20
#: Encodings anndata 0.10-0.12 reads (``encoding-type`` attribute); others raise IORegistryError on reading.
KNOWN_ENCODINGS = frozenset({
    "anndata", "raw", "dataframe", "csr_matrix", "csc_matrix", "array", "string-array", "categorical", "dict",
    "numeric-scalar", "string", "nullable-integer", "nullable-boolean", "nullable-string-array", "awkward-array",
    "rec-array", "bytes", "null",
})
NUMERIC_KINDS = "biuf"
#: The first bytes of every HDF5 file.
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


# --- sizes and the budget ---------------------------------------------------------------------------------

def format_bytes(n: float) -> str:
    """Return ``n`` bytes as a short human size (``1.9 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} PiB"


def parse_memory(text: str | float | None) -> int | None:
    """Return a memory size in bytes from ``8G``, ``512MiB``, ``2.5GB``, ``1e9`` or a number of bytes (None stays None).

    Raises
    ------
    SchemaError
        When the text is not a positive size.
    """
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    value = str(text).strip().lower().replace(" ", "").removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    number = value[: len(value) - len(unit)] if unit else value
    try:
        size = float(number) * _UNITS[unit]
    except ValueError:
        size = float("nan")
    if not math.isfinite(size) or size <= 0:
        msg = f"memory size {text!r} is not a size; write e.g. 8G, 512M or 2.5GiB."
        raise SchemaError(msg)
    return int(size)


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_room() -> int | None:
    """Return the memory this process's cgroup (v2) may still use, or None when it has no limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def default_memory_budget() -> int:
    """Return the memory budget when none is given: ``SCDRUGMAP_MAX_MEMORY``, or `AVAILABLE_SHARE` of what is free.

    Free memory is the smallest of the machine's available memory, the room left in this process's
    cgroup, and its address-space limit (``ulimit -v``).
    """
    configured = os.environ.get(MEMORY_ENV)
    if configured:
        return int(parse_memory(configured) or 0)
    candidates = [_meminfo("MemAvailable"), _cgroup_room()]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        candidates.append(soft)
    known = [c for c in candidates if c is not None]
    if not known:
        try:
            known = [os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
        except (ValueError, OSError):
            known = [8 * 2**30]
            log.warning("cannot tell this machine's memory; the memory budget is 8 GiB (set --max-memory)")
    return int(min(known) * AVAILABLE_SHARE)


# --- facts ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputFacts:
    """What the gate learnt about an input, before anything heavy read it."""

    source: str
    n_obs: int
    n_vars: int
    #: ``dense``, ``csr`` or ``csc``: how the checked matrix (X or the layer) is stored.
    layout: str = "dense"
    dtype: str = ""
    #: Stored values of the matrix (n_obs x n_vars when dense).
    nnz: int = 0
    #: The checked matrix in memory, everything anndata reads into memory, and the file on disk.
    matrix_bytes: int = 0
    total_bytes: int = 0
    file_bytes: int = 0
    #: Memory the intended use needs, and the budget it was held against.
    needed_bytes: int = 0
    budget_bytes: int = 0
    value_kind: str | None = None

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass
class _Element:
    """Sizes of the datasets under one top-level element (X, obs, layers/counts, ...)."""

    declared: int = 0
    stored: int = 0
    #: The dataset that expands most from disk to memory: (ratio, declared bytes, stored bytes, path).
    worst: tuple[float, int, int, str] = (0.0, 0, 0, "")


def _refuse(source: str, where: str, message: str) -> SchemaError:
    return SchemaError(f"{source}: {where}: {message}" if where else f"{source}: {message}")


# --- step 1: the file -------------------------------------------------------------------------------------

def _open_file(path: Path, source: str) -> h5py.File:
    import h5py

    if not path.exists():
        raise _refuse(source, "", "no such file. Check the path.")
    if path.is_dir():
        raise _refuse(source, "", "is a folder, not an .h5ad file.")
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(HDF5_SIGNATURE))
    except PermissionError as err:
        raise _refuse(source, "", "permission denied: this user cannot read the file. Fix its permissions "
                      "(chmod u+r) or copy it somewhere readable.") from err
    except OSError as err:
        raise _refuse(source, "", f"cannot be read ({os.strerror(err.errno or errno.EIO)}).") from err
    if not head:
        raise _refuse(source, "", "the file is empty (0 bytes). Write it again with AnnData.write_h5ad.")
    if head != HDF5_SIGNATURE:
        raise _refuse(source, "", "not an h5ad file (no HDF5 signature). Convert it with anndata/scanpy and "
                      "write_h5ad.")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise _refuse(source, "", "HDF5 signature but the file is damaged or truncated (HDF5 cannot open it). "
                      "Copy or write it again.") from err


def _declared_bytes(dataset: h5py.Dataset) -> int:
    import h5py

    size = int(np.prod(dataset.shape, dtype=object)) if dataset.shape else 1
    dtype = dataset.dtype
    if dtype.kind == "O" or h5py.check_string_dtype(dtype) is not None and h5py.check_string_dtype(dtype).length is None:
        return size * STRING_BYTES
    return size * dtype.itemsize


def _unwritten(dataset: h5py.Dataset) -> tuple[int, int] | None:
    """Return (allocated, total) chunks of a dataset whose unwritten values read as a non-zero fill; else None."""
    if not dataset.shape or dataset.size == 0 or dataset.dtype.kind not in NUMERIC_KINDS:
        return None
    fill = dataset.fillvalue
    try:
        nonzero_fill = bool(np.any(np.asarray(fill) != 0))
    except (TypeError, ValueError):
        nonzero_fill = True
    if not nonzero_fill:
        return None  # unwritten chunks read as zeros: sparse data stored densely, not a bomb
    if dataset.chunks is None:
        return (0, 1) if dataset.id.get_storage_size() == 0 else None
    total = 1
    for length, chunk in zip(dataset.shape, dataset.chunks, strict=True):
        total *= -(-int(length) // int(chunk))
    allocated = int(dataset.id.get_num_chunks())
    return (allocated, total) if allocated < total else None


def _walk(root: h5py.File, source: str) -> dict[str, _Element]:
    """Visit every object once; refuse links, external storage, unknown encodings and unwritten values."""
    import h5py

    elements: dict[str, _Element] = {}
    seen: set[int] = set()
    stack: list[tuple[str, h5py.Group]] = [("", root)]
    count = 0
    while stack:
        prefix, group = stack.pop()
        for name in group:
            path = f"{prefix}/{name}" if prefix else name
            link = group.get(name, getlink=True)
            if isinstance(link, (h5py.ExternalLink, h5py.SoftLink)):
                raise _refuse(source, path, "is a link to other data, which AnnData files never hold. Write the "
                              "file again with AnnData.write_h5ad.")
            count += 1
            if count > MAX_OBJECTS:
                raise _refuse(source, "", f"holds more than {MAX_OBJECTS:,} HDF5 objects; an AnnData file holds "
                              "far fewer. Write it again with AnnData.write_h5ad.")
            item = group[name]
            key = hash(item.id)
            if key in seen:
                raise _refuse(source, path, "is stored twice (a hard link). Write the file again with "
                              "AnnData.write_h5ad.")
            seen.add(key)
            encoding = item.attrs.get("encoding-type")
            if isinstance(encoding, bytes):
                encoding = encoding.decode(errors="replace")
            if encoding is not None and str(encoding) not in KNOWN_ENCODINGS:
                version = item.attrs.get("encoding-version", "?")
                raise _refuse(source, path, f"is stored as {str(encoding)!r} (version {version!s}), an encoding "
                              "this anndata cannot read. Write the file with a matching anndata, update anndata, "
                              "or remove that element.")
            element = elements.setdefault(path.split("/")[0], _Element())
            if isinstance(item, h5py.Group):
                stack.append((path, item))
                continue
            if item.is_virtual or item.external:
                raise _refuse(source, path, "keeps its values outside the file (virtual or external storage). "
                              "Write the file again with AnnData.write_h5ad.")
            unwritten = _unwritten(item)
            if unwritten is not None:
                allocated, total = unwritten
                shape = " x ".join(f"{n:,}" for n in item.shape)
                fill = np.asarray(item.fillvalue).ravel()[0].item()
                raise _refuse(source, path, f"declares {shape} values but stores only {allocated:,} of its "
                              f"{total:,} chunks; the rest would read as {fill}. The values were never "
                              "written (a truncated or crafted file). Write the file again with AnnData.write_h5ad.")
            declared, stored = _declared_bytes(item), int(item.id.get_storage_size())
            element.declared += declared
            element.stored += stored
            if declared > EXPANSION_FLOOR and declared / max(stored, 1) > element.worst[0]:
                element.worst = (declared / max(stored, 1), declared, stored, path)
    return elements


def _index_length(group: h5py.Group) -> int | None:
    import h5py

    if not isinstance(group, h5py.Group):
        return int(group.shape[0]) if getattr(group, "shape", None) else None
    name = group.attrs.get("_index")
    if isinstance(name, bytes):
        name = name.decode()
    if name is None or name not in group or not isinstance(group[name], h5py.Dataset):
        return None
    return int(group[name].shape[0]) if group[name].shape else None


def _matrix_facts(root: h5py.File, name: str, source: str) -> tuple[str, tuple[int, int], str, int]:
    """Return (layout, shape, dtype, stored values) of the matrix at ``name``, refusing a broken structure."""
    import h5py

    item = root[name]
    if isinstance(item, h5py.Dataset):
        if len(item.shape) != 2:
            raise _refuse(source, name, f"has shape {item.shape}; an expression matrix is cells x genes (2-D).")
        return "dense", (int(item.shape[0]), int(item.shape[1])), str(item.dtype), int(item.size)
    encoding = item.attrs.get("encoding-type", item.attrs.get("h5sparse_format", ""))
    encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
    layout = {"csr_matrix": "csr", "csc_matrix": "csc", "csr": "csr", "csc": "csc"}.get(encoding)
    parts = ("data", "indices", "indptr")
    if layout is None or any(part not in item or not isinstance(item[part], h5py.Dataset) for part in parts):
        raise _refuse(source, name, f"is a group stored as {encoding or 'nothing known'!r}, not a dense array or "
                      "a CSR/CSC sparse matrix. Write the file again with AnnData.write_h5ad.")
    shape_attr = item.attrs.get("shape", item.attrs.get("h5sparse_shape"))
    try:
        shape = tuple(int(n) for n in shape_attr)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 2 or min(shape) < 0:
        raise _refuse(source, name, f"has no valid 'shape' attribute ({shape_attr!r}). Write the file again "
                      "with AnnData.write_h5ad.")
    data, indices, indptr = (item[part] for part in parts)
    major = shape[0] if layout == "csr" else shape[1]
    if data.shape != indices.shape or len(data.shape) != 1 or indptr.shape != (major + 1,):
        raise _refuse(source, name, f"is a damaged {layout.upper()} matrix: {data.shape[0] if data.shape else 0:,} "
                      f"values, {indices.shape[0] if indices.shape else 0:,} indices and "
                      f"{indptr.shape[0] if indptr.shape else 0:,} pointers for {major:,} "
                      f"{'rows' if layout == 'csr' else 'columns'}. Write the file again with AnnData.write_h5ad.")
    if data.dtype.kind not in NUMERIC_KINDS:
        raise _refuse(source, name, f"holds {data.dtype} values, not numbers. Store expression as integers or "
                      "floats.")
    pointers = np.asarray(indptr[:], dtype=np.int64)
    if pointers[0] != 0 or pointers[-1] != data.shape[0] or (np.diff(pointers) < 0).any():
        raise _refuse(source, name, f"is a damaged {layout.upper()} matrix: its pointers do not run from 0 up to "
                      f"its {data.shape[0]:,} values. Write the file again with AnnData.write_h5ad.")
    return layout, shape, str(data.dtype), int(data.shape[0])


def inspect_h5ad(path: str | Path, *, layer: str | None = None, max_memory: int | str | None = None,
                 in_memory: bool = True, max_expansion: float | None = None,
                 source: str | None = None) -> InputFacts:
    """Check an ``.h5ad`` file at the HDF5 level, reading no matrix, and return its facts (step 1 of the gate).

    Parameters
    ----------
    path
        The file.
    layer
        The layer the caller will read instead of ``X``.
    max_memory
        Memory budget in bytes (or ``8G``); None takes `default_memory_budget`.
    in_memory
        The caller reads the whole file into memory (``read_h5ad``), needing about `LOAD_FACTOR` times the
        matrix; False for a streaming caller (``read_h5ad(backed=True)``, blocks of rows), which holds
        everything but ``X`` and one block, and refuses only a dense ``X`` no command could hold.
    max_expansion
        Refuse a file whose contents need more than this many times its size on disk in memory
        (compression bombs); None allows any.
    source
        Name in messages (default: the path).

    Raises
    ------
    SchemaError
        One line naming the file, the element and the fix.
    """
    path = Path(path)
    source = source or str(path)
    budget = parse_memory(max_memory) if max_memory is not None else default_memory_budget()
    assert budget is not None
    root = _open_file(path, source)
    with root:
        try:
            return _inspect_open(root, path, source, layer=layer, budget=budget, in_memory=in_memory,
                                 max_expansion=max_expansion)
        except (KeyError, ValueError, TypeError, RuntimeError) as err:  # h5py on a damaged object
            if isinstance(err, SchemaError):
                raise
            raise _refuse(source, "", f"HDF5 but damaged ({err.__class__.__name__}: {err}). Write it again with "
                          "AnnData.write_h5ad.") from err
        except OSError as err:
            raise _refuse(source, "", f"HDF5 but parts of it cannot be read ({err}); the file is damaged or "
                          "truncated. Copy or write it again.") from err


def _inspect_open(root: h5py.File, path: Path, source: str, *, layer: str | None, budget: int, in_memory: bool,
                  max_expansion: float | None) -> InputFacts:
    import h5py

    encoding = root.attrs.get("encoding-type")
    if not all(name in root for name in ("obs", "var")) or (encoding is not None and str(
            encoding.decode() if isinstance(encoding, bytes) else encoding) != "anndata"):
        raise _refuse(source, "", "HDF5 but not an AnnData file (no obs and var). Write it with "
                      "AnnData.write_h5ad.")
    elements = _walk(root, source)
    name = "X" if layer is None else f"layers/{layer}"
    if name not in root:
        if layer is not None:
            present = sorted(root["layers"]) if "layers" in root and isinstance(root["layers"], h5py.Group) else []
            raise _refuse(source, f"layers[{layer!r}]", f"is not in the file; layers present: {present}. "
                          "Use --layer.")
        raise _refuse(source, "X", "there is no expression matrix. Store the counts in X (or name a layer "
                      "with --layer).")
    layout, shape, dtype, nnz = _matrix_facts(root, name, source)
    where = "X" if layer is None else f"layers[{layer!r}]"
    if np.dtype(dtype).kind not in NUMERIC_KINDS:
        raise _refuse(source, where, f"holds {dtype} values, not numbers. Store expression as integers or floats.")
    n_obs, n_vars = shape
    for element, expected, axis in (("obs", n_obs, "cells"), ("var", n_vars, "genes")):
        length = _index_length(root[element])
        if length is not None and length != expected:
            raise _refuse(source, element, f"names {length:,} {axis} but {where} has {expected:,}; the file is "
                          "inconsistent. Write it again with AnnData.write_h5ad.")
    if n_obs == 0 or n_vars == 0:
        raise _refuse(source, where, f"the data has {n_obs:,} cells and {n_vars:,} genes; nothing to use.")
    if layer is not None and "X" in root:
        _, x_shape, _, _ = _matrix_facts(root, "X", source)
        if x_shape != shape:
            raise _refuse(source, where, f"is {shape[0]:,} x {shape[1]:,} but X is {x_shape[0]:,} x "
                          f"{x_shape[1]:,}; the file is inconsistent.")
    top = name.split("/")[0]
    matrix = _Element()
    if layer is None:
        matrix = elements.get("X", _Element())
    else:
        item = root[name]
        datasets = [item] if isinstance(item, h5py.Dataset) else [item[p] for p in ("data", "indices", "indptr")]
        for dataset in datasets:
            matrix.declared += _declared_bytes(dataset)
            matrix.stored += int(dataset.id.get_storage_size())
    total = sum(e.declared for e in elements.values())
    file_bytes = path.stat().st_size
    shape_text = f"{n_obs:,} x {n_vars:,} {layout} {dtype}"
    ratio, declared, kept, worst = max((e.worst for e in elements.values()), default=(0.0, 0, 0, ""))
    if max_expansion is not None and ratio > max_expansion:
        raise _refuse(source, worst, f"{format_bytes(kept)} on disk expand to {format_bytes(declared)} in memory "
                      f"({ratio:,.0f}-fold, more than the {max_expansion:g}-fold allowed here); {where} is "
                      f"{shape_text}. Store X sparse, or send fewer cells.")
    counters = 16 * (n_obs + n_vars)
    if in_memory:
        needed = total + (LOAD_FACTOR - 1) * matrix.declared + counters
    else:
        x_bytes = elements.get("X", _Element()).declared
        needed = total - x_bytes + min(matrix.declared, STREAM_BLOCK_BYTES) + counters
        if layout == "dense" and top == "X" and matrix.declared > budget:
            raise _refuse(source, where, f"declares {shape_text} values ({format_bytes(matrix.declared)} in memory), "
                          f"more than the memory budget of {format_bytes(budget)}: no command can hold it. Store X "
                          "sparse, split the cells into several files, or raise --max-memory.")
    if needed > budget:
        use = (f"about {LOAD_FACTOR}x {where} ({shape_text}, {format_bytes(matrix.declared)})" if in_memory
               else f"{where} is {shape_text}")
        raise _refuse(source, "", f"reading it needs about {format_bytes(needed)} ({use}), more than the memory "
                      f"budget of {format_bytes(budget)}. Split the cells into several files, store X sparse, or "
                      "raise --max-memory (or SCDRUGMAP_MAX_MEMORY).")
    log.debug("gate: %s is %s, %s in memory, %s needed of a %s budget", source, shape_text, format_bytes(total),
              format_bytes(needed), format_bytes(budget))
    return InputFacts(source=source, n_obs=n_obs, n_vars=n_vars, layout=layout, dtype=dtype, nnz=nnz,
                      matrix_bytes=matrix.declared, total_bytes=total, file_bytes=file_bytes, needed_bytes=needed,
                      budget_bytes=budget)


# --- step 2: the values -----------------------------------------------------------------------------------

def validate_adata(adata: ad.AnnData, *, needs: Needs = "any", layer: str | None = None,
                   source: str = "adata") -> dict[str, Any]:
    """Refuse an AnnData (in memory or backed) the models cannot read; return the facts `matrix_report` found.

    Zero cells or genes, a missing layer, a non-numeric matrix, NaN or inf, values unfit for ``needs``,
    duplicate cell or gene names: the first such problem raises. Reads the matrix once, in blocks.

    Raises
    ------
    SchemaError
        ``"<source>: <where>: <what>. <fix>"``.
    """
    from anndata import AnnData

    from scdrugmap.data.check import matrix_report

    if not isinstance(adata, AnnData):
        msg = f"expected an AnnData, got {type(adata).__name__}; read a file with anndata.read_h5ad first."
        raise SchemaError(msg)
    report, _ = matrix_report(adata, source=source, layer=layer, needs=needs)
    if report.errors:
        first = report.errors[0]
        message = first.message.removeprefix(f"{source}: ")
        raise _refuse(source, first.where, message)
    return report.facts


def validate_input(data: str | Path | ad.AnnData, *, needs: Needs = "any", layer: str | None = None,
                   max_memory: int | str | None = None, source: str | None = None, in_memory: bool = True,
                   scan: bool = True, max_expansion: float | None = None) -> InputFacts:
    """Run the validation gate on a file or an AnnData; return its facts or raise one clear `SchemaError`.

    Parameters
    ----------
    data
        An ``.h5ad`` path (checked at the HDF5 level first, see `inspect_h5ad`, then opened backed for the
        values), or an AnnData (in memory or backed: the values only).
    needs
        What the model needs: ``counts``, ``nonnegative`` or ``any`` (NaN and inf are refused for all).
    layer
        Expression layer used instead of ``X``.
    max_memory
        Memory budget (bytes or ``8G``; None: `default_memory_budget`). Files only.
    source
        Name in messages (default: the path, or ``adata``).
    in_memory
        The caller reads the whole file (see `inspect_h5ad`).
    scan
        Also read the values (step 2). ``scdrugmap check`` reads them itself, reporting every problem.
    max_expansion
        See `inspect_h5ad` (the web server limits it).

    Raises
    ------
    SchemaError
        One line naming the file, the element and the fix.

    Examples
    --------
    >>> import scdrugmap as sdm
    >>> from scdrugmap.data.gate import validate_input
    >>> validate_input(sdm.datasets.simulate(n_cells=60, n_genes=200, seed=0)).n_obs
    60
    """
    if not isinstance(data, (str, os.PathLike)):  # an AnnData (anndata is imported only then: a refused file is quick)
        found = validate_adata(data, needs=needs, layer=layer, source=source or "adata")
        return InputFacts(source=source or "adata", n_obs=int(data.n_obs), n_vars=int(data.n_vars),
                          value_kind=found.get("value_kind"))
    path = Path(data)
    source = source or str(path)
    facts = inspect_h5ad(path, layer=layer, max_memory=max_memory, in_memory=in_memory,
                         max_expansion=max_expansion, source=source)
    if not scan:
        return facts
    from dataclasses import replace

    from scdrugmap.data.io import read_h5ad

    backed = read_h5ad(path, backed=True)
    try:
        found = validate_adata(backed, needs=needs, layer=layer, source=source)
    finally:
        backed.file.close()
    return replace(facts, value_kind=found.get("value_kind"))
