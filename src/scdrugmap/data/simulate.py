"""Synthetic drug-response collections shaped like the scDrugMap catalog, for tests, benchmarks and demos.

`simulate_collection` lays out studies, data sets and samples exactly as the catalog describes them
(tissue, cancer type, therapy, regimen, and each data set's sample design, e.g. ``pre (resistant 2,
sensitive 1)``), gives each data set its share of cells from the catalog's cell counts, and draws
negative-binomial UMI counts over real human genes from the gene table. Expression is the sum, on the
log scale, of:

- a gene's baseline abundance (ribosomal, mitochondrial and housekeeping genes high);
- a cell-type program on real marker genes (T cells: CD3D, CD3E, ...; malignant cells: lineage markers of
  the cancer type, e.g. MLANA, PMEL for melanoma) and a few random genes;
- a study batch effect (every gene, and sequencing depth) and a patient (sample) effect;
- a drug-resistance program (known resistance genes such as ABCB1, AXL, ALDH1A1 up, apoptosis genes such
  as BAX, BBC3 down, plus random genes, a therapy-specific part and a study-specific part) whose activity
  differs between resistant and sensitive cells by ``resistance_strength`` on average, with cell and
  patient spread.

Every cell of a sample shares its label, so a model can lean on patient effects: a cell-level split
rewards recognising patients. Each study shows resistance partly its own way (`STUDY_PROGRAM_SD`), so a
model trained on other studies reads a held-out study less well than pooled folds that saw its patients.
The defaults are chosen so the demo (`scdrugmap benchmark`: 1,500 cells, a PCA head) teaches what real
data shows: with patient-grouped folds a PCA head reaches AUROC about 0.85, the cell-level split inflates
that by about 0.1, and leaving a study out scores lower than pooled folds in cancer type (0.72 against
0.87; about the same in tissue and therapy). At
``resistance_strength=0`` nothing but patient and study effects is left: within a study, holding some
samples out leaves the opposite labels in training, so a sample-grouped split can score below 0.5.

Nothing here imports torch.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdrugmap.data import schema
from scdrugmap.data.genes import load_gene_table
from scdrugmap.data.genesets import write_gmt
from scdrugmap.errors import SchemaError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import anndata as ad

logger = logging.getLogger(__name__)

Collection = Literal["primary", "validation", "all"]
CELL_TYPE = "cell_type"
TIMEPOINT = "timepoint"
DEFAULT_N_CELLS = 10_000
#: Cells per random-number block: counts depend on (seed, block), never on ``chunk_size``.
RNG_BLOCK_CELLS = 256
#: Median UMIs per cell, and the spread of log library size between cells and between studies.
MEDIAN_UMIS = 2_000
LIBRARY_SD = 0.45
STUDY_DEPTH_SD = 0.3
#: Negative-binomial size (inverse overdispersion) per gene: log-normal around this median.
NB_THETA_MEDIAN = 8.0
NB_THETA_SD = 0.5
#: Genes whose mean can pass this are drawn with numpy's gamma-Poisson sampler; the rest by a screened
#: inverse CDF (see `_block_counts`).
DIRECT_NB_MEAN = 8.0
MAX_CDF_STEPS = 1000
#: The screen's 8-bit uniform slices; its bound is scaled up a little so float32 rounding never drops an
#: entry that could be non-zero (the exact float64 check follows).
UNIFORM_SLICES = 256
SCREEN_SCALE = UNIFORM_SLICES * (1.0 + 1e-4)
#: Log-scale baseline abundance: most genes N(0, BASE_SD); ribosomal-protein and mitochondrial genes, and
#: housekeeping genes, near these levels.
BASE_SD = 1.2
ABUNDANT_LEVEL = 4.0
HOUSEKEEPING_LEVEL = 6.0
RIBOSOMAL_RE = r"^RP[LS]\d+(?:A|AL|X|Y\d?|L\d?)?$"
#: Log-scale effect sizes.
MARKER_EFFECT = 3.0
CELL_TYPE_RANDOM_SD = 0.8
STUDY_EFFECT_SD = 0.35
PATIENT_EFFECT_SD = 0.2
RESISTANCE_EFFECT = 0.7
THERAPY_EFFECT_SD = 0.5
#: Spread of each study's own part of the resistance program (log fold per unit activity, every program
#: gene): cohorts differ in how resistance shows, so a model trained on other studies reads a new one less well.
STUDY_PROGRAM_SD = 1.0
#: Mean difference of the resistance activity between resistant and sensitive cells (``resistance_strength``),
#: chosen so the demo teaches: a PCA head reaches AUROC 0.75 or more under patient-grouped splits.
DEFAULT_RESISTANCE_STRENGTH = 2.5
#: Resistance activity: +strength/2 (resistant) or -strength/2 (sensitive), plus patient and cell spread
#: that do not depend on the label.
PATIENT_ACTIVITY_SD = 0.3
CELL_ACTIVITY_SD = 0.8
#: Shares of the genes in random parts of the programs.
RESISTANCE_GENE_SHARE = 0.015
THERAPY_GENE_SHARE = 0.005
CELL_TYPE_GENE_SHARE = 0.01
#: How much a sample's cell-type mixture varies around its tissue's (Dirichlet concentration).
MIXTURE_CONCENTRATION = 20.0
SAMPLE_SIZE_CONCENTRATION = 4.0

HOUSEKEEPING = ("ACTB", "GAPDH", "B2M", "TMSB4X", "MALAT1", "EEF1A1", "FTL", "FTH1", "TPT1", "MT-CO1", "MT-ND4")
RESISTANCE_UP = ("ABCB1", "ABCG2", "ABCC1", "ALDH1A1", "AXL", "CD44", "VIM", "ZEB1", "SOX2", "NT5E", "MGMT",
                 "GSTP1", "BCL2", "MCL1", "TWIST1", "SNAI2")
RESISTANCE_DOWN = ("BAX", "BBC3", "CDKN1A", "FAS", "PMAIP1", "TP53I3", "GADD45A")
CELL_TYPE_MARKERS: dict[str, tuple[str, ...]] = {
    "T cell": ("CD3D", "CD3E", "CD2", "IL7R", "CD8A", "GZMK", "CCL5", "TRAC"),
    "NK cell": ("NKG7", "GNLY", "KLRD1", "KLRF1", "PRF1", "GZMB"),
    "B cell": ("MS4A1", "CD79A", "CD79B", "CD19", "BANK1"),
    "monocyte": ("CD14", "LYZ", "S100A8", "S100A9", "FCN1", "VCAN"),
    "macrophage": ("CD68", "C1QA", "C1QB", "CD163", "AIF1", "APOE"),
    "fibroblast": ("COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "PDGFRB"),
    "endothelial": ("PECAM1", "VWF", "CDH5", "CLDN5", "KDR"),
    "erythroid": ("HBB", "HBA1", "HBA2", "GYPA", "ALAS2"),
    "malignant": (),
    "cycling malignant": ("MKI67", "TOP2A", "CDK1", "CCNB1", "UBE2C", "CENPF"),
}
MALIGNANT_TYPES = ("malignant", "cycling malignant")
#: Lineage markers of malignant cells, by the first keyword found in the cancer type (lower case).
LINEAGE_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("myeloma", ("SDC1", "MZB1", "JCHAIN", "XBP1", "TNFRSF17", "PRDM1")),
    ("chronic lymphocytic", ("CD19", "MS4A1", "CD5", "CD79A", "FCER2")),
    ("lymphoblastic", ("CD19", "CD34", "DNTT", "MME", "VPREB1")),
    ("myeloid", ("CD34", "KIT", "MPO", "CD33", "ELANE")),
    ("melanoma", ("MLANA", "PMEL", "TYR", "MITF", "SOX10")),
    ("breast", ("EPCAM", "KRT8", "KRT18", "ESR1", "GATA3", "KRT19")),
    ("lung", ("EPCAM", "NKX2-1", "SFTPB", "NAPSA", "KRT7")),
    ("pancrea", ("EPCAM", "KRT19", "MUC1", "KRT7", "SOX9")),
    ("prostate", ("KLK3", "AR", "NKX3-1", "FOLH1", "TMPRSS2")),
    ("neuroblastoma", ("PHOX2B", "MYCN", "HAND2", "GATA2", "DBH")),
    ("liver", ("ALB", "APOA1", "TTR", "SERPINA1", "APOB")),
    ("hepatocellular", ("ALB", "APOA1", "TTR", "SERPINA1", "APOB")),
    ("ovarian", ("PAX8", "WT1", "MUC16", "EPCAM", "KRT7")),
    ("colon", ("CDX2", "VIL1", "LGALS4", "EPCAM", "CDH17")),
    ("basal cell", ("KRT14", "KRT5", "KRT17", "PTCH1", "GLI1")),
    ("", ("EPCAM", "KRT8", "KRT18")),
)
#: Cell-type mixture by the first keyword found in the tissue (lower case); the last entry is the default.
TISSUE_MIXTURES: tuple[tuple[str, dict[str, float]], ...] = (
    ("cell line", {"malignant": 0.8, "cycling malignant": 0.2}),
    ("organoid", {"malignant": 0.8, "cycling malignant": 0.2}),
    ("peripheral blood", {"T cell": 0.35, "NK cell": 0.1, "B cell": 0.1, "monocyte": 0.2, "malignant": 0.25}),
    ("bone marrow", {"malignant": 0.35, "T cell": 0.2, "monocyte": 0.12, "B cell": 0.08, "NK cell": 0.07,
                     "erythroid": 0.18}),
    ("", {"malignant": 0.45, "cycling malignant": 0.05, "T cell": 0.2, "macrophage": 0.12, "B cell": 0.05,
          "fibroblast": 0.08, "endothelial": 0.05}),
)
DESIGN_GROUP_RE = re.compile(r"\b(pre|post)\s*\(([^)]*)\)", re.IGNORECASE)
DESIGN_COUNT_RE = re.compile(r"\b(resistant|sensitive|persist[ae]nt)\s+(\d+)", re.IGNORECASE)
CATALOG_COLUMNS = ("dataset_id", "collection", "study", "tissue", "cancer_type", "therapy", "regimen",
                   "sample_design", "n_samples")
COUNT_COLUMNS = ("collection", "category", "dataset_ids", "n_cells", "n_sensitive", "n_resistant")


def simulator_version() -> str:
    """Return a short digest of the simulator's parameters: cached simulated files are named with it.

    A change of any effect size (or of `DEFAULT_RESISTANCE_STRENGTH`) gives new files, never stale ones.
    """
    import hashlib

    constants = {k: v for k, v in globals().items() if k.isupper() and isinstance(v, int | float | str | tuple)}
    return hashlib.sha1(repr(sorted(constants.items())).encode()).hexdigest()[:8]


def default_catalog_path() -> Path:
    """Return the catalog shipped in the package (``scdrugmap/data/catalog/datasets.csv``)."""
    return Path(str(importlib.resources.files("scdrugmap.data") / "catalog" / "datasets.csv"))


@dataclass(frozen=True)
class DesignSample:
    """One sample of a data set's design: its timepoint (``pre``, ``post`` or empty) and label."""

    timepoint: str
    response: str
    kind: str


