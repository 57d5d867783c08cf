"""Gene-set collections in the GMT format, read and written without any network access.

A GMT file has one gene set per line, tab-separated: the set's name, a description (often a URL, may be
empty), then its genes. This is the format of MSigDB, Enrichr and the simulator's planted programs
(`scdrugmap.data.simulate.simulated_gene_sets`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from scdrugmap.errors import SchemaError


def read_gmt(path: str | Path) -> dict[str, list[str]]:
    """Read a GMT file into ``{set name: genes}``, in file order.

    Blank lines and lines starting with ``#`` are skipped; a gene listed twice in one set is kept once;
    empty gene fields (trailing tabs) are ignored.

    Raises
    ------
    SchemaError
        When the file is missing, a line has no gene, or a set name appears twice.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: no such gene-set file. Give a GMT file (name<TAB>description<TAB>gene<TAB>...)."
        raise SchemaError(msg)
    gene_sets: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.rstrip("\r\n").split("\t")
            name = fields[0].strip()
            genes = list(dict.fromkeys(g.strip() for g in fields[2:] if g.strip()))
            if not name or not genes:
                msg = (f"{path}:{number}: a GMT line needs a name, a description and at least one gene, "
                       f"tab-separated; found {len(fields)} field(s).")
                raise SchemaError(msg)
            if name in gene_sets:
                msg = f"{path}:{number}: gene set {name!r} appears twice; give each set a unique name."
                raise SchemaError(msg)
            gene_sets[name] = genes
    if not gene_sets:
        msg = f"{path}: no gene set found; is it a GMT file?"
        raise SchemaError(msg)
    return gene_sets


def write_gmt(gene_sets: Mapping[str, Iterable[str]], path: str | Path, *,
              descriptions: Mapping[str, str] | None = None) -> Path:
    """Write ``{set name: genes}`` as a GMT file, atomically (a temporary file, then a rename).

    Raises
    ------
    SchemaError
        When a name or gene contains a tab or a line break, or a set is empty.
    """
    path = Path(path)
    descriptions = descriptions or {}
    lines = []
    for name, genes in gene_sets.items():
        genes = [str(g) for g in genes]
        fields = [str(name), str(descriptions.get(name, "")), *genes]
        if not genes or any(("\t" in f) or ("\n" in f) or ("\r" in f) for f in fields):
            msg = f"gene set {name!r}: empty, or a name/gene holds a tab or line break; GMT cannot store it."
            raise SchemaError(msg)
        lines.append("\t".join(fields))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path
