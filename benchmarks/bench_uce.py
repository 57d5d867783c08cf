"""Benchmark UCE embedding: tokenizer and model throughput at the published size, random weights.

Full published config (4-layer by default, ``--variant 33layer`` for the paper's model): token_dim 5120,
d_model 1280, 20 heads, d_hid 5120, the 145,469 x 5120 token table, 1024 sampled genes per cell.
Counts are simulated negative-binomial over real human gene symbols. The official gene list and
chromosome table come from ``--model-files`` (the official ``model_files`` folder) when given;
otherwise the symbols are scFoundation's 19,264 human genes (../shared/vocab) placed on random human
chromosomes and starts, which gives sentences of the official shape (~1075 tokens).

Reports cells/s of the tokenizer and the model, and the model's achieved GFLOP/s (matmul FLOPs of the
batches actually run, counted analytically) next to a dense matmul peak measured in the same run.

    python benchmarks/bench_uce.py --cells 1000
    python benchmarks/bench_uce.py --cells 32 --json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from _common import matmul_peak, print_table

from scdrugmap.models.uce import UCEConfig, UCEEncoder, UCEGeneTable, UCEModel

DEFAULT_GENES = Path(__file__).resolve().parents[2] / "shared" / "vocab" / "scfoundation" / "OS_scRNA_gene_index.19264.tsv"
HUMAN_CHROMOSOMES = [str(i) for i in range(1, 23)] + ["X", "Y", "MT"]
VARIANTS = {"4layer": 4, "33layer": 33}


def synthetic_gene_table(gene_list: Path, config: UCEConfig, seed: int) -> UCEGeneTable:
    """Real symbols with random human chromosomes and starts (token rows from 4, like species offsets)."""
    rng = np.random.default_rng(seed)
    symbols = pd.read_csv(gene_list, sep="\t")["gene_name"].astype(str).str.upper().drop_duplicates().tolist()
    chrom_table = pd.DataFrame({"gene_symbol": symbols,
                                "chromosome": rng.choice(HUMAN_CHROMOSOMES[:-1], size=len(symbols)),
                                "start": rng.integers(1, 250_000_000, size=len(symbols)),
                                "species": "human"})
    categories = pd.Categorical(chrom_table["species"] + "_" + chrom_table["chromosome"])
    chrom_table["chrom_code"] = categories.codes
    return UCEGeneTable.build(symbols, 4, chrom_table, categories.categories, "human")


def simulate_counts(symbols: list[str], n_cells: int, n_genes: int, seed: int) -> ad.AnnData:
    """NB counts (dispersion 2, log-normal gene means) over ``n_genes`` random symbols."""
    rng = np.random.default_rng(seed)
    genes = rng.choice(np.asarray(symbols, dtype=object), size=n_genes, replace=False)
    means = rng.lognormal(mean=-0.5, sigma=1.5, size=n_genes)
    size_factors = rng.lognormal(mean=0.0, sigma=0.3, size=(n_cells, 1))
    dispersion = 2.0
    counts = rng.negative_binomial(dispersion, dispersion / (dispersion + means[None, :] * size_factors))
    return ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), var=pd.DataFrame(index=genes.astype(str)))


def forward_flops(config: UCEConfig, batch: int, length: int, unique_tokens: int) -> float:
    """Multiply-adds x 2 of one forward pass as run: the input projection once per distinct token,
    every position in all layers but the last, only the CLS query (all keys/values) in the last, and
    the decoder on CLS. Norms, softmax and activations are left out."""
    d, h = config.d_model, config.d_hid
    input_projection = 2 * unique_tokens * config.token_dim * d
    full_layer = batch * length * (4 * 2 * d * d + 2 * 2 * d * h) + batch * 2 * 2 * length * length * d
    cls_layer = batch * (length * 2 * 2 * d * d + 2 * 2 * d * d + 2 * 2 * d * h + 2 * 2 * length * d)
    decoder = batch * 2 * (d * config.decoder_hidden + config.decoder_hidden * config.output_dim
                           + 2 * config.output_dim**2)
    return input_projection + (config.nlayers - 1) * full_layer + cls_layer + decoder




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--genes", type=int, default=5000, help="simulated genes")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="4layer")
    parser.add_argument("--batch-size", type=int, default=25, help="compute batch (official batch is 25)")
    parser.add_argument("--padding-mask", choices=["additive", "blocking"], default="additive")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA")
    parser.add_argument("--model-files", type=Path, default=None, help="official model_files folder (gene table)")
    parser.add_argument("--gene-list", type=Path, default=DEFAULT_GENES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    device = torch.device(args.device)
    config = UCEConfig(nlayers=VARIANTS[args.variant], padding_mask=args.padding_mask, seed=args.seed)
    start = time.perf_counter()
    with torch.device(device):
        module = UCEModel(config).eval()
    build_s = time.perf_counter() - start
    if args.model_files is not None:
        genes = UCEEncoder._read_genes(args.model_files, config, None)
        vocabulary = "official protein-embedding genes and chromosome table"
    else:
        genes = synthetic_gene_table(args.gene_list, config, args.seed)
        vocabulary = f"{args.gene_list.name} symbols on random human chromosomes"
    encoder = UCEEncoder(module, genes, config)
    adata = simulate_counts(list(genes.symbols), args.cells, args.genes, args.seed)

    start = time.perf_counter()
    tokens = encoder.tokenize(adata)
    tokenize_s = time.perf_counter() - start

    with torch.inference_mode():  # warm-up (kernel selection, allocator)
        encoder.encode(encoder.collate(tokens, np.arange(min(2, tokens.n_cells))))
    flops = 0.0
    for _, batch in encoder.iter_batches(tokens, args.batch_size):
        ids = batch["token_ids"]
        flops += forward_flops(config, ids.shape[0], ids.shape[1], int(torch.unique(ids).numel()))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    embeddings = encoder.embed_tokens(tokens, batch_size=args.batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    model_s = time.perf_counter() - start
    assert np.isfinite(embeddings).all()

    results = {
        "model": f"uce {args.variant} (random weights)", "device": str(device),
        "torch_threads": torch.get_num_threads(), "tf32": args.tf32, "padding_mask": args.padding_mask,
        "vocabulary": vocabulary, "build_s": build_s,
        "cells": tokens.n_cells, "dropped": len(tokens.dropped), "genes": args.genes,
        "batch_size": args.batch_size, "mean_tokens_per_cell": float(tokens.arrays["sentence_lengths"].mean()),
        "tokenize_cells_per_s": tokens.n_cells / tokenize_s,
        "model_cells_per_s": tokens.n_cells / model_s,
        "end_to_end_cells_per_s": tokens.n_cells / (tokenize_s + model_s),
        "forward_gflop_per_cell": flops / tokens.n_cells / 1e9,
        "achieved_gflop_per_s": flops / model_s / 1e9,
        "matmul_peak_gflop_per_s": matmul_peak(device),
    }
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print_table(results, ",.2f")


if __name__ == "__main__":
    main()