def parse_sample_design(design: str, n_samples: int | None = None) -> list[DesignSample]:
    """Read a catalog sample design such as ``pre (resistant 8, sensitive 4); post (resistant 18, sensitive 5)``.

    Persistent (drug-tolerant) samples survive the drug and are labelled resistant, with ``kind``
    ``persistent``.

    Raises
    ------
    SchemaError
        When the design names no samples, or their number differs from ``n_samples``.
    """
    groups = DESIGN_GROUP_RE.findall(design) or [("", design)]
    samples = []
    for timepoint, body in groups:
        for word, count in DESIGN_COUNT_RE.findall(body):
            kind = word.lower().replace("persistant", "persistent")
            response = schema.SENSITIVE if kind == "sensitive" else schema.RESISTANT
            samples += [DesignSample(timepoint.lower(), response, kind)] * int(count)
    if not samples or (n_samples is not None and len(samples) != n_samples):
        msg = (
            f"sample design {design!r} names {len(samples)} samples but n_samples is {n_samples}; "
            "expected e.g. 'pre (resistant 2, sensitive 1)'. Fix the catalog row."
        )
        raise SchemaError(msg)
    return samples


def _read_table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    if not path.exists():
        msg = f"{path} does not exist. Pass catalog_path (and counts_path) to the scDrugMap catalog CSVs."
        raise SchemaError(msg)
    table = pd.read_csv(path)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        msg = f"{path}: columns {missing} are missing; columns present: {list(table.columns)}."
        raise SchemaError(msg)
    return table


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (ties broken by position)."""
    weights = np.asarray(weights, dtype=np.float64)
    if total <= 0 or weights.sum() <= 0:
        return np.zeros(len(weights), dtype=np.int64)
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def _label_cells(datasets: pd.DataFrame, counts: pd.DataFrame) -> pd.DataFrame:
    """Return catalog cells per data set and label, from the category counts (smallest categories first).

    A category listing one data set gives it that data set's cells exactly; a larger one splits what its
    data sets have not yet been given in proportion to their samples of each label.
    """
    n_samples = {label: datasets[f"n_{label}_samples"] for label in (schema.SENSITIVE, schema.RESISTANT)}
    cells = pd.DataFrame(np.nan, index=datasets.index, columns=[schema.SENSITIVE, schema.RESISTANT])
    rows = counts[counts["category"] != "All"].copy()
    rows["ids"] = rows["dataset_ids"].astype(str).str.split()
    rows["ids"] = rows["ids"].map(lambda ids: [i for i in ids if i in datasets.index])
    rows = rows[rows["ids"].map(len) > 0]
    rows = rows.assign(size=rows["ids"].map(len)).sort_values(["size", "n_cells"], kind="stable")
    for ids, n_sensitive, n_resistant in rows[["ids", "n_sensitive", "n_resistant"]].itertuples(index=False):
        known = [i for i in ids if cells.loc[i].notna().all()]
        unknown = [i for i in ids if i not in known]
        if not unknown:
            continue
        for label, total in ((schema.SENSITIVE, n_sensitive), (schema.RESISTANT, n_resistant)):
            left = max(float(total) - float(cells.loc[known, label].sum()), 0.0)
            weights = n_samples[label].loc[unknown].to_numpy(dtype=np.float64)
            cells.loc[unknown, label] = left * weights / weights.sum() if weights.sum() > 0 else 0.0
    unplaced = cells.index[cells.isna().any(axis=1)]
    if len(unplaced):
        placed = cells.index.difference(unplaced)
        per_sample = float(np.median(cells.loc[placed].sum(axis=1) / datasets.loc[placed, "n_samples"]))
        logger.info("data sets %s have no category counts; giving them %.0f cells per sample",
                    list(unplaced), per_sample)
        for label in (schema.SENSITIVE, schema.RESISTANT):
            cells.loc[unplaced, label] = n_samples[label].loc[unplaced] * per_sample
    return cells


@dataclass
class _Layout:
    obs: pd.DataFrame
    sample_index: np.ndarray
    cell_type_index: np.ndarray
    study_index: np.ndarray
    therapy_index: np.ndarray
    cancer_index: np.ndarray
    library_size: np.ndarray
    label_sign: np.ndarray  # +0.5 resistant, -0.5 sensitive
    activity_noise: np.ndarray  # patient + cell spread of the resistance activity


def _lineage(cancer_type: str) -> tuple[str, ...]:
    text = cancer_type.lower()
    return next(markers for key, markers in LINEAGE_MARKERS if key in text)


def _mixture(tissue: str) -> dict[str, float]:
    text = tissue.lower()
    return next(mix for key, mix in TISSUE_MIXTURES if key in text)


def _read_catalog(catalog_path: Path, counts_path: Path, collection: Collection) -> tuple[pd.DataFrame, pd.DataFrame]:
    catalog = _read_table(catalog_path, CATALOG_COLUMNS)
    counts = _read_table(counts_path, COUNT_COLUMNS)
    if collection not in ("primary", "validation", "all"):
        msg = f"collection {collection!r} is unknown; expected 'primary', 'validation' or 'all'."
        raise SchemaError(msg)
    if collection != "all":
        catalog = catalog[catalog["collection"] == collection]
    if catalog.empty:
        msg = f"{catalog_path}: no data set of collection {collection!r}."
        raise SchemaError(msg)
    return catalog.set_index("dataset_id", drop=False), counts


def _plan_cells(catalog: pd.DataFrame, counts: pd.DataFrame, n_cells: int | None) -> tuple[pd.DataFrame, int]:
    """Return (cells per data set and label at the requested total, that total)."""
    designs = {i: parse_sample_design(str(d), int(n)) for i, d, n in
               catalog[["dataset_id", "sample_design", "n_samples"]].itertuples(index=False)}
    catalog = catalog.assign(**{
        f"n_{label}_samples": [sum(s.response == label for s in designs[i]) for i in catalog.index]
        for label in (schema.SENSITIVE, schema.RESISTANT)
    })
    cells = pd.concat([_label_cells(part, counts[counts["collection"] == name])
                       for name, part in catalog.groupby("collection", sort=False)]).loc[catalog.index]
    weights = cells.to_numpy().ravel()
    total = int(round(weights.sum())) if n_cells is None else int(n_cells)
    if total < 1:
        msg = f"n_cells must be a positive number of cells; got {n_cells}."
        raise SchemaError(msg)
    planned = _largest_remainder(total, weights).reshape(cells.shape)
    return pd.DataFrame(planned, index=cells.index, columns=cells.columns), total


def _layout(catalog: pd.DataFrame, cells: pd.DataFrame, rng: np.random.Generator) -> _Layout:
    """Place every cell: its data set, sample, cell type, library size and resistance activity."""
    studies = pd.Index(pd.unique(catalog["study"].astype(str)))
    therapies = pd.Index(pd.unique(catalog["therapy"].astype(str)))
    cancers = pd.Index(pd.unique(catalog["cancer_type"].astype(str)))
    cell_types = pd.Index(list(CELL_TYPE_MARKERS))
    depth = rng.normal(0.0, STUDY_DEPTH_SD, len(studies))
    columns: dict[str, list[np.ndarray]] = {k: [] for k in ("dataset", "sample", "timepoint", "response", "type")}
    sample_rows, sign_rows, noise_rows = [], [], []
    n_samples_total = 0
    for dataset_id, row in catalog.iterrows():
        design = parse_sample_design(str(row["sample_design"]), int(row["n_samples"]))
        mixture = _mixture(str(row["tissue"]))
        type_codes = cell_types.get_indexer(list(mixture))
        shares = np.array(list(mixture.values()))
        counters = {"resistant": 0, "sensitive": 0, "persistent": 0}
        names = []
        for sample in design:
            counters[sample.kind] += 1
            stem = f"{dataset_id}_{sample.timepoint}_" if sample.timepoint else f"{dataset_id}_"
            names.append(f"{stem}{sample.kind[0].upper()}{counters[sample.kind]:02d}")
        for label in (schema.SENSITIVE, schema.RESISTANT):
            members = [k for k, s in enumerate(design) if s.response == label]
            n_label = int(cells.loc[dataset_id, label])
            if not members or n_label == 0:
                continue
            split = rng.multinomial(n_label, rng.dirichlet(np.full(len(members), SAMPLE_SIZE_CONCENTRATION)))
            for k, n in zip(members, split, strict=True):
                sample_id = n_samples_total + k
                mix = rng.dirichlet(shares * MIXTURE_CONCENTRATION)
                columns["type"].append(np.sort(type_codes[rng.choice(len(mix), size=n, p=mix)]))
                columns["dataset"].append(np.full(n, dataset_id, dtype=object))
                columns["sample"].append(np.full(n, names[k], dtype=object))
                columns["timepoint"].append(np.full(n, design[k].timepoint, dtype=object))
                columns["response"].append(np.full(n, label, dtype=object))
                sample_rows.append(np.full(n, sample_id, dtype=np.int64))
                sign_rows.append(np.full(n, 0.5 if label == schema.RESISTANT else -0.5))
                noise_rows.append(np.full(n, rng.normal(0.0, PATIENT_ACTIVITY_SD)))
        n_samples_total += len(design)
    flat = {k: np.concatenate(v) if v else np.array([], dtype=object) for k, v in columns.items()}
    dataset_rows = catalog.loc[flat["dataset"]]
    n = len(flat["dataset"])
    obs = pd.DataFrame({
        schema.RESPONSE: flat["response"],
        schema.STUDY: dataset_rows["study"].astype(str).to_numpy(),
        schema.DATASET: flat["dataset"],
        schema.SAMPLE: flat["sample"],
        schema.TISSUE: dataset_rows["tissue"].astype(str).to_numpy(),
        schema.CANCER_TYPE: dataset_rows["cancer_type"].astype(str).to_numpy(),
        schema.THERAPY: dataset_rows["therapy"].astype(str).to_numpy(),
        schema.REGIMEN: dataset_rows["regimen"].astype(str).to_numpy(),
        CELL_TYPE: cell_types.to_numpy()[flat["type"].astype(np.int64)] if n else np.array([], dtype=object),
        TIMEPOINT: flat["timepoint"],
    }, index=pd.Index([f"cell{i:07d}" for i in range(n)]))
    for column in obs.columns:
        obs[column] = pd.Categorical(obs[column])
    study_index = studies.get_indexer(obs[schema.STUDY].astype(str))
    library = np.exp(rng.normal(np.log(MEDIAN_UMIS) + depth[study_index], LIBRARY_SD)).astype(np.float32)
    noise = (np.concatenate(noise_rows) if noise_rows else np.zeros(0)) + rng.normal(0.0, CELL_ACTIVITY_SD, n)
    return _Layout(
        obs=obs,
        sample_index=np.concatenate(sample_rows) if sample_rows else np.zeros(0, dtype=np.int64),
        cell_type_index=flat["type"].astype(np.int64) if n else np.zeros(0, dtype=np.int64),
        study_index=study_index,
        therapy_index=therapies.get_indexer(obs[schema.THERAPY].astype(str)),
        cancer_index=cancers.get_indexer(obs[schema.CANCER_TYPE].astype(str)),
        library_size=library,
        label_sign=(np.concatenate(sign_rows) if sign_rows else np.zeros(0)).astype(np.float32),
        activity_noise=noise.astype(np.float32),
    )


def _simulation_genes(n_genes: int) -> pd.DataFrame:
    """Pick ``n_genes`` real genes: the programs' marker genes first, then those most model vocabularies share."""
    table = load_gene_table()
    table = table[(table["symbol_owner"] == 1) & (table["gene_symbol"] != "")]
    if n_genes > len(table):
        msg = f"n_genes={n_genes} is more than the {len(table)} named human genes in the gene table."
        raise SchemaError(msg)
    named = [*HOUSEKEEPING, *RESISTANCE_UP, *RESISTANCE_DOWN,
             *(g for markers in CELL_TYPE_MARKERS.values() for g in markers),
             *(g for _, markers in LINEAGE_MARKERS for g in markers)]
    priority = pd.Series(range(len(named)), index=named)
    priority = priority[~priority.index.duplicated()]
    n_vocabularies = table["vocabularies"].str.count(",") + (table["vocabularies"] != "")
    ranked = table.assign(
        named_rank=table["gene_symbol"].map(priority).fillna(len(priority)).to_numpy(),
        n_vocab=-n_vocabularies,
        non_coding=table["biotype"] != "protein_coding",
    ).sort_values(["named_rank", "n_vocab", "non_coding", "ensembl_id"], kind="stable")
    chosen = ranked.head(n_genes).sort_values("ensembl_id")
    return pd.DataFrame({"gene_symbol": chosen["gene_symbol"].to_numpy(), "ensembl_id": chosen["ensembl_id"].to_numpy()},
                        index=pd.Index(chosen["gene_symbol"].to_numpy()))


