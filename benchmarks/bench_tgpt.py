"""Benchmark tGPT embeddings at the full published size (transcriptome-gpt-1024-8-16-64), random weights.

Simulated negative-binomial counts over gene symbols of the official tGPT vocabulary are tokenized (top 62
expressed genes + BOS/EOS), then embedded two ways with the same weights:

* ``scdrugmap``: `TGPTEncoder.embed_tokens` (length-bucketed batches, SDPA, ``torch.inference_mode``);
* ``official snippet``: ``GPT2Model`` with eager attention called as the README does (``model(**batch)``
  with ``token_type_ids``), batches in data order under ``torch.no_grad``, ``h[1:eos].mean(0)`` per cell.

FLOPs are counted analytically (`scdrugmap.models.tgpt.forward_flops`) and set against a float32 matmul
peak measured in the same run.

Usage::

    python benchmarks/bench_tgpt.py --cells 1000
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from _common import matmul_peak

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO.parent / "shared" / "vocab" / "tgpt" / "tokenizer.json"




def simulate_counts(n_cells: int, symbols: np.ndarray, mean_genes: float, seed: int):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    detect = rng.beta(0.6, 0.6 * (symbols.size / mean_genes - 1), symbols.size)
    depth = rng.lognormal(0.0, 0.45, n_cells)
    expressed = rng.random((n_cells, symbols.size)) < np.minimum(detect[None, :] * depth[:, None], 1)
    counts = np.where(expressed, 1 + rng.negative_binomial(1.5, 0.4, expressed.shape), 0).astype(np.float32)
    return ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=symbols))


def official_snippet(model, encoder, tokens, batch_size: int) -> tuple[np.ndarray, float]:
    out = np.empty((tokens.n_cells, model.config.n_embd), dtype=np.float32)
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, tokens.n_cells, batch_size):
            rows = np.arange(first, min(first + batch_size, tokens.n_cells))
            batch = encoder.collate(tokens, rows)
            hidden = model(**batch).last_hidden_state
            eos = batch["attention_mask"].sum(1) - 1
            out[rows] = torch.stack([hidden[j, 1:eos[j]].mean(0) for j in range(rows.size)]).numpy()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--genes", type=int, default=15_000, help="vocabulary symbols in the simulated matrix")
    parser.add_argument("--mean-genes", type=float, default=1_500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--baseline-cells", type=int, default=None, help="cells for the official snippet (default all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GPT2Model

    from scdrugmap.models.base import TokenizedCells
    from scdrugmap.models.tgpt import TGPTConfig, TGPTEncoder, TGPTTokenizer, build_tgpt_model, forward_flops

    tokenizer = TGPTTokenizer(args.tokenizer)
    vocab = tokenizer.tokenizer.get_vocab()
    symbols = np.array(sorted(s for s, i in vocab.items() if i > 3 and s[:1].isupper()))
    symbols = np.random.default_rng(args.seed).choice(symbols, min(args.genes, symbols.size), replace=False)
    adata = simulate_counts(args.cells, symbols, args.mean_genes, args.seed)
    config = TGPTConfig()
    torch.manual_seed(args.seed)
    module = build_tgpt_model(config)
    encoder = TGPTEncoder(module, tokenizer)
    start = time.perf_counter()
    tokens = encoder.tokenize(adata)
    tokenize_s = time.perf_counter() - start
    lengths = tokens.lengths
    peak = matmul_peak()
    encoder.embed_tokens(TokenizedCells(cell_index=tokens.cell_index[:2], lengths=lengths[:2],
                                        arrays={"input_ids": tokens.arrays["input_ids"],
                                                "offsets": tokens.arrays["offsets"][:3]}), batch_size=2)
    start = time.perf_counter()
    ours = encoder.embed_tokens(tokens, batch_size=args.batch_size)
    ours_s = time.perf_counter() - start
    useful = forward_flops(config, lengths)

    n_base = min(args.baseline_cells or tokens.n_cells, tokens.n_cells)
    eager = GPT2Model(config.to_transformers("eager")).eval()
    eager.load_state_dict(module.transformer.state_dict())
    base_tokens = TokenizedCells(cell_index=tokens.cell_index[:n_base], lengths=lengths[:n_base],
                                 arrays={"input_ids": tokens.arrays["input_ids"],
                                         "offsets": tokens.arrays["offsets"][:n_base + 1]})
    baseline, base_s = official_snippet(eager, encoder, base_tokens, args.batch_size)
    report = {
        "model": "tGPT transcriptome-gpt-1024-8-16-64 (8 layers, n_embd 1024, 16 heads), random weights",
        "cells": int(tokens.n_cells), "mean_length": float(lengths.mean()), "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
        "tokenize_cells_per_s": tokens.n_cells / tokenize_s,
        "matmul_peak_gflops": peak,
        "scdrugmap": {"seconds": ours_s, "cells_per_s": tokens.n_cells / ours_s, "gflops": useful / ours_s / 1e9},
        "official_snippet_eager": {"cells": n_base, "seconds": base_s, "cells_per_s": n_base / base_s,
                                   "gflops": forward_flops(config, lengths[:n_base]) / base_s / 1e9},
        "max_abs_diff": float(np.abs(ours[:n_base] - baseline).max()),
    }
    report["speedup"] = report["scdrugmap"]["cells_per_s"] / report["official_snippet_eager"]["cells_per_s"]
    print(json.dumps(report, indent=1))
    print(f"\n{'method':<30}{'cells/s':>10}{'GFLOP/s':>10}{'% of matmul peak':>18}")
    for name, key in (("scdrugmap (bucketed SDPA)", "scdrugmap"), ("official snippet (eager)", "official_snippet_eager")):
        entry = report[key]
        print(f"{name:<30}{entry['cells_per_s']:>10.2f}{entry['gflops']:>10.1f}{100 * entry['gflops'] / peak:>17.0f}%")
    print(f"matmul peak {peak:.1f} GFLOP/s; speed-up {report['speedup']:.2f}x; max |diff| {report['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
