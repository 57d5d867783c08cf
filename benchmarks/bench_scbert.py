"""Benchmark scBERT embedding throughput at the full published size (random weights).

Simulates negative-binomial counts over gene names, runs the official preprocessing and the
full 6-layer, 16,907-token Performer, and reports cells/s and achieved GFLOP/s (matmul FLOPs counted
analytically, see ``performer_forward_flops``) next to a float32 matmul peak measured in the same run.

The official gene order (``panglao_10000.h5ad``) is not redistributable here: pass ``--genes`` with it,
otherwise 16,906 real gene symbols are taken from ../shared/vocab (scFoundation's list) as a stand-in.
Throughput does not depend on which genes they are.

    python benchmarks/bench_scbert.py --cells 20 --batch-size 2
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from _common import matmul_peak, print_table

from scdrugmap.models._performer import performer_forward_flops
from scdrugmap.models.scbert import ScBERTConfig, ScBERTEncoder, build_scbert_model, read_gene_list

SHARED_VOCAB = Path(__file__).resolve().parents[2] / "shared" / "vocab"


def stand_in_genes(n_genes: int) -> np.ndarray:
    """Return ``n_genes`` real symbols: scFoundation's 19,264 genes, then scGPT vocabulary entries."""
    table = (SHARED_VOCAB / "scfoundation" / "OS_scRNA_gene_index.19264.tsv").read_text().splitlines()[1:]
    genes = [line.split("\t")[0] for line in table]
    if len(genes) < n_genes:
        extra = json.loads((SHARED_VOCAB / "scgpt" / "vocab.json").read_text())
        seen = set(genes)
        genes += [g for g in extra if g not in seen and not g.startswith("<")][: n_genes - len(genes)]
    return np.asarray(genes[:n_genes])


def simulate_counts(n_cells: int, genes: np.ndarray, *, seed: int = 0, library: float = 6000.0,
                    dispersion: float = 0.5) -> ad.AnnData:
    """Negative-binomial UMI counts: lognormal gene profile, lognormal library sizes, gamma-Poisson noise."""
    rng = np.random.default_rng(seed)
    profile = rng.lognormal(0.0, 2.0, genes.size)
    profile /= profile.sum()
    sizes = rng.lognormal(np.log(library), 0.4, n_cells)
    counts = []
    for start in range(0, n_cells, 256):  # chunks bound memory; each chunk is vectorised
        mu = sizes[start : start + 256, None] * profile[None, :]
        rate = rng.gamma(1.0 / dispersion, mu * dispersion)
        counts.append(sp.csr_matrix(rng.poisson(rate).astype(np.float32)))
    adata = ad.AnnData(X=sp.vstack(counts, format="csr"))
    adata.var_names = genes
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    return adata




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--genes", type=Path, help="panglao_10000.h5ad or a gene list (.txt)")
    parser.add_argument("--weights", type=Path, help="official checkpoint folder (default: random weights)")
    parser.add_argument("--key-max", choices=("batch", "cell"), default="batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    config = ScBERTConfig()
    if args.weights:
        encoder = ScBERTEncoder.from_pretrained(args.weights, genes=args.genes, key_max=args.key_max,
                                                device=args.device)
        genes = encoder.genes
    else:
        genes = read_gene_list(args.genes) if args.genes else stand_in_genes(config.gene_num)
        module = build_scbert_model(config, seed=args.seed).to(device).eval()
        encoder = ScBERTEncoder(module, genes, config, key_max=args.key_max)

    adata = simulate_counts(args.cells, genes, seed=args.seed)
    start = time.perf_counter()
    tokens = encoder.tokenize(adata)
    tokenize_s = time.perf_counter() - start
    warm = encoder.collate(tokens, np.arange(min(1, tokens.n_cells)))
    with torch.inference_mode():
        encoder.encode({k: v.to(device) for k, v in warm.items()})
    start = time.perf_counter()
    embeddings = encoder.embed_tokens(tokens, batch_size=args.batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    embed_s = time.perf_counter() - start

    flops_per_cell = performer_forward_flops(tokens=config.max_seq_len, dim=config.dim, depth=config.depth,
                                             heads=config.heads, dim_head=config.dim_head,
                                             nb_features=config.nb_features, ff_mult=config.ff_mult)
    results = {
        "model": "scbert", "device": str(device), "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "cells": tokens.n_cells, "batch_size": args.batch_size,
        "key_max": args.key_max, "weights": str(args.weights) if args.weights else "random",
        "tokens_per_cell": config.max_seq_len,
        "genes_expressed_per_cell": float(np.diff(adata.X.indptr).mean()),
        "tokenize_cells_per_s": tokens.n_cells / tokenize_s,
        "embed_cells_per_s": tokens.n_cells / embed_s,
        "gflop_per_cell": flops_per_cell / 1e9,
        "achieved_gflop_per_s": flops_per_cell * tokens.n_cells / embed_s / 1e9,
        "matmul_peak_gflop_per_s": matmul_peak(device),
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "finite": bool(np.isfinite(embeddings).all()),
    }
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
