"""Benchmark the cost of per-gene attribution per cell: an hvg head, and every token model.

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
* ``golden``: every token model (the eight scFMs, MiniLM, a tiny Llama) on its golden tiny checkpoint and
  golden cells (the cases of ``tests/token_model_cases.py``; UCE with its official 1,024 sampled genes a cell
  but without the data-set-wide gene filter, which a sample of a few cells would empty), a smooth head on its
  embeddings, then `attribute_tokens` with the default 20 steps and `measure_deletion_effects` of a few genes
  (one gene per call for the models whose cells see each other, as `sdm.tl.biomarkers` runs it).
* ``full``: the same measures at the full published size, random weights: tGPT (transcriptome-gpt-1024-8-16-64,
  official tokenizer), scGPT (whole-human, official vocabulary), CellPLM (20230926_85M config) and MiniLM (the
  real all-MiniLM-L6-v2), on simulated counts as their embedding benchmarks. UCE, scFoundation, scBERT and
  CellLM are not run at full size on a CPU: a forward pass of one cell is 170-340 GFLOP (1,075 to 16,907
  tokens), so 20 IG steps (a forward and a backward each) take tens of minutes per cell there.

Everything on the CPU. Prints one JSON object: seconds per cell for each method, tokens per cell, the largest
completeness error of IG (relative to the largest change from the baseline), torch threads and the load
average (the machine is shared: read the figures with it), then a table of the token models.

Recorded (``--sections golden,full,geneformer``, defaults: 20 IG steps, 5 genes deleted; CPU, 2 cores shared
with other work, load average 7-8.6, torch 2 threads; seconds per cell, deletion per cell and gene;
completeness = largest |sum of attributions - (P(cell) - P(baseline))| / largest |P(cell) - P(baseline)|)::

    model         size                     tokens  forward  IG (20 steps)  completeness  deletion
    geneformer    golden                      195    0.060          1.51         0.014      0.079
    tgpt          golden                       61    0.053          1.43         2e-06      0.005
    scgpt         golden                       69    0.003          0.41         0.012      0.014
    scfoundation  golden                       73    0.017          0.49         0.023      0.016
    uce           golden                     1075    0.113          1.83         0.087      0.043
    scbert        golden                      101    0.005          0.35         3e-05      0.016
    celllm        golden                       41    0.010          0.29         6e-05      0.007
    cellplm       golden                       73    0.0004         1.95         0.062      0.007
    minilm        published, real weights     166    0.280         11.0          1.23       0.171
    llm           golden (tiny Llama)          64    0.002          0.12         0.002      0.003
    geneformer    V1-10M, random weights     1462    2.27         60.9         (1e-6 abs)  2.27
    tgpt          published, random weights    64    1.78         28.2         0.002      1.01
    scgpt         published, random weights  1200    3.61        134           1.54       3.62
    cellplm       published, random weights   808    0.448        21.7         0.023      0.125
    minilm        published, real weights     256    0.712        12.6          1.53       0.476

IG costs about 3 x 20 forward passes a cell (a forward and a backward per step), CellPLM one pass of all the
cells attributed together per cell and step. The large completeness errors (MiniLM, full-size scGPT) come from
the head saturating: the baseline input (every gene token padded) sits far from the cells, so P(baseline) is
~0 and P changes in a narrow stretch of the path; with 64 steps MiniLM's errors fell from 0.97 and 0.15 to
0.047 and 0.004 (changes 0.32 and 0.13). `attribute_tokens` warns when the error is over 5% of the change.

Usage::

    python benchmarks/bench_attribution.py --hvg-cells 500 --geneformer-cells 4
    python benchmarks/bench_attribution.py --sections golden,full --golden-cells 8 --full-cells 2
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
SHARED = REPO.parent / "shared"
DEFAULT_VOCAB = SHARED / "vocab" / "geneformer_v1"
#: Token models at golden size, and those run at the full published size on a CPU.
GOLDEN_MODELS = ("geneformer", "tgpt", "scgpt", "scfoundation", "uce", "scbert", "celllm", "cellplm", "minilm", "llm")
FULL_MODELS = ("tgpt", "scgpt", "cellplm", "minilm")


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


def standardised_head(embeddings: np.ndarray):
    """Return sigmoid(z-scored embeddings . w), w random: a smooth head whose P varies across these cells."""
    values = torch.as_tensor(embeddings[np.isfinite(embeddings).all(axis=1)], dtype=torch.float32)
    mean, scale = values.mean(dim=0), values.std(dim=0) + 1e-8
    weights = torch.randn(values.shape[1], generator=torch.Generator().manual_seed(0)) * 2 / values.shape[1] ** 0.5
    return lambda x: torch.sigmoid(((x - mean) / scale) @ weights)


def token_costs(encoder, adata, *, n_steps: int, deleted_genes: int, label: str) -> dict:
    """Return one row: tokens a cell, forward, IG and deletion seconds per cell, IG's completeness error."""
    from scdrugmap.explain.attribution import attribute_tokens, measure_deletion_effects

    encoder.embed(adata[: min(2, adata.n_obs)].copy())  # warm-up
    started = time.perf_counter()
    embeddings = encoder.embed(adata)
    forward_s = (time.perf_counter() - started) / adata.n_obs
    head = standardised_head(embeddings)
    tokens = encoder.tokenize(adata)
    started = time.perf_counter()
    result = attribute_tokens(encoder, adata, head=head, n_steps=n_steps, max_cells=None)
    ig_s = time.perf_counter() - started
    change = np.abs(result.probability - result.baseline_probability).max()

    def predict(cells):
        with torch.no_grad():
            return head(torch.as_tensor(encoder.embed(cells))).numpy()

    started = time.perf_counter()
    deleted = measure_deletion_effects(adata, predict, max_genes=deleted_genes, max_cells=None,
                                       genes_per_call=None if encoder.shardable else 1)
    deletion_s = time.perf_counter() - started
    n = tokens.n_cells
    return {"model": encoder.name, "size": label, "parameters": int(sum(p.numel() for p in encoder.module.parameters())),
            "cells": n, "mean_tokens": round(float(tokens.lengths.mean()), 1),
            "forward_s_per_cell": round(forward_s, 4), "ig_steps": n_steps, "ig_s_per_cell": round(ig_s / n, 3),
            "ig_completeness_error": float(np.abs(result.convergence_delta).max() / change) if change > 0 else None,
            "deleted_genes": int(len(deleted)),
            "deletion_s_per_cell_and_gene": round(deletion_s / (n * max(1, len(deleted))), 4),
            "genes_per_deletion_call": None if encoder.shardable else 1}


