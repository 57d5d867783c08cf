"""What trust costs: calibration, conformal sets and the OOD score per 10,000 predicted cells.

Trains a pca head (mlp) on a simulated collection, then predicts N new cells and times, best of
three, each part of `scdrugmap.train.trust.TrustKit.apply` beside the head itself (embedding the
cells with the head's PCA basis, then the MLP): what `scdrugmap predict` adds to a prediction.

    python benchmarks/bench_trust.py --cells 20000
"""

from __future__ import annotations

import argparse
import json
import os
import time


def best_of(function, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20_000, help="cells to predict")
    parser.add_argument("--train-cells", type=int, default=5_000)
    parser.add_argument("--genes", type=int, default=2_000)
    args = parser.parse_args()

    import scdrugmap as sdm
    from scdrugmap.models.base import load_encoder
    from scdrugmap.train.predict import predict_cells

    train = sdm.datasets.simulate(n_cells=args.train_cells, n_genes=args.genes, seed=0)
    test = sdm.datasets.simulate(n_cells=args.cells, n_genes=args.genes, seed=1)
    head = sdm.tl.train(train, "pca")
    kit = head.trust_kit()
    encoder = load_encoder("pca")
    logits, embeddings = predict_cells(encoder, test, head, return_embeddings=True)
    seconds = {
        "head (embed in the head's basis + MLP)": best_of(lambda: predict_cells(encoder, test, head)),
        "calibration (Platt)": best_of(lambda: kit.calibrator.transform(logits)),
        "conformal sets (Mondrian, crepes)": best_of(lambda: kit.conformal.predict(kit.calibrator.transform(logits))),
        "OOD score (10-NN to <= 5,000 training cells)": best_of(lambda: kit.detector.score_cells(embeddings)),
        "all of TrustKit.apply": best_of(lambda: kit.apply(logits, embeddings)),
    }
    per_10k = {name: round(value * 10_000 / args.cells, 4) for name, value in seconds.items()}
    print(json.dumps({"benchmark": "trust", "cells": args.cells, "train_cells": args.train_cells,
                      "embedding_dim": int(embeddings.shape[1]), "seconds_per_10k_cells": per_10k,
                      "trust_overhead_vs_head": round(seconds["all of TrustKit.apply"]
                                                      / seconds["head (embed in the head's basis + MLP)"], 3),
                      "load_average": os.getloadavg()[0]}, indent=1))


if __name__ == "__main__":
    main()
