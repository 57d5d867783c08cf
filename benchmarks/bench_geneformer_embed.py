"""Benchmark Geneformer embeddings at the full published V1 size (Geneformer-V1-10M), random weights.

Simulated negative-binomial counts over real Ensembl ids of the V1 dictionary are tokenized, then embedded
three ways with the same weights:

* ``scdrugmap``: `GeneformerEncoder.embed_tokens`: batches bucketed by length (longest first), SDPA
  attention, ``torch.inference_mode``, and only the layers up to the pooled one (the penultimate);
* ``official``: what the official ``EmbExtractor`` runs (``emb_extractor.py``, ``perturber_utils.py`` at
  05fcbeb; ../shared/golden/geneformer/README.md): ``BertForMaskedLM`` with ``output_hidden_states=True``
  and the attention transformers picks by default (SDPA), cells sorted by length (longest first), batches
  right-padded to their longest cell, a full forward under ``torch.no_grad`` (every layer and the
  masked-LM head's logits) and the mean over non-padding positions of ``hidden_states[n_layers - 1]``;
* ``plain HF``: ``transformers.BertModel`` (no masked-LM head) with eager attention, batches in data order
  right-padded to their longest cell, ``output_hidden_states=True``, the same mean: a plain-HF reference
  cheaper than the official path.

All must give the same embeddings (max abs differences printed); the speed-up is printed against both.
FLOPs are counted analytically
(`scdrugmap.models.geneformer.forward_flops`): "useful" FLOPs are those of the unpadded cells through the
layers the embedding needs; they are divided by each method's time. A float32 matmul measured in the
same run gives the machine's peak.

Usage::

    python benchmarks/bench_geneformer_embed.py --cells 1000
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
DEFAULT_VOCAB = REPO.parent / "shared" / "vocab" / "geneformer_v1"


def simulate_counts(n_cells: int, genes: np.ndarray, mean_genes: float, seed: int):
    """Return an AnnData of NB counts with ~mean_genes expressed genes per cell (log-normal depth)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    detect = rng.beta(0.6, 0.6 * (genes.size / mean_genes - 1), genes.size)
    depth = rng.lognormal(0.0, 0.45, n_cells)
    expressed = rng.random((n_cells, genes.size)) < np.minimum(detect[None, :] * depth[:, None], 1)
    counts = np.where(expressed, 1 + rng.negative_binomial(1.5, 0.4, expressed.shape), 0).astype(np.float32)
    obs = pd.DataFrame({"n_counts": counts.sum(1).astype(np.int64)}, index=[f"cell{i}" for i in range(n_cells)])
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame({"ensembl_id": genes}, index=genes))




