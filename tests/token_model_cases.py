"""Every token model as a small attribution case: golden weights, a few cells, a smooth head scaled to the data.

The cases are those of ``tests/models/model_cases.py`` (the eight foundation models on ../shared/golden, MiniLM,
a tiny random Llama), with two options that only make them faster (`FAST_OPTIONS`), and 40 cells for the
language models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from models.model_cases import GOLDEN_MODELS, ModelCase, model_case
from tests_helpers import make_adata

#: Every registered model that `attribute_tokens` reads.
TOKEN_MODELS = (*GOLDEN_MODELS, "minilm", "llm")
#: Options that keep the cases small: UCE's golden sentences are 1,024 sampled genes (~1,075 tokens), and its
#: official gene filter (a gene in at least 10 of the cells given) leaves nothing in a sample of 4 cells; MiniLM
#: would read ~250 tokens of 75 genes.
FAST_OPTIONS: dict[str, dict[str, Any]] = {"uce": {"filter": False, "sample_size": 64}, "minilm": {"top_n_genes": 16}}


def attribution_case(name: str, shared: Any, tmp_path: Path) -> ModelCase:
    """Return the model case of ``name`` with `FAST_OPTIONS`."""
    case = model_case(name, shared, tmp_path)
    case.options = {**case.options, **FAST_OPTIONS.get(name, {})}
    if name not in GOLDEN_MODELS:  # the language models read the tiny AnnData of the tests: 40 cells, not 12
        case.adata = make_adata(n_cells=40)
    return case


def standardised_head(embeddings: np.ndarray, seed: int = 0):
    """Return a smooth head, sigmoid(z-scored embeddings . w), w random with the given seed.

    Standardising by the embeddings of the case's cells makes P(sensitive) vary across cells for every model
    (random golden weights give embeddings that differ little from cell to cell), and a head without ReLU keeps
    the integrand of integrated gradients smooth, so completeness is limited only by the model's own kinks.
    """
    import torch

    values = torch.as_tensor(embeddings[np.isfinite(embeddings).all(axis=1)], dtype=torch.float32)
    mean, scale = values.mean(dim=0), values.std(dim=0) + 1e-8
    weights = torch.randn(values.shape[1], generator=torch.Generator().manual_seed(seed)) * 2 / values.shape[1] ** 0.5
    return lambda x: torch.sigmoid(((x - mean) / scale) @ weights)
