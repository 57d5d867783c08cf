"""Benchmark the Geneformer tokenizer end to end: an .h5ad on disk -> token ids.

Writes a CSR ``.h5ad`` of simulated counts (default 20,000 cells x 20,000 real Ensembl ids of the V1
dictionary, or of V2 with ``--version V2``; ~1,600 expressed genes per cell) into a temporary folder,
then, each in a fresh child process so that peak RSS is the tokenizer's own:

* ``stream``: `GeneformerTokenizer.tokenize_h5ad` (chunked h5py reads, vectorised ranking);
* ``official-style``: the official algorithm as written in ``tokenizer.py`` (``read_h5ad`` of the whole
  file, chunks of 512 cells normalised with scipy, one ``np.argsort`` per cell), on ``--baseline-cells``
  cells, as a local reference next to the ~1,400 cells/s quoted for the official tokenizer;
* ``rss``: peak RSS while streaming ``--rss-cells`` cells (default 100,000; the file is written for it).

Usage::

    python benchmarks/bench_geneformer_tokenizer.py                     # 20k cells, plus the 100k RSS run
    python benchmarks/bench_geneformer_tokenizer.py --cells 5000 --rss-cells 0
    python benchmarks/bench_geneformer_tokenizer.py --version V2 --rss-cells 0   # 4,096 tokens, <cls>/<eos>
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VOCAB_DIRS = {"V1": REPO.parent / "shared" / "vocab" / "geneformer_v1",
              "V2": REPO.parent / "shared" / "vocab" / "geneformer_v2"}
DEFAULT_VOCAB = VOCAB_DIRS["V1"]
OFFICIAL_CELLS_PER_SECOND = 1_400  # the official tokenizer's throughput quoted in the brief


def write_counts_h5ad(path: Path, n_cells: int, genes: np.ndarray, mean_nnz: float, seed: int,
                      chunk: int = 1000) -> dict:
    """Write simulated NB counts as a CSR .h5ad, chunk by chunk (constant memory)."""
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    rng = np.random.default_rng(seed)
    n_genes = genes.size
    # Per-gene detection rates (heavy-tailed, mean mean_nnz / n_genes) and per-cell depth factors.
    detect = rng.beta(0.6, 0.6 * (n_genes / mean_nnz - 1), n_genes).astype(np.float32)
    totals, nnz_total = np.zeros(n_cells, dtype=np.int64), 0
    with h5py.File(path, "w") as handle:
        handle.attrs["encoding-type"], handle.attrs["encoding-version"] = "anndata", "0.1.0"
        group = handle.create_group("X")
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, n_genes)})
        data = group.create_dataset("data", (0,), dtype=np.float32, maxshape=(None,), chunks=(1 << 20,))
        indices = group.create_dataset("indices", (0,), dtype=np.int32, maxshape=(None,), chunks=(1 << 20,))
        indptr = [np.zeros(1, dtype=np.int64)]
        for start in range(0, n_cells, chunk):
            rows = min(chunk, n_cells - start)
            depth = rng.lognormal(0.0, 0.25, rows).astype(np.float32)
            mask = rng.random((rows, n_genes), dtype=np.float32) < np.minimum(detect[None, :] * depth[:, None], 1)
            r, c = np.nonzero(mask)
            values = (1 + rng.negative_binomial(1.5, 0.4, r.size)).astype(np.float32)
            totals[start:start + rows] = np.bincount(r, weights=values, minlength=rows).astype(np.int64)
            data.resize((nnz_total + r.size,))
            indices.resize((nnz_total + r.size,))
            data[nnz_total:], indices[nnz_total:] = values, c.astype(np.int32)
            indptr.append(nnz_total + np.cumsum(np.bincount(r, minlength=rows)))
            nnz_total += r.size
        group.create_dataset("indptr", data=np.concatenate(indptr))
        obs = pd.DataFrame({"n_counts": totals + 25}, index=[f"cell{i}" for i in range(n_cells)])
        write_elem(handle, "obs", obs)
        write_elem(handle, "var", pd.DataFrame({"ensembl_id": genes}, index=genes))
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(handle, name, {})
    return {"cells": n_cells, "genes": n_genes, "mean_nnz_per_cell": nnz_total / n_cells,
            "file_mb": path.stat().st_size / 2**20}


def vocabulary(vocab_dir: Path, version: str = "V1"):
    """The V1 (gc30M, 2,048 tokens) or V2 (gc95M, 4,096 tokens with <cls>/<eos>) dictionaries."""
    from scdrugmap.models.geneformer_tokenizer import GeneformerVocabulary

    if version == "V2":
        return GeneformerVocabulary.from_files(vocab_dir / "token_dictionary_gc95M.pkl",
                                               vocab_dir / "gene_median_dictionary_gc95M.pkl",
                                               vocab_dir / "ensembl_mapping_dict_gc95M.pkl", version="V2")
    return GeneformerVocabulary.from_files(vocab_dir / "geneformer_token_dictionary.pkl",
                                           vocab_dir / "geneformer_gene_median_dictionary.pkl", None, version="V1")


def run_stream(path: Path, vocab_dir: Path, chunk_size: int, threads: int | None, version: str) -> dict:
    from scdrugmap.models.geneformer_tokenizer import GeneformerTokenizer

    tokenizer = GeneformerTokenizer(vocabulary(vocab_dir, version), chunk_size=chunk_size, n_threads=threads)
    start, cpu = time.perf_counter(), time.process_time()
    tokens = tokenizer.tokenize_h5ad(path)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"cells": tokens.n_cells, "seconds": seconds, "cells_per_s": tokens.n_cells / seconds,
            "cpu_seconds": cpu, "cells_per_cpu_s": tokens.n_cells / cpu,
            "tokens": int(tokens.arrays["input_ids"].size), "threads": tokenizer.n_threads,
            "checksum": int(tokens.arrays["input_ids"][::997].astype(np.int64).sum())}


def run_official_style(path: Path, vocab_dir: Path, n_cells: int, version: str) -> dict:
    """The algorithm of the official tokenize_anndata (h5ad path), minus the datasets library."""
    import anndata as ad
    import scipy.sparse as sp

    vocab = vocabulary(vocab_dir, version)
    max_genes = 2048 if version == "V1" else 4094
    start, cpu = time.perf_counter(), time.process_time()
    adata = ad.read_h5ad(path, backed="r")[:n_cells].to_memory()
    ids = adata.var["ensembl_id"].str.upper().map(vocab.mapping)
    loc = np.where([vocab.token_ids.get(i, False) is not False for i in ids])[0]
    norm = np.array([vocab.medians[i] for i in ids.iloc[loc]])
    tokens_of = np.array([vocab.token_ids[i] for i in ids.iloc[loc]])
    cells = []
    for i in range(0, adata.n_obs, 512):
        n_counts = adata.obs["n_counts"].values[i:i + 512, None]
        x = adata.X[i:i + 512][:, loc]
        x_norm = sp.csr_matrix(x / n_counts * 10_000 / norm)
        cells += [tokens_of[np.argsort(-x_norm[j].data)][:max_genes] for j in range(x_norm.shape[0])]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"cells": len(cells), "seconds": seconds, "cells_per_s": len(cells) / seconds,
            "cells_per_cpu_s": len(cells) / cpu}


def child(args: argparse.Namespace) -> None:
    import anndata.io  # noqa: F401  (library imports are not part of the timed work)
    import h5py  # noqa: F401
    import scipy.sparse  # noqa: F401

    if args.mode == "stream":
        result = run_stream(Path(args.path), Path(args.vocab), args.chunk_size, args.threads, args.version)
    else:
        result = run_official_style(Path(args.path), Path(args.vocab), args.baseline_cells, args.version)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def in_child(mode: str, path: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--path", str(path), "--vocab", str(args.vocab),
               "--chunk-size", str(args.chunk_size), "--baseline-cells", str(args.baseline_cells),
               "--version", args.version]
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=20_000, help="cells in the throughput file")
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--nnz", type=float, default=1_600, help="mean expressed genes per cell")
    parser.add_argument("--rss-cells", type=int, default=100_000, help="cells for the peak-RSS run (0: skip)")
    parser.add_argument("--baseline-cells", type=int, default=2_000, help="cells for the official-style run (0: skip)")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--version", choices=["V1", "V2"], default="V1",
                        help="dictionaries and input size: V1 (2,048 tokens) or V2 (4,096 tokens, <cls>/<eos>)")
    parser.add_argument("--vocab", type=Path, default=None, help="folder with the dictionaries (default: ../shared)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["stream", "official"], dest="mode", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.vocab = args.vocab or VOCAB_DIRS[args.version]
    if args.mode:
        child(args)
        return
    vocab = vocabulary(args.vocab, args.version)
    genes = np.array(sorted(g for g in vocab.token_ids if g.startswith("ENSG")))
    genes = np.random.default_rng(args.seed).choice(genes, args.genes, replace=False)
    report: dict = {"official_cells_per_s": OFFICIAL_CELLS_PER_SECOND, "cpus": os.cpu_count(),
                    "version": args.version, "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cells.h5ad"
        start = time.perf_counter()
        report["data"] = write_counts_h5ad(path, args.cells, genes, args.nnz, args.seed)
        report["data"]["write_s"] = time.perf_counter() - start
        runs = [in_child("stream", path, args) for _ in range(args.repeats)]
        best = max(runs, key=lambda r: r["cells_per_s"])
        report["stream"] = best | {"all_cells_per_s": [round(r["cells_per_s"]) for r in runs]}
        report["speedup_vs_official_quote"] = best["cells_per_s"] / OFFICIAL_CELLS_PER_SECOND
        if args.baseline_cells:
            report["official_style"] = in_child("official", path, args)
            report["speedup_vs_official_style"] = best["cells_per_s"] / report["official_style"]["cells_per_s"]
        path.unlink()
        if args.rss_cells:
            big = Path(tmp) / "big.h5ad"
            report["rss_data"] = write_counts_h5ad(big, args.rss_cells, genes, args.nnz, args.seed + 1)
            report["rss_stream"] = in_child("stream", big, args)
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    rows = [(f"stream, best of {args.repeats}", report["stream"])]
    if "official_style" in report:
        rows.append(("official-style loop", report["official_style"]))
    if "rss_stream" in report:
        rows.append((f"stream {args.rss_cells:,} cells", report["rss_stream"]))
    print(f"\n{'run':<28}{'cells/s':>12}{'cells/CPU-s':>13}{'peak RSS MB':>14}")
    for name, entry in rows:
        print(f"{name:<28}{entry['cells_per_s']:>12,.0f}{entry['cells_per_cpu_s']:>13,.0f}{entry['peak_rss_mb']:>14,.0f}")
    print(f"speed-up vs the official ~{OFFICIAL_CELLS_PER_SECOND:,} cells/s: {report['speedup_vs_official_quote']:.1f}x")


if __name__ == "__main__":
    main()
