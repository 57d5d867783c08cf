"""Benchmark the frozen strategy's head training: 10 folds on 326,751 x 512 embeddings.

    python benchmarks/bench_heads.py                    # full size: 326,751 cells, 10 folds, 10 epochs
    python benchmarks/bench_heads.py --cells 50000 --epochs 2

Trains the paper's MLP head (512 -> 512 -> 512 -> 1, batch 128, AdamW) for every fold of a 10-fold split,
all folds at once as one batched network (`fit_mlp_heads`), then predicts each test fold. Prints one JSON
object: seconds, cells trained per second, the achieved GFLOP/s of training (forward + backward counted as
3x the forward FLOPs of every cell-epoch actually run), next to a float32 matmul peak measured in the same
run, and peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np
import torch
from _common import matmul_peak

from scdrugmap.train.heads import HeadConfig, fit_mlp_heads, mlp_flops_per_cell, predict_mlp_heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=326_751)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    labels = rng.integers(0, 2, args.cells)
    embeddings = rng.normal(size=(args.cells, args.dim)).astype(np.float32)
    embeddings[:, :8] += labels[:, None] * 0.5
    fold_of = rng.permutation(np.arange(args.cells) % args.folds)
    fits, tests = [], []
    for fold in range(args.folds):
        train = np.flatnonzero(fold_of != fold)
        cut = int(train.size * 0.9)
        fits.append((train[:cut], train[cut:]))
        tests.append(np.flatnonzero(fold_of == fold))
    X = torch.as_tensor(embeddings)
    y = torch.as_tensor(labels, dtype=torch.float32)
    peak_before = matmul_peak()
    config = HeadConfig(epochs=args.epochs, patience=args.epochs, seed=args.seed)  # no early stop: fixed work
    start = time.perf_counter()
    model, records = fit_mlp_heads(X, y, fits, config)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    probabilities = predict_mlp_heads(model, X, tests)
    predict_seconds = time.perf_counter() - start
    peak_after = matmul_peak()
    steps = int(np.ceil(max(f.size for f, _ in fits) / config.batch_size))
    cell_epochs = steps * config.batch_size * args.folds * sum(r["epochs_run"] for r in records) / args.folds
    train_flops = 3 * mlp_flops_per_cell(args.dim) * cell_epochs
    accuracy = np.mean([((p >= 0.5) == labels[t]).mean() for p, t in zip(probabilities, tests, strict=True)])
    print(json.dumps({
        "cells": args.cells, "dim": args.dim, "folds": args.folds, "epochs": args.epochs,
        "threads": torch.get_num_threads(), "train_seconds": round(train_seconds, 1),
        "predict_seconds": round(predict_seconds, 2),
        "train_cell_epochs_per_second": round(cell_epochs / train_seconds),
        "train_gflops_per_second": round(train_flops / train_seconds / 1e9, 1),
        "matmul_peak_gflops_per_second": round(max(peak_before, peak_after), 1),
        "mean_test_accuracy": round(float(accuracy), 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "load_average": os.getloadavg()[0],
    }, indent=1))


if __name__ == "__main__":
    main()