@dataclass
class _Programs:
    base: np.ndarray  # (genes,) log abundance
    cell_type: np.ndarray  # (types, genes)
    lineage: np.ndarray  # (cancers, genes), malignant cells only
    study: np.ndarray  # (studies, genes)
    patient: np.ndarray  # (samples, genes)
    resistance_genes: np.ndarray  # (program genes,) column indices
    resistance: np.ndarray  # (therapies, program genes) log fold per unit activity
    theta: np.ndarray  # (genes,) negative-binomial size
    core: np.ndarray  # (program genes,) the therapy-independent log fold (its sign: up or down in resistant)
    study_resistance: np.ndarray  # (studies, program genes) each study's own part of the program


def _programs(genes: pd.DataFrame, catalog: pd.DataFrame, n_samples: int, rng: np.random.Generator,
              study_program_sd: float = STUDY_PROGRAM_SD) -> _Programs:
    symbols = pd.Index(genes["gene_symbol"])
    n = len(symbols)

    def columns(names) -> np.ndarray:
        found = symbols.get_indexer(list(names))
        return found[found >= 0]

    def random_columns(share: float, exclude: np.ndarray) -> np.ndarray:
        pool = np.setdiff1d(np.arange(n), exclude)
        return rng.choice(pool, size=min(len(pool), max(3, round(share * n))), replace=False)

    base = rng.normal(0.0, BASE_SD, n)
    upper = symbols.str.upper()
    abundant = np.flatnonzero(upper.str.match(RIBOSOMAL_RE) | upper.str.startswith("MT-"))
    base[abundant] = rng.normal(ABUNDANT_LEVEL, 0.5, len(abundant))
    housekeeping = columns(HOUSEKEEPING)
    base[housekeeping] = rng.normal(HOUSEKEEPING_LEVEL, 0.5, len(housekeeping))
    markers = columns(g for m in CELL_TYPE_MARKERS.values() for g in m)
    lineage_markers = columns(g for _, m in LINEAGE_MARKERS for g in m)
    specific = np.union1d(markers, lineage_markers)
    base[specific] = np.minimum(base[specific], -1.0)

    cell_type = np.zeros((len(CELL_TYPE_MARKERS), n))
    for k, names in enumerate(CELL_TYPE_MARKERS.values()):
        cell_type[k, columns(names)] += MARKER_EFFECT
        extra = random_columns(CELL_TYPE_GENE_SHARE, specific)
        cell_type[k, extra] += rng.normal(0.0, CELL_TYPE_RANDOM_SD, len(extra))
    cancers = pd.unique(catalog["cancer_type"].astype(str))
    lineage = np.zeros((len(cancers), n))
    for k, cancer in enumerate(cancers):
        lineage[k, columns(_lineage(cancer))] += MARKER_EFFECT
        extra = random_columns(CELL_TYPE_GENE_SHARE, specific)
        lineage[k, extra] += rng.normal(0.0, CELL_TYPE_RANDOM_SD, len(extra))

    study = rng.normal(0.0, STUDY_EFFECT_SD, (len(pd.unique(catalog["study"].astype(str))), n))
    patient = rng.normal(0.0, PATIENT_EFFECT_SD, (n_samples, n))

    up, down = columns(RESISTANCE_UP), columns(RESISTANCE_DOWN)
    extra = random_columns(RESISTANCE_GENE_SHARE, np.concatenate([up, down, specific]))
    program = np.concatenate([up, down, extra])
    core = np.concatenate([
        np.abs(rng.normal(RESISTANCE_EFFECT, 0.2, len(up))),
        -np.abs(rng.normal(RESISTANCE_EFFECT, 0.2, len(down))),
        rng.choice([-1.0, 1.0], len(extra)) * np.abs(rng.normal(RESISTANCE_EFFECT, 0.2, len(extra))),
    ])
    therapies = pd.unique(catalog["therapy"].astype(str))
    therapy_part = np.zeros((len(therapies), len(program)))
    for k in range(len(therapies)):
        chosen = rng.choice(len(program), size=max(1, round(len(program) * THERAPY_GENE_SHARE / RESISTANCE_GENE_SHARE)),
                            replace=False)
        therapy_part[k, chosen] = rng.normal(0.0, THERAPY_EFFECT_SD, len(chosen))
    theta = np.exp(rng.normal(np.log(NB_THETA_MEDIAN), NB_THETA_SD, n))
    study_part = rng.normal(0.0, 1.0, (len(study), len(program))) * study_program_sd  # same draws at any sd
    order = np.argsort(program, kind="stable")
    return _Programs(base=base, cell_type=cell_type, lineage=lineage, study=study, patient=patient,
                     resistance_genes=program[order], resistance=(core[None, :] + therapy_part)[:, order],
                     theta=theta, core=core[order], study_resistance=study_part[:, order])


