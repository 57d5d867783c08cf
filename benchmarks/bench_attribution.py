"""Benchmark the cost of per-gene attribution per cell: an hvg head, and Geneformer at full published size.

* ``hvg``: a simulated collection (counts), an MLP head on the hvg baseline (2,000 genes), then
  `scdrugmap.explain.attribution.attribute_expression`: integrated gradients (IG, 50 steps, mean baseline)
  and plain gradients, with respect to log-normalised expression; and in-silico deletion
  (`measure_deletion_effects`) of a few genes through the head's calibrated prediction.
* ``geneformer``: the published Geneformer-V1-10M architecture (6 layers, hidden 256, 4 heads, 2,048 tokens:
  ``PUBLISHED_CONFIGS["Geneformer-V1-10M"]``, the shapes of ``shared/golden/geneformer/keys_full.json``) with
  random weights, the official V1 dictionaries, simulated counts over V1 Ensembl ids (~1,200 expressed genes a
  cell, as the embedding benchmark), an MLP head on its embeddings, then `attribute_tokens` (IG on the
  input token embeddings via captum, 20 steps) on a few cells; and one forward per cell, the cost of one
  in-silico deletion of one gene in one cell (Geneformer's deletion reruns the cell without the token).

Everything on the CPU. Prints one JSON object: seconds per cell for each method, tokens per cell, torch
threads and the load average (the machine is shared: read the figures with it).

Usage::

    python benchmarks/bench_attribution.py --hvg-cells 500 --geneformer-cells 4
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VOCAB = REPO.parent / "shared" / "vocab" / "geneformer_v1"


def bench_hvg(n_cells: int, n_steps: int, deleted_genes: int, seed: int) -> dict:
    import scdrugmap as sdm
    from scdrugmap.explain.attribution import (
        attribute_expression,
        make_predict_function,
        measure_deletion_effects,
    )
    from scdrugmap.models.baselines import HVGEncoder

    adata = sdm.datasets.simulate(n_cells=max(n_cells, 600), n_genes=3000, seed=seed, resistance_strength=2.0)
    started = time.perf_counter()
    head = sdm.tl.train(adata, "hvg", head_options={"epochs": 5})
    train_s = time.perf_counter() - started
    out: dict = {"model": "hvg baseline (2,000 genes) + MLP head", "cells": n_cells,
                 "genes_attributed": None, "train_seconds": round(train_s, 2)}
    attribute_expression(adata, head, max_cells=8, n_steps=2)  # warm-up
    for method, steps in (("integrated_gradients", n_steps), ("gradient", 1)):
        started = time.perf_counter()
        result = attribute_expression(adata, head, method=method, n_steps=steps, max_cells=n_cells, seed=seed)
        seconds = time.perf_counter() - started
        out["genes_attributed"] = int(result.values.shape[1])
        out[method] = {"steps": steps, "seconds": round(seconds, 3), "ms_per_cell": round(1e3 * seconds / n_cells, 3)}
    predict = make_predict_function(HVGEncoder(), head)
    started = time.perf_counter()
    measure_deletion_effects(adata, predict, max_cells=n_cells, max_genes=deleted_genes, seed=seed)
    seconds = time.perf_counter() - started
    out["deletion"] = {"genes": deleted_genes, "seconds": round(seconds, 3),
                       "ms_per_cell_and_gene": round(1e3 * seconds / (n_cells * deleted_genes), 4)}
    return out


def bench_geneformer(n_cells: int, n_steps: int, vocab: Path, seed: int, internal_batch_size: int) -> dict:
    from bench_geneformer_embed import simulate_counts

    from scdrugmap.explain.attribution import attribute_tokens
    from scdrugmap.models.geneformer import PUBLISHED_CONFIGS, GeneformerEncoder, build_geneformer_model
    from scdrugmap.models.geneformer_tokenizer import GeneformerTokenizer, GeneformerVocabulary
    from scdrugmap.train.heads import make_mlp

    vocabulary = GeneformerVocabulary.from_files(vocab / "geneformer_token_dictionary.pkl",
                                                 vocab / "geneformer_gene_median_dictionary.pkl", None, version="V1")
    rng = np.random.default_rng(seed)
    genes = rng.choice(np.array(sorted(g for g in vocabulary.token_ids if g.startswith("ENSG"))), 20_000,
                       replace=False)
    adata = simulate_counts(n_cells, genes, 1_200, seed)
    config = PUBLISHED_CONFIGS["Geneformer-V1-10M"]
    torch.manual_seed(seed)
    module = build_geneformer_model(config)
    n_parameters = sum(p.numel() for p in module.parameters())
    encoder = GeneformerEncoder(module, GeneformerTokenizer(vocabulary))
    mlp = make_mlp(config.hidden_size, 128).eval()

    def head(embeddings: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(mlp(embeddings)).reshape(-1)

    tokens = encoder.tokenize(adata)
    lengths = tokens.lengths
    started = time.perf_counter()
    encoder.embed_tokens(tokens, batch_size=1)
    forward_s = (time.perf_counter() - started) / tokens.n_cells
    started = time.perf_counter()
    result = attribute_tokens(encoder, adata, head=head, n_steps=n_steps, max_cells=None, batch_size=1,
                              internal_batch_size=internal_batch_size, seed=seed)
    seconds = time.perf_counter() - started
    return {"model": "Geneformer-V1-10M (6 layers, hidden 256, 4 heads, intermediate 512, 2,048 tokens), random "
                     "weights", "parameters": int(n_parameters), "cells": int(tokens.n_cells),
            "mean_tokens": float(lengths.mean()), "max_tokens": int(lengths.max()),
            "integrated_gradients": {"steps": n_steps, "internal_batch_size": internal_batch_size,
                                     "seconds": round(seconds, 2), "seconds_per_cell": round(seconds / tokens.n_cells, 2),
                                     "max_abs_convergence_delta": float(np.abs(result.convergence_delta).max())},
            "forward_seconds_per_cell": round(forward_s, 3),
            "deletion_seconds_per_cell_and_gene": round(forward_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hvg-cells", type=int, default=500)
    parser.add_argument("--hvg-steps", type=int, default=50)
    parser.add_argument("--deleted-genes", type=int, default=20)
    parser.add_argument("--geneformer-cells", type=int, default=4)
    parser.add_argument("--geneformer-steps", type=int, default=20)
    parser.add_argument("--internal-batch-size", type=int, default=4, help="IG sequences per forward/backward")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"device": "cpu", "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "load_average_start": round(os.getloadavg()[0], 2),
              "hvg": bench_hvg(args.hvg_cells, args.hvg_steps, args.deleted_genes, args.seed),
              "geneformer": bench_geneformer(args.geneformer_cells, args.geneformer_steps, args.vocab, args.seed,
                                             args.internal_batch_size),
              "load_average_end": round(os.getloadavg()[0], 2)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
