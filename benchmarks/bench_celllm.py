"""Benchmark CellLM embedding throughput at the full published size (random weights).

Simulates negative-binomial counts over gene names, runs the scBERT preprocessing and the full
10-layer, dim-512 Performer, and reports cells/s and achieved GFLOP/s next to a float32 matmul peak
measured in the same run. FLOPs are counted analytically (``performer_forward_flops``) on the
positions actually computed: with compressed padding (default) a batch is as long as its longest cell
plus one pad slot; ``official_gflop_per_cell`` is what padding every cell to 6,000 positions costs.

The official gene order (the var_names of OpenBioMed's CTC ``.h5ad``) is not redistributable here:
pass ``--genes``, otherwise 19,379 real gene symbols from ../shared/vocab stand in.

    python benchmarks/bench_celllm.py --cells 20 --batch-size 2
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
from _common import matmul_peak, print_table
from bench_scbert import simulate_counts, stand_in_genes

from scdrugmap.models._performer import performer_forward_flops
from scdrugmap.models.celllm import CellLMConfig, CellLMEncoder, build_celllm_model
from scdrugmap.models.scbert import read_gene_list


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--genes", type=Path, help="the model's gene order (.h5ad var_names or .txt)")
    parser.add_argument("--weights", type=Path, help="official checkpoint folder (default: random weights)")
    parser.add_argument("--key-max", choices=("batch", "cell"), default="batch")
    parser.add_argument("--no-compress", action="store_true", help="pad every cell to 6,000 positions")
    parser.add_argument("--library", type=float, default=6000.0, help="mean UMIs per simulated cell")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    config = CellLMConfig()
    options = {"key_max": args.key_max, "compress_padding": not args.no_compress}
    if args.weights:
        encoder = CellLMEncoder.from_pretrained(args.weights, genes=args.genes, device=args.device, **options)
        genes = encoder.genes
    else:
        genes = read_gene_list(args.genes) if args.genes else stand_in_genes(config.gene_num)
        module = build_celllm_model(config, seed=args.seed).to(device).eval()
        encoder = CellLMEncoder(module, genes, config, **options)

    adata = simulate_counts(args.cells, genes, seed=args.seed, library=args.library)
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

    def flops(length: int) -> int:
        return performer_forward_flops(tokens=length, dim=config.dim, depth=config.depth, heads=config.heads,
                                       dim_head=config.dim_head, nb_features=config.nb_features,
                                       ff_mult=config.ff_mult)

    computed = sum(rows.size * flops(batch["input_ids"].shape[1])
                   for rows, batch in encoder.iter_batches(tokens, args.batch_size))
    results = {
        "model": "celllm", "device": str(device), "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "cells": tokens.n_cells, "batch_size": args.batch_size,
        "key_max": args.key_max, "compress_padding": not args.no_compress,
        "weights": str(args.weights) if args.weights else "random",
        "tokens_per_cell_mean": float(tokens.lengths.mean()),
        "truncated_cells": int((tokens.lengths >= config.max_seq_len).sum()),
        "tokenize_cells_per_s": tokens.n_cells / tokenize_s,
        "embed_cells_per_s": tokens.n_cells / embed_s,
        "gflop_per_cell_computed": computed / tokens.n_cells / 1e9,
        "official_gflop_per_cell": flops(config.max_seq_len) / 1e9,
        "achieved_gflop_per_s": computed / embed_s / 1e9,
        "official_equivalent_gflop_per_s": flops(config.max_seq_len) * tokens.n_cells / embed_s / 1e9,
        "matmul_peak_gflop_per_s": matmul_peak(device),
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "finite": bool(np.isfinite(embeddings).all()),
    }
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