#: Prefix of the planted programs' gene-set names (`simulated_gene_sets`).
GENE_SET_PREFIX = "SCDRUGMAP_SIM_"
RESISTANCE_UP_SET = GENE_SET_PREFIX + "RESISTANCE_UP"
RESISTANCE_DOWN_SET = GENE_SET_PREFIX + "RESISTANCE_DOWN"


def _set_name(kind: str, label: str) -> str:
    return GENE_SET_PREFIX + kind + "_" + re.sub(r"[^A-Z0-9]+", "_", label.upper()).strip("_")


def _planted_gene_sets(genes: pd.DataFrame, programs: _Programs, catalog: pd.DataFrame) -> dict[str, list[str]]:
    """Return the planted programs as gene sets: resistance up and down, then cell-type and lineage markers."""
    symbols = genes["gene_symbol"].to_numpy().astype(str)
    present = set(symbols)
    program = symbols[programs.resistance_genes]
    gene_sets = {RESISTANCE_UP_SET: sorted(program[programs.core > 0].tolist()),
                 RESISTANCE_DOWN_SET: sorted(program[programs.core < 0].tolist())}
    for cell_type, markers in CELL_TYPE_MARKERS.items():
        gene_sets[_set_name("CELLTYPE", cell_type)] = [g for g in markers if g in present]
    keys = dict.fromkeys(next(key for key, _ in LINEAGE_MARKERS if key in str(cancer).lower())
                         for cancer in pd.unique(catalog["cancer_type"].astype(str)))
    for key in keys:
        markers = dict(LINEAGE_MARKERS)[key]
        label = {"": "epithelial", "pancrea": "pancreatic"}.get(key, key)
        gene_sets[_set_name("LINEAGE", label)] = [g for g in markers if g in present]
    return {name: members for name, members in gene_sets.items() if members}