def bench_golden(models: list[str], n_cells: int, n_steps: int, deleted_genes: int) -> list[dict]:
    import sys
    import tempfile

    sys.path.insert(0, str(REPO / "tests"))
    from tests_helpers import shared_path
    from token_model_cases import attribution_case

    rows = []
    for name in models:
        case = attribution_case(name, shared_path, Path(tempfile.mkdtemp()))
        # the models' own sizes: UCE's official 1,024 genes a sentence (without the data-set-wide gene filter, see
        # the docstring), MiniLM's full sentences
        case.options = {**case.options, **{"uce": {"sample_size": 1024}, "minilm": {"top_n_genes": None}}.get(name, {})}
        encoder = case.load()
        rows.append(token_costs(encoder, case.adata[:n_cells].copy(), n_steps=n_steps, deleted_genes=deleted_genes,
                                label="golden"))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def full_size_encoder(name: str, n_cells: int, seed: int):
    """Return (encoder with random weights at the published size, simulated cells) as the model's own benchmark."""
    torch.manual_seed(seed)
    if name == "tgpt":
        from bench_tgpt import DEFAULT_TOKENIZER
        from bench_tgpt import simulate_counts as tgpt_counts

        from scdrugmap.models.tgpt import TGPTConfig, TGPTEncoder, TGPTTokenizer, build_tgpt_model

        tokenizer = TGPTTokenizer(DEFAULT_TOKENIZER)
        symbols = np.array([t for t in tokenizer.tokenizer.get_vocab() if not t.startswith("<") and t != "</b>"
                            and t != "</s>"])
        symbols = np.random.default_rng(seed).choice(symbols, 15_000, replace=False)
        return TGPTEncoder(build_tgpt_model(TGPTConfig()), tokenizer), tgpt_counts(n_cells, symbols, 1_500, seed)
    if name == "scgpt":
        from bench_scgpt import DEFAULT_VOCAB as SCGPT_VOCAB
        from bench_scgpt import simulate_counts as scgpt_counts

        from scdrugmap.models.scgpt import ScGPTConfig, ScGPTEncoder, ScGPTModel, load_vocab

        vocab = load_vocab(SCGPT_VOCAB)
        config = ScGPTConfig(ntoken=len(vocab), pad_token_id=vocab["<pad>"], cls_token_id=vocab["<cls>"])
        return ScGPTEncoder(ScGPTModel(config).eval(), vocab), scgpt_counts(vocab, n_cells, 5_000, seed)
    if name == "cellplm":
        from bench_cellplm import DEFAULT_CONFIG
        from bench_cellplm import simulate_counts as cellplm_counts

        from scdrugmap.models.cellplm import CellPLMConfig, CellPLMEncoder, CellPLMModel

        config = CellPLMConfig.from_official(DEFAULT_CONFIG)
        return CellPLMEncoder(CellPLMModel(config).eval()), cellplm_counts(config.gene_list, n_cells, 2_000, seed)
    if name == "minilm":
        from bench_llm import simulate_counts as llm_counts

        from scdrugmap.models.llm import MiniLMEncoder
        from scdrugmap.models.scgpt import load_vocab

        symbols = [g for g in load_vocab(SHARED / "vocab" / "scgpt" / "vocab.json") if not g.startswith("<")]
        return MiniLMEncoder.from_pretrained(None), llm_counts(symbols, n_cells, 5_000, seed)
    msg = f"no full-size case for {name}; choose from {FULL_MODELS}"
    raise SystemExit(msg)


