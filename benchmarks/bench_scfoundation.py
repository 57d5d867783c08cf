"""Throughput of scFoundation cell embeddings at the full published size (random weights).

Simulates negative-binomial UMI counts over the real 19,264 gene symbols of the official index,
tokenizes them the official way, and embeds them with the 12-layer, 768-d encoder. Reports
cells/s and achieved GFLOP/s (forward matmul FLOPs counted analytically from each cell's own
token count, padding excluded) next to a float32 matmul peak measured in the same run.

    python benchmarks/bench_scfoundation.py --cells 1000
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from _common import matmul_peak, print_table

DEFAULT_GENE_INDEX = Path(__file__).resolve().parents[2] / "shared" / "vocab" / "scfoundation" / \
    "OS_scRNA_gene_index.19264.tsv"
NB_SIZE = 0.6  # dispersion of the simulated counts (as in the golden fixture)


def simulate_counts(n_cells: int, n_genes: int, mean_expressed: float, rng: np.random.Generator):
    """Return sparse NB counts whose cells express about ``mean_expressed`` genes on average."""
    import scipy.sparse as sp

    base = rng.lognormal(mean=-3.0, sigma=2.0, size=n_genes)

    def expected_expressed(scale: float) -> float:
        mu = base * scale
        return float(np.sum(1.0 - (NB_SIZE / (NB_SIZE + mu)) ** NB_SIZE))

    low, high = 1e-6, 1e6
    for _ in range(100):  # bisection on a log scale
        mid = np.sqrt(low * high)
        low, high = (mid, high) if expected_expressed(mid) < mean_expressed else (low, mid)
    mu = base * np.sqrt(low * high)
    blocks = []
    for start in range(0, n_cells, 256):
        rows = min(256, n_cells - start)
        counts = rng.negative_binomial(NB_SIZE, NB_SIZE / (NB_SIZE + mu), size=(rows, n_genes))
        blocks.append(sp.csr_matrix(counts.astype(np.float32)))
    return sp.vstack(blocks).tocsr()


def forward_flops(lengths: np.ndarray, hidden: int, depth: int, bin_num: int, ff_mult: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of the cell path for cells of ``lengths`` tokens."""
    tokens = lengths.astype(np.float64)
    embedding = 2 * tokens * (bin_num + bin_num * bin_num + bin_num * hidden)
    projections = 2 * tokens * (3 * hidden * hidden + hidden * hidden + 2 * ff_mult * hidden * hidden)
    attention = 2 * 2 * tokens * tokens * hidden  # QK^T and AV over all heads
    return float(np.sum(embedding + depth * (projections + attention)))




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mean-genes", type=float, default=1500.0, help="expressed genes per cell on average")
    parser.add_argument("--gene-index", type=Path, default=DEFAULT_GENE_INDEX)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import anndata as ad
    import torch

    from scdrugmap.models.scfoundation import (
        ScFoundationConfig,
        ScFoundationEncoder,
        ScFoundationModel,
        read_gene_index,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    genes = read_gene_index(args.gene_index)
    config = ScFoundationConfig()
    torch.manual_seed(args.seed)
    encoder = ScFoundationEncoder(ScFoundationModel(config).eval(), genes)
    adata = ad.AnnData(simulate_counts(args.cells, len(genes), args.mean_genes, rng))
    adata.var_names = genes

    peak = matmul_peak()
    start = time.perf_counter()
    tokens = encoder.tokenize(adata)
    tokenize_s = time.perf_counter() - start
    warm = encoder.collate(tokens, np.arange(min(2, tokens.n_cells)))
    with torch.inference_mode():
        encoder.encode(warm)
    start = time.perf_counter()
    embeddings = encoder.embed_tokens(tokens, batch_size=args.batch_size)
    embed_s = time.perf_counter() - start
    flops = forward_flops(tokens.lengths, config.hidden_dim, config.depth, config.bin_num, config.ff_mult)

    results = {
        "model": "scfoundation", "config": "full (768-d, 12 layers, 19,264 genes)", "device": "cpu",
        "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "cells": tokens.n_cells, "dropped": len(tokens.dropped), "batch_size": args.batch_size,
        "tokens_per_cell_mean": float(tokens.lengths.mean()), "tokens_per_cell_max": int(tokens.lengths.max()),
        "tokenize_cells_per_s": tokens.n_cells / tokenize_s, "embed_s": embed_s,
        "embed_cells_per_s": tokens.n_cells / embed_s, "gflop_per_cell": flops / tokens.n_cells / 1e9,
        "achieved_gflop_per_s": flops / embed_s / 1e9, "matmul_peak_gflop_per_s": peak,
        "embedding_shape": list(embeddings.shape),
    }
    print_table(results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
