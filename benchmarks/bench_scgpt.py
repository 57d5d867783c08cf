"""Benchmark scGPT (whole-human) embedding: tokenizer and model throughput at the published size.

Random weights at the full published config (d_model 512, 12 layers, 8 heads, 60,697 tokens), simulated
negative-binomial counts over real gene symbols of the official vocabulary. Reports cells/s of the
tokenizer and of the model, and the model's achieved GFLOP/s (forward FLOPs counted analytically on the
padded batches actually run) next to a dense matmul peak measured in the same run.

    python benchmarks/bench_scgpt.py --cells 1000
    python benchmarks/bench_scgpt.py --cells 200 --device cuda --autocast float16 --json
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

from scdrugmap.models.scgpt import SPECIAL_TOKENS, ScGPTConfig, ScGPTEncoder, ScGPTModel, load_vocab

DEFAULT_VOCAB = Path(__file__).resolve().parents[2] / "shared" / "vocab" / "scgpt" / "vocab.json"


def simulate_counts(vocab: dict[str, int], n_cells: int, n_genes: int, seed: int) -> ad.AnnData:
    """NB counts (dispersion 2, log-normal gene means) over ``n_genes`` random vocabulary symbols."""
    rng = np.random.default_rng(seed)
    symbols = np.array([g for g in vocab if g not in SPECIAL_TOKENS])
    genes = rng.choice(symbols, size=n_genes, replace=False)
    means = rng.lognormal(mean=-0.5, sigma=1.5, size=n_genes)
    size_factors = rng.lognormal(mean=0.0, sigma=0.3, size=(n_cells, 1))
    dispersion = 2.0
    p = dispersion / (dispersion + means[None, :] * size_factors)
    counts = rng.negative_binomial(dispersion, p).astype(np.float32)
    return ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=genes))


def forward_flops(config: ScGPTConfig, batch: int, length: int) -> float:
    """Multiply-adds x 2 of one forward pass on a (batch x length) padded batch (norms, softmax left out)."""
    d, h = config.d_model, config.d_hid
    tokens = batch * length
    value_encoder = tokens * (2 * d + 2 * d * d)
    projections = tokens * 4 * 2 * d * d
    attention = batch * 2 * 2 * length * length * d
    feed_forward = tokens * 2 * 2 * d * h
    return value_encoder + config.nlayers * (projections + attention + feed_forward)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--genes", type=int, default=5000, help="simulated genes (all in the vocabulary)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=1200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", choices=["none", "float16", "bfloat16"], default="none")
    parser.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    vocab = load_vocab(args.vocab)
    config = ScGPTConfig(ntoken=len(vocab), pad_token_id=vocab["<pad>"], cls_token_id=vocab["<cls>"])
    module = ScGPTModel(config).to(device).eval()
    autocast = None if args.autocast == "none" else args.autocast
    encoder = ScGPTEncoder(module, vocab, max_length=args.max_length, autocast_dtype=autocast)
    adata = simulate_counts(vocab, args.cells, args.genes, args.seed)

    start = time.perf_counter()
    tokens = encoder.tokenize(adata)
    tokenize_s = time.perf_counter() - start

    warm = tokens.lengths.argsort()[-min(2, tokens.n_cells):]
    with torch.inference_mode():  # warm-up (kernel selection, allocator)
        encoder.encode({k: v.to(device) for k, v in encoder.collate(tokens, warm).items()})
    flops = sum(forward_flops(config, rows.size, int(tokens.lengths[rows].max()))
                for rows, _ in encoder.iter_batches(tokens, args.batch_size))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    embeddings = encoder.embed_tokens(tokens, batch_size=args.batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    model_s = time.perf_counter() - start
    assert np.isfinite(embeddings).all()

    peak_dtype = getattr(torch, autocast) if autocast else torch.float32
    results = {
        "model": "scgpt (whole-human, random weights)", "device": str(device),
        "torch_threads": torch.get_num_threads(), "autocast": args.autocast,
        "cells": tokens.n_cells, "genes": args.genes, "batch_size": args.batch_size,
        "mean_tokens_per_cell": float(tokens.lengths.mean()),
        "tokenize_cells_per_s": tokens.n_cells / tokenize_s,
        "model_cells_per_s": tokens.n_cells / model_s,
        "end_to_end_cells_per_s": tokens.n_cells / (tokenize_s + model_s),
        "forward_gflop_per_cell": flops / tokens.n_cells / 1e9,
        "achieved_gflop_per_s": flops / model_s / 1e9,
        "matmul_peak_gflop_per_s": matmul_peak(device, peak_dtype),
    }
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print_table(results, ",.2f")


if __name__ == "__main__":
    main()