def bench_full_size(models: list[str], n_cells: int, n_steps: int, deleted_genes: int, seed: int) -> list[dict]:
    rows = []
    for name in models:
        encoder, adata = full_size_encoder(name, n_cells, seed)
        adata.obs_names = [f"cell{i}" for i in range(adata.n_obs)]
        label = "published (real weights)" if name == "minilm" else "published (random weights)"
        rows.append(token_costs(encoder, adata, n_steps=n_steps, deleted_genes=deleted_genes, label=label))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def print_token_table(rows: list[dict]) -> None:
    columns = ("model", "size", "parameters", "cells", "mean_tokens", "forward_s_per_cell", "ig_s_per_cell",
               "ig_completeness_error", "deletion_s_per_cell_and_gene")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        shown = [f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print("| " + " | ".join(shown) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="hvg,geneformer,golden,full",
                        help="comma-separated: hvg, geneformer, golden, full")
    parser.add_argument("--hvg-cells", type=int, default=500)
    parser.add_argument("--hvg-steps", type=int, default=50)
    parser.add_argument("--deleted-genes", type=int, default=20)
    parser.add_argument("--geneformer-cells", type=int, default=4)
    parser.add_argument("--geneformer-steps", type=int, default=20)
    parser.add_argument("--internal-batch-size", type=int, default=4, help="IG sequences per forward/backward")
    parser.add_argument("--golden-models", default=",".join(GOLDEN_MODELS))
    parser.add_argument("--golden-cells", type=int, default=8)
    parser.add_argument("--full-models", default=",".join(FULL_MODELS))
    parser.add_argument("--full-cells", type=int, default=2)
    parser.add_argument("--token-steps", type=int, default=20, help="IG steps of the golden and full rows")
    parser.add_argument("--token-deleted-genes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    report: dict = {"device": "cpu", "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "load_average_start": round(os.getloadavg()[0], 2)}
    if "hvg" in sections:
        report["hvg"] = bench_hvg(args.hvg_cells, args.hvg_steps, args.deleted_genes, args.seed)
    if "geneformer" in sections:
        report["geneformer"] = bench_geneformer(args.geneformer_cells, args.geneformer_steps, args.vocab, args.seed,
                                                args.internal_batch_size)
    rows = []
    if "golden" in sections:
        rows += bench_golden(args.golden_models.split(","), args.golden_cells, args.token_steps,
                             args.token_deleted_genes)
    if "full" in sections:
        rows += bench_full_size(args.full_models.split(","), args.full_cells, args.token_steps,
                                args.token_deleted_genes, args.seed)
    report["token_models"] = rows
    report["load_average_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=2))
    if rows:
        print_token_table(rows)


if __name__ == "__main__":
    main()