def simulated_gene_sets(
    *,
    n_genes: int = 2000,
    seed: int = 0,
    catalog_path: str | Path | None = None,
    counts_path: str | Path | None = None,
    collection: Collection = "primary",
) -> dict[str, list[str]]:
    """Return the programs `simulate_collection` plants with these arguments, as gene sets.

    The resistance program is split by the sign of its therapy-independent log fold change:
    ``SCDRUGMAP_SIM_RESISTANCE_UP`` (higher in resistant cells: ABCB1, AXL, ... and random genes) and
    ``SCDRUGMAP_SIM_RESISTANCE_DOWN`` (lower: BAX, BBC3, ...); therapy-specific parts are not sets of
    their own. Decoys with no label signal follow: ``SCDRUGMAP_SIM_CELLTYPE_<TYPE>`` (the marker genes of
    each cell type) and ``SCDRUGMAP_SIM_LINEAGE_<KEY>`` (malignant lineage markers of the collection's
    cancer types). Only genes of the simulated gene space are listed; empty sets are left out.

    Parameters
    ----------
    n_genes, seed, catalog_path, counts_path, collection
        As given to `simulate_collection` (the number of cells does not change the programs).

    Returns
    -------
    ``{set name: gene symbols}``, resistance sets first; `scdrugmap.data.genesets.write_gmt` writes it.

    Examples
    --------
    >>> from scdrugmap.data.simulate import simulated_gene_sets
    >>> sets = simulated_gene_sets(n_genes=500, seed=1)  # doctest: +SKIP
    >>> "ABCB1" in sets["SCDRUGMAP_SIM_RESISTANCE_UP"]  # doctest: +SKIP
    True
    """
    catalog_path = Path(catalog_path) if catalog_path is not None else default_catalog_path()
    counts_path = Path(counts_path) if counts_path is not None else catalog_path.with_name("category_counts.csv")
    if n_genes < 10:
        msg = f"n_genes={n_genes} is too few; simulate at least 10 genes."
        raise SchemaError(msg)
    catalog, _ = _read_catalog(catalog_path, counts_path, collection)
    genes = _simulation_genes(n_genes)
    programs = _programs(genes, catalog, int(catalog["n_samples"].sum()), np.random.default_rng([seed, 3]))
    return _planted_gene_sets(genes, programs, catalog)


