"""Benchmark CellPLM embedding at the full published config (20230926_85M) with random weights.

Simulated negative-binomial counts over real Ensembl ids of the model's gene list go through the official
path (`CellPLMEncoder.embed`: gene alignment, one forward pass per group, Gumbel latent). Prints a JSON
record: cells/s, achieved GFLOP/s of the forward pass (FLOPs counted analytically), a float32 matmul peak
measured in the same run, and how far the official Gumbel embedding sits from the deterministic argmax mode.

    python benchmarks/bench_cellplm.py --cells 1000
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from _common import matmul_peak

from scdrugmap.models.cellplm import GMVAE_HIDDEN, CellPLMConfig, CellPLMEncoder, CellPLMModel

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "vocab" / "cellplm" / "20230926_85M.config.json"


def simulate_counts(gene_list: tuple[str, ...], n_cells: int, n_genes: int, seed: int) -> ad.AnnData:
    """Return NB (gamma-Poisson) counts for ``n_cells`` over ``n_genes`` random genes of the vocabulary."""
    rng = np.random.default_rng(seed)
    genes = rng.choice(np.asarray(gene_list), size=n_genes, replace=False)
    gene_mean = rng.lognormal(mean=-1.0, sigma=1.5, size=n_genes)
    library = rng.lognormal(mean=0.0, sigma=0.5, size=(n_cells, 1))
    theta = 2.0
    counts = rng.poisson(rng.gamma(theta, library * gene_mean / theta)).astype(np.float32)
    return ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=genes),
                      obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]))


def forward_flops(config: CellPLMConfig, n_cells: int, nnz: int) -> float:
    """Multiply-adds x 2 of one CellPLM forward over ``n_cells`` cells with ``nnz`` non-zero counts."""
    hidden, heads = config.enc_hid, config.enc_head
    head_dim = hidden // heads
    embed = 2 * nnz * hidden + 2 * n_cells * hidden * hidden
    projections = 4 * 2 * n_cells * hidden * hidden
    feed_forward = 2 * 2 * n_cells * hidden * (2 * hidden)
    flow = heads * (2 * 2 * n_cells * head_dim * head_dim + 8 * n_cells * head_dim)
    latent = 2 * n_cells * (hidden * config.num_clusters + (hidden + config.num_clusters) * GMVAE_HIDDEN
                            + GMVAE_HIDDEN * config.post_latent_dim)
    return float(embed + config.enc_layers * (projections + feed_forward + flow) + latent)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--genes", type=int, default=2000, help="genes of the simulated data (all in the vocabulary)")
    parser.add_argument("--cells-per-pass", type=int, default=0, help="0: all cells in one pass (official default)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="official 20230926_85M.config.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    config = CellPLMConfig.from_official(args.config)
    torch.manual_seed(args.seed)
    model = CellPLMModel(config).to(device).eval()
    encoder = CellPLMEncoder(model, cells_per_pass=args.cells_per_pass)
    adata = simulate_counts(config.gene_list, args.cells, args.genes, args.seed)

    warm = adata[: min(64, args.cells)].copy()
    encoder.embed(warm)  # warm-up
    start = time.perf_counter()
    tokens = encoder.tokenize(adata)
    tokenize_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    embeddings = encoder.embed_tokens(tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    forward_s = time.perf_counter() - start
    total_s = tokenize_s + forward_s

    nnz = int(tokens.arrays["counts"].size)
    flops = forward_flops(config, args.cells, nnz)
    sample = adata[: min(1000, args.cells)].copy()
    argmax = CellPLMEncoder(model, latent_sampling="argmax", cells_per_pass=args.cells_per_pass).embed(sample)
    gumbel = encoder.embed(sample)
    gap = np.abs(gumbel - argmax).max(axis=1)

    result = {
        "model": "cellplm", "config": config.name, "device": str(device), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "cells": args.cells, "genes": args.genes, "mean_nonzero_per_cell": round(nnz / args.cells, 1),
        "cells_per_pass": args.cells_per_pass or args.cells,
        "tokenize_s": round(tokenize_s, 3), "forward_s": round(forward_s, 3),
        "cells_per_s": round(args.cells / total_s, 1), "forward_cells_per_s": round(args.cells / forward_s, 1),
        "forward_gflop": round(flops / 1e9, 2), "achieved_gflop_s": round(flops / forward_s / 1e9, 1),
        "matmul_peak_gflop_s": round(matmul_peak(device), 1),
        "finite": bool(np.isfinite(embeddings).all()),
        "gumbel_vs_argmax": {"cells": int(gap.size), "cells_differing": int((gap > 1e-6).sum()),
                             "max_abs_diff": float(gap.max()), "mean_max_abs_diff": float(gap.mean())},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