def plain_hf_embed(bert, tokens, batch_size: int, pad_id: int, *, sort: bool = False) -> tuple[np.ndarray, float]:
    """A Hugging Face forward per padded batch, all hidden states, mean of ``hidden_states[-2]`` over the cell.

    ``sort``: batch the cells longest first, as ``EmbExtractor`` does (``downsample_and_sort``), else in
    data order; either way the rows come back in data order.
    """
    flat, offsets = tokens.arrays["input_ids"], tokens.arrays["offsets"]
    out = np.empty((tokens.n_cells, bert.config.hidden_size), dtype=np.float32)
    order = np.arange(tokens.n_cells)
    if sort:
        order = np.argsort(-(offsets[1:] - offsets[:-1]), kind="stable")
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, tokens.n_cells, batch_size):
            rows = order[first:first + batch_size]
            lengths = offsets[rows + 1] - offsets[rows]
            width = int(lengths.max())
            ids = np.full((rows.size, width), pad_id, dtype=np.int64)
            mask = np.arange(width)[None, :] < lengths[:, None]
            ids[mask] = np.concatenate([flat[offsets[r]:offsets[r + 1]] for r in rows])
            attention = torch.from_numpy(mask.astype(np.int64))
            hidden = bert(input_ids=torch.from_numpy(ids), attention_mask=attention,
                          output_hidden_states=True).hidden_states[-2]
            weights = attention.to(hidden.dtype)
            out[rows] = ((hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)).numpy()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--genes", type=int, default=20_000, help="genes in the simulated matrix")
    parser.add_argument("--mean-genes", type=float, default=1_200, help="mean expressed genes per cell")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--baseline-cells", type=int, default=None, help="cells for the plain HF run (default all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import BertForMaskedLM, BertModel

    from scdrugmap.models.geneformer import (
        PUBLISHED_CONFIGS,
        GeneformerEncoder,
        build_geneformer_model,
        forward_flops,
    )
    from scdrugmap.models.geneformer_tokenizer import GeneformerTokenizer, GeneformerVocabulary

    vocabulary = GeneformerVocabulary.from_files(args.vocab / "geneformer_token_dictionary.pkl",
                                                 args.vocab / "geneformer_gene_median_dictionary.pkl", None,
                                                 version="V1")
    rng = np.random.default_rng(args.seed)
    genes = rng.choice(np.array(sorted(g for g in vocabulary.token_ids if g.startswith("ENSG"))), args.genes,
                       replace=False)
    adata = simulate_counts(args.cells, genes, args.mean_genes, args.seed)
    config = PUBLISHED_CONFIGS["Geneformer-V1-10M"]
    torch.manual_seed(args.seed)
    module = build_geneformer_model(config)
    encoder = GeneformerEncoder(module, GeneformerTokenizer(vocabulary))
    tokens = encoder.tokenize(adata)
    lengths = tokens.lengths
    peak = matmul_peak()

    encoder.embed_tokens(tokens.__class__(cell_index=tokens.cell_index[:2], lengths=lengths[:2],
                                          arrays={"input_ids": tokens.arrays["input_ids"],
                                                  "offsets": tokens.arrays["offsets"][:3]}), batch_size=2)
    start = time.perf_counter()
    ours = encoder.embed_tokens(tokens, batch_size=args.batch_size)
    ours_s = time.perf_counter() - start
    n_run = module.n_layers_run
    useful = forward_flops(config, lengths, n_layers=n_run)

    n_base = min(args.baseline_cells or tokens.n_cells, tokens.n_cells)
    bert = BertModel(config.to_transformers("eager"), add_pooling_layer=False).eval()
    bert.load_state_dict(module.bert.state_dict())
    base_tokens = tokens.__class__(cell_index=tokens.cell_index[:n_base], lengths=lengths[:n_base],
                                   arrays={"input_ids": tokens.arrays["input_ids"],
                                           "offsets": tokens.arrays["offsets"][:n_base + 1]})
    baseline, base_s = plain_hf_embed(bert, base_tokens, args.batch_size, pad_id=0)
    masked_lm = BertForMaskedLM(config.to_transformers("sdpa")).eval()  # the official load picks SDPA
    missing, unexpected = masked_lm.bert.load_state_dict(module.bert.state_dict(), strict=False)
    if unexpected or any("pooler" not in key for key in missing):
        raise SystemExit(f"BertForMaskedLM.bert does not take the encoder's weights: {missing} {unexpected}")
    masked_lm.config.output_hidden_states = True  # BertForMaskedLM.from_pretrained(..., output_hidden_states=True)
    official, official_s = plain_hf_embed(masked_lm, base_tokens, args.batch_size, pad_id=0, sort=True)
    base_useful = forward_flops(config, lengths[:n_base], n_layers=n_run)
    padded = [int(lengths[i:i + args.batch_size].max()) * min(args.batch_size, n_base - i)
              for i in range(0, n_base, args.batch_size)]
    report = {
        "model": "Geneformer-V1-10M (6 layers, hidden 256, 4 heads, 2048 tokens), random weights",
        "cells": int(tokens.n_cells), "mean_length": float(lengths.mean()), "min_length": int(lengths.min()),
        "max_length": int(lengths.max()), "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "matmul_peak_gflops": peak,
        "scdrugmap": {"seconds": ours_s, "cells_per_s": tokens.n_cells / ours_s,
                      "useful_gflops": useful / ours_s / 1e9, "layers_run": n_run},
        "plain_hf_eager": {"cells": n_base, "seconds": base_s, "cells_per_s": n_base / base_s,
                           "useful_gflops": base_useful / base_s / 1e9,
                           "padding_fraction": 1 - float(lengths[:n_base].sum()) / sum(padded),
                           "layers_run": config.num_hidden_layers},
        "official_bert_for_masked_lm": {"cells": n_base, "seconds": official_s, "cells_per_s": n_base / official_s,
                                        "useful_gflops": base_useful / official_s / 1e9,
                                        "attention": masked_lm.config._attn_implementation,
                                        "layers_run": config.num_hidden_layers, "masked_lm_head": True},
        "max_abs_diff": float(np.abs(ours[:n_base] - baseline).max()),
        "max_abs_diff_official": float(np.abs(ours[:n_base] - official).max()),
    }
    report["speedup_vs_bert_model"] = report["scdrugmap"]["cells_per_s"] / report["plain_hf_eager"]["cells_per_s"]
    report["speedup_vs_official_bert_for_masked_lm"] = (report["scdrugmap"]["cells_per_s"]
                                                        / report["official_bert_for_masked_lm"]["cells_per_s"])
    print(json.dumps(report, indent=1))
    print(f"\n{'method':<44}{'cells/s':>10}{'useful GFLOP/s':>16}{'% of matmul peak':>18}")
    for name, key in (("scdrugmap (bucketed SDPA)", "scdrugmap"),
                      ("official: BertForMaskedLM, sorted, SDPA", "official_bert_for_masked_lm"),
                      ("plain HF: BertModel, data order, eager", "plain_hf_eager")):
        entry = report[key]
        print(f"{name:<44}{entry['cells_per_s']:>10.2f}{entry['useful_gflops']:>16.1f}"
              f"{100 * entry['useful_gflops'] / peak:>17.0f}%")
    print(f"matmul peak {peak:.1f} GFLOP/s; speed-up {report['speedup_vs_official_bert_for_masked_lm']:.2f}x vs the "
          f"official BertForMaskedLM path, {report['speedup_vs_bert_model']:.2f}x vs BertModel; max |diff| "
          f"{report['max_abs_diff_official']:.2e} and {report['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