def _walk_cdf(u: np.ndarray, mean: np.ndarray, size: np.ndarray, p_zero: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
    """Return the smallest k >= 1 with NB-CDF(k) > u, for draws known to be non-zero (u >= P(0))."""
    q = mean / (mean + size)
    pmf = p_zero * size * q  # P(1)
    cdf = p_zero + pmf
    counts = np.ones(len(u), dtype=np.float64)
    active = np.flatnonzero(u >= cdf)  # most non-zero draws are 1: walk on with the rest only
    u, q, size, pmf, cdf = u[active], q[active], size[active], pmf[active], cdf[active]
    k = 1
    while active.size and k < MAX_CDF_STEPS:
        k += 1
        pmf *= (k - 1 + size) / k * q
        cdf += pmf
        going = u >= cdf
        counts[active[~going]] = k
        active, pmf, cdf, q, size, u = active[going], pmf[going], cdf[going], q[going], size[going], u[going]
    if active.size:  # rounding left the CDF short of u: settle with the direct sampler
        counts[active] = np.maximum(1, rng.negative_binomial(size, 1.0 - q))
    return counts


def _rows_of(flat: np.ndarray, n_rows: int, n_columns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split sorted flat indices of an (n_rows, n_columns) matrix into (rows, columns, CSR indptr)."""
    indptr = np.searchsorted(flat, np.arange(n_rows + 1, dtype=np.int64) * n_columns)
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))
    return rows, flat - rows * n_columns, indptr


class _Workspace:
    """Buffers reused by every block, so that no block allocates (and page-faults) a dense matrix anew."""

    def __init__(self, n_genes: int, programs: _Programs) -> None:
        self.screen = np.empty((RNG_BLOCK_CELLS, n_genes), dtype=np.float32)
        self.candidate = np.empty((RNG_BLOCK_CELLS, n_genes), dtype=bool)
        self.neg_theta = (-programs.theta).astype(np.float32)
        self.program_position = np.full(n_genes, -1, dtype=np.int64)
        self.program_position[programs.resistance_genes] = np.arange(len(programs.resistance_genes))


def _block_counts(layout: _Layout, programs: _Programs, start: int, stop: int, strength: float,
                  rng: np.random.Generator, work: _Workspace) -> sp.csr_matrix:
    """Return the NB count matrix of cells ``start:stop`` (CSR, float32); every count is an exact draw.

    Each entry's uniform is ``u = (j + v) / 256`` with an 8-bit slice ``j`` drawn for every entry and the
    rest ``v`` only where needed; the count is zero when ``u >= P(X > 0)`` and otherwise found by walking
    the CDF with ``1 - u``. Since P(X > 0) <= mean (Markov), an entry with ``j >= 256 * mean`` is zero:
    one float32 comparison settles nearly all of a single-cell matrix, no logarithm needed. The few
    candidates left are settled exactly in float64. Genes whose mean can pass ``DIRECT_NB_MEAN`` in the
    block are drawn with numpy's gamma-Poisson sampler instead.
    """
    n, n_genes = stop - start, len(programs.base)
    n_types = len(CELL_TYPE_MARKERS)
    sample = layout.sample_index[start:stop]
    key = sample * n_types + layout.cell_type_index[start:stop]
    run_start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    run_stop = np.r_[run_start[1:], n]
    first = start + run_start
    cell_type = layout.cell_type_index[first]
    log_profile = (programs.base[None, :] + programs.cell_type[cell_type]
                   + programs.study[layout.study_index[first]] + programs.patient[layout.sample_index[first]])
    malignant = np.isin(cell_type, [list(CELL_TYPE_MARKERS).index(t) for t in MALIGNANT_TYPES])
    log_profile[malignant] += programs.lineage[layout.cancer_index[first][malignant]]
    profile = np.exp(log_profile - log_profile.max(axis=1, keepdims=True))
    profile /= profile.sum(axis=1, keepdims=True)
    run_of_row = np.repeat(np.arange(len(run_start)), run_stop - run_start)
    size = layout.library_size[start:stop].astype(np.float64)
    activity = strength * layout.label_sign[start:stop] + layout.activity_noise[start:stop]
    fold_change = (programs.resistance[layout.therapy_index[start:stop]]
                   + programs.study_resistance[layout.study_index[start:stop]])
    program_factor = np.exp(fold_change * activity[:, None])

    # Genes whose mean may pass DIRECT_NB_MEAN somewhere in the block are drawn directly.
    largest = np.maximum.reduceat(size, run_start)[:, None] * profile
    largest[:, programs.resistance_genes] *= program_factor.max(axis=0)
    high = np.flatnonzero(largest.max(axis=0) > DIRECT_NB_MEAN)

    # Screen, float32 and in place: 256 * mean, scaled up a little so rounding never drops a candidate.
    screen = work.screen[:n]
    profile_scaled = (profile * SCREEN_SCALE).astype(np.float32)
    size32 = size.astype(np.float32)
    for run, (a, b) in enumerate(zip(run_start, run_stop, strict=True)):
        np.multiply(size32[a:b, None], profile_scaled[run], out=screen[a:b])
    screen[:, programs.resistance_genes] *= program_factor.astype(np.float32)
    screen[:, high] = -1.0
    raw = rng.bit_generator.random_raw(-(-n * n_genes // 8))  # 64 random bits give eight slices
    slices = raw.view(np.uint8)[: n * n_genes].reshape(n, n_genes)
    candidates = np.flatnonzero(np.less(slices, screen, out=work.candidate[:n]))

    # Settle the candidates exactly.
    rows, cols, _ = _rows_of(candidates, n, n_genes)
    mean = size[rows] * profile[run_of_row[rows], cols]
    position = work.program_position[cols]
    in_program = position >= 0
    mean[in_program] *= program_factor[rows[in_program], position[in_program]]
    theta = programs.theta[cols]
    log_p_zero = -theta * np.log1p(mean / theta)
    u = (slices.ravel()[candidates] + rng.random(len(candidates))) / UNIFORM_SLICES
    hit = u < -np.expm1(log_p_zero)
    flat = candidates[hit]
    counts = _walk_cdf(1.0 - u[hit], mean[hit], theta[hit], np.exp(log_p_zero[hit]), rng)

    if high.size:
        mean = size[:, None] * profile[:, high][run_of_row]
        position = work.program_position[high]
        in_program = position >= 0
        mean[:, in_program] *= program_factor[:, position[in_program]]
        theta = programs.theta[high][None, :]
        draws = rng.negative_binomial(np.broadcast_to(theta, mean.shape), theta / (theta + mean))
        row, col = np.nonzero(draws)
        flat = np.concatenate([flat, row * n_genes + high[col]])
        counts = np.concatenate([counts, draws[row, col].astype(np.float64)])
        order = np.argsort(flat, kind="stable")
        flat, counts = flat[order], counts[order]

    _, cols, indptr = _rows_of(flat, n, n_genes)
    return sp.csr_matrix((counts.astype(np.float32), cols.astype(np.int32), indptr), shape=(n, n_genes))


def _blocks(layout: _Layout, programs: _Programs, strength: float, seed: int) -> Iterator[sp.csr_matrix]:
    n_cells = len(layout.obs)
    work = _Workspace(len(programs.base), programs)
    for block, start in enumerate(range(0, n_cells, RNG_BLOCK_CELLS)):
        rng = np.random.default_rng([seed, 2, block])
        yield _block_counts(layout, programs, start, min(start + RNG_BLOCK_CELLS, n_cells), strength, rng, work)


def _write_elem(group, key: str, value: Any) -> None:
    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem
    write_elem(group, key, value)


def _stream_h5ad(out_path: Path, obs: pd.DataFrame, var: pd.DataFrame, uns: dict, blocks: Iterator[sp.csr_matrix],
                 chunk_size: int, compression: str | None) -> None:
    """Write an .h5ad whose X (CSR) grows chunk by chunk; never holds more than one chunk of counts."""
    import h5py

    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial")
    n_obs, n_vars = len(obs), len(var)
    with h5py.File(partial, "w") as handle:
        handle.attrs["encoding-type"] = "anndata"
        handle.attrs["encoding-version"] = "0.1.0"
        _write_elem(handle, "obs", obs)
        _write_elem(handle, "var", var)
        _write_elem(handle, "uns", uns)
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            _write_elem(handle, key, {})
        group = handle.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array([n_obs, n_vars], dtype=np.int64)
        options = {"chunks": (1 << 18,), "maxshape": (None,), "compression": compression}
        data = group.create_dataset("data", shape=(0,), dtype=np.float32, **options)
        indices = group.create_dataset("indices", shape=(0,), dtype=np.int32, **options)
        indptr = group.create_dataset("indptr", shape=(n_obs + 1,), dtype=np.int64)
        indptr[0] = 0
        row, nnz = 0, 0
        pending: list[sp.csr_matrix] = []

        def flush() -> None:
            nonlocal row, nnz
            chunk = sp.vstack(pending, format="csr") if len(pending) > 1 else pending[0]
            pending.clear()
            data.resize((nnz + chunk.nnz,))
            indices.resize((nnz + chunk.nnz,))
            data[nnz:] = chunk.data
            indices[nnz:] = chunk.indices
            indptr[row + 1: row + chunk.shape[0] + 1] = chunk.indptr[1:].astype(np.int64) + nnz
            row += chunk.shape[0]
            nnz += chunk.nnz

        for block in blocks:
            pending.append(block)
            if sum(b.shape[0] for b in pending) >= chunk_size:
                flush()
        if pending:
            flush()
    os.replace(partial, out_path)


def simulate_collection(
    n_cells: int | None = DEFAULT_N_CELLS,
    *,
    n_genes: int = 2000,
    seed: int = 0,
    resistance_strength: float = DEFAULT_RESISTANCE_STRENGTH,
    study_program_sd: float = STUDY_PROGRAM_SD,
    catalog_path: str | Path | None = None,
    counts_path: str | Path | None = None,
    collection: Collection = "primary",
    out_path: str | Path | None = None,
    chunk_size: int = 8192,
    compression: str | None = None,
) -> ad.AnnData | Path:
    """Simulate a drug-response collection shaped like the scDrugMap catalog.

    Parameters
    ----------
    n_cells
        Cells in all; split between data sets (and their sensitive and resistant samples) in proportion to
        the catalog's cell counts. None gives the catalog's own total (326,751 for the primary collection).
    n_genes
        Genes, all real human genes with symbols, those most model vocabularies share first.
    seed
        Seed of every random draw: the same arguments give the same cells, counts and file.
    resistance_strength
        Mean difference of the resistance program's activity between resistant and sensitive cells, in units
        of its log fold changes; 0 leaves no label signal but patient and study effects.
    study_program_sd
        Spread of each study's own part of the resistance program (log fold per unit activity). 0 makes the
        program act alike in every study, so the planted genes are exactly the genes that separate the
        labels in every study (what tests of biomarker recovery want); the default makes held-out studies
        harder, as real cohorts are.
    catalog_path
        The catalog's ``datasets.csv``; the package's own by default.
    counts_path
        Its ``category_counts.csv``; by default the file of that name beside ``catalog_path``.
    collection
        ``primary`` (36 data sets), ``validation`` (24) or ``all``.
    out_path
        Where to stream an ``.h5ad``; the matrix is then written chunk by chunk and never held whole. The
        planted programs (`simulated_gene_sets`) are written beside it as a GMT file, ``<out>.gmt``.
    chunk_size
        Cells generated and written at a time when streaming (memory grows with it; the result does not).
    compression
        h5py compression of X when streaming (``gzip``, ``lzf``), none by default.

    Returns
    -------
    The AnnData, or with ``out_path`` the path written. ``X`` holds UMI counts (CSR, float32); ``obs`` has
    ``response`` (sensitive/resistant), ``study``, ``dataset``, ``sample``, ``tissue``, ``cancer_type``,
    ``therapy``, ``regimen``, ``cell_type`` and ``timepoint`` (categorical); ``var_names`` are gene symbols,
    with ``var["gene_symbol"]`` and ``var["ensembl_id"]``; ``uns["simulated"]`` is True and
    ``uns["scdrugmap"]["simulation"]`` holds the parameters and the resistance program's genes.

    Raises
    ------
    SchemaError
        When the catalog is missing or malformed, or ``n_cells``/``n_genes`` cannot be met.

    Examples
    --------
    >>> from scdrugmap.data.simulate import simulate_collection
    >>> adata = simulate_collection(2_000, n_genes=500, seed=1)  # doctest: +SKIP
    >>> adata.obs.groupby("sample", observed=True)["response"].nunique().max()  # doctest: +SKIP
    1
    >>> simulate_collection(None, n_genes=20_000, out_path="primary.h5ad")  # doctest: +SKIP
    """
    import anndata as ad

    started = time.perf_counter()
    catalog_path = Path(catalog_path) if catalog_path is not None else default_catalog_path()
    counts_path = Path(counts_path) if counts_path is not None else catalog_path.with_name("category_counts.csv")
    if n_genes < 10:
        msg = f"n_genes={n_genes} is too few; simulate at least 10 genes."
        raise SchemaError(msg)
    catalog, counts = _read_catalog(catalog_path, counts_path, collection)
    cells, total = _plan_cells(catalog, counts, n_cells)
    logger.info("simulating %d cells x %d genes over %d data sets (%s, seed %d)", total, n_genes, len(catalog),
                collection, seed)
    layout = _layout(catalog, cells, np.random.default_rng([seed, 1]))
    genes = _simulation_genes(n_genes)
    n_samples = int(catalog["n_samples"].sum())
    programs = _programs(genes, catalog, n_samples, np.random.default_rng([seed, 3]), float(study_program_sd))
    params = {
        "n_cells": total, "n_genes": n_genes, "seed": seed, "resistance_strength": float(resistance_strength),
        "study_program_sd": float(study_program_sd),
        "collection": collection, "catalog": catalog_path.name, "n_datasets": len(catalog),
        "median_umis": MEDIAN_UMIS, "rng_block_cells": RNG_BLOCK_CELLS,
        "resistance_genes": genes["gene_symbol"].to_numpy()[programs.resistance_genes].tolist(),
    }
    uns = {"simulated": True, "scdrugmap": {"simulation": params}}
    blocks = _blocks(layout, programs, float(resistance_strength), seed)
    if out_path is not None:
        out_path = Path(out_path)
        _stream_h5ad(out_path, layout.obs, genes, uns, blocks, max(1, int(chunk_size)), compression)
        write_gmt(_planted_gene_sets(genes, programs, catalog), out_path.with_suffix(".gmt"),
                  descriptions={RESISTANCE_UP_SET: "higher in resistant cells", RESISTANCE_DOWN_SET:
                                "lower in resistant cells"})
        logger.info("wrote %s (and its planted programs, %s) in %.1f s", out_path, out_path.with_suffix(".gmt").name,
                    time.perf_counter() - started)
        return out_path
    X = sp.vstack(list(blocks), format="csr") if total else sp.csr_matrix((0, n_genes), dtype=np.float32)
    adata = ad.AnnData(X=X, obs=layout.obs, var=genes, uns=uns)
    logger.info("simulated %d cells in %.1f s", total, time.perf_counter() - started)
    return adata
