"""LoRA fine-tuning: low-rank adapters on a foundation model plus the MLP head, trained end to end.

Adapters go on the encoder's ``lora_targets`` (the scDrugMap paper's choice per model)
with r=8, alpha=8, dropout 0.05. Each fold gets a fresh copy of the network, so no
fold learns from another's test cells. The trained adapters and head are saved as
a bundle of safetensors + JSON, reloadable without pickle.
"""

from __future__ import annotations

import copy
import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from scdrugmap.errors import CheckpointError, ConfigError
from scdrugmap.train.heads import make_mlp
from scdrugmap.train.validation import inner_validation_split

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy.typing as npt
    import torch

    from scdrugmap.models.base import TokenizedCells, TorchEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA settings (defaults: the scDrugMap paper's r=8, alpha=8, dropout 0.05)."""

    r: int = 8
    alpha: int = 8
    dropout: float = 0.05
    learning_rate: float = 1e-4
    batch_size: int = 16
    epochs: int = 5
    patience: int = 2
    val_fraction: float = 0.1
    hidden: int = 512
    seed: int = 0


def add_adapters(module: torch.nn.Module, targets: tuple[str, ...], config: LoRAConfig,
                 options: dict[str, Any] | None = None) -> torch.nn.Module:
    """Inject LoRA adapters into ``module`` (in place) on modules named ``targets``; freeze the rest.

    Raises
    ------
    ConfigError
        When no module of the network matches the targets (adapters would silently do nothing).
    """
    from peft import LoraConfig, inject_adapter_in_model

    if not targets:
        msg = "this model declares no LoRA target modules; LoRA does not apply to it."
        raise ConfigError(msg)
    names = {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        msg = f"LoRA targets {missing} are not modules of this network; modules named: {sorted(names)[:20]}."
        raise ConfigError(msg)
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=list(targets),
                      **(options or {}))
    module = inject_adapter_in_model(lora, module)
    for name, parameter in module.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return module


@contextmanager
def using_module(encoder: TorchEncoder, module: torch.nn.Module) -> Iterator[TorchEncoder]:
    """Run ``encoder`` with another network (an adapted copy) for the duration of the block."""
    original = encoder.module
    encoder.module = module
    try:
        yield encoder
    finally:
        encoder.module = original


def adapter_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the LoRA parameters of ``module`` (a copy)."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if "lora_" in name}


@dataclass
class LoRAFit:
    """A fine-tuned fold: the adapted network, the head, and training facts."""

    module: Any
    head: Any
    info: dict[str, Any]


def _batch_logits(encoder: TorchEncoder, head: torch.nn.Module, tokens: TokenizedCells,
                  rows: npt.NDArray[np.int64]) -> torch.Tensor:
    batch = encoder.collate(tokens, rows)
    batch = {k: v.to(encoder.device) if hasattr(v, "to") else v for k, v in batch.items()}
    return head(encoder.encode(batch)).reshape(-1)


def fine_tune(encoder: TorchEncoder, tokens: TokenizedCells, labels: npt.NDArray, fit_rows: npt.NDArray[np.int64],
              val_rows: npt.NDArray[np.int64], config: LoRAConfig | None = None) -> LoRAFit:
    """Fine-tune adapters + head on token positions ``fit_rows``, early-stopping on ``val_rows``.

    ``labels`` are per token position (1 = sensitive).
    """
    import torch
    import torch.nn.functional as F

    config = config or LoRAConfig()
    torch.manual_seed(config.seed)
    module = add_adapters(copy.deepcopy(encoder.module), encoder.lora_targets, config, dict(encoder.lora_options))
    head = make_mlp(encoder.embedding_dim, config.hidden).to(encoder.device)
    trainable = [p for p in module.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate)
    y = torch.as_tensor(labels, dtype=torch.float32)
    rng = np.random.default_rng(config.seed)
    best = (math.inf, adapter_state(module), copy.deepcopy(head.state_dict()), 0)
    waited, epochs_run = 0, 0
    with using_module(encoder, module):
        for epoch in range(config.epochs):
            module.train()
            head.train()
            order = rng.permutation(fit_rows)
            for start in range(0, order.size, config.batch_size):
                rows = order[start : start + config.batch_size]
                logits = _batch_logits(encoder, head, tokens, rows)
                loss = F.binary_cross_entropy_with_logits(logits, y[rows].to(logits.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            epochs_run = epoch + 1
            if val_rows.size == 0:
                best = (math.nan, adapter_state(module), copy.deepcopy(head.state_dict()), epoch + 1)
                continue
            val_logits = predict_logits(encoder, head, tokens, val_rows, config.batch_size)
            val_loss = float(F.binary_cross_entropy_with_logits(val_logits, y[val_rows]))
            if val_loss < best[0]:
                best, waited = (val_loss, adapter_state(module), copy.deepcopy(head.state_dict()), epoch + 1), 0
            else:
                waited += 1
                if waited >= config.patience:
                    break
    with torch.no_grad():
        parameters = dict(module.named_parameters())
        for name, value in best[1].items():
            parameters[name].copy_(value)
    head.load_state_dict(best[2])
    return LoRAFit(module, head, {"best_epoch": best[3], "epochs_run": epochs_run, "val_loss": best[0],
                                  "n_fit": int(fit_rows.size), "n_val": int(val_rows.size),
                                  "trainable_parameters": int(sum(p.numel() for p in trainable))})


def predict_logits(encoder: TorchEncoder, head: torch.nn.Module, tokens: TokenizedCells,
                   rows: npt.NDArray[np.int64], batch_size: int = 32) -> torch.Tensor:
    """Return head logits for token positions ``rows`` (in the given order), without gradients."""
    import torch

    encoder.module.eval()
    head.eval()
    out = torch.empty(rows.size)
    with torch.inference_mode():
        for start in range(0, rows.size, batch_size):
            chunk = rows[start : start + batch_size]
            out[start : start + chunk.size] = _batch_logits(encoder, head, tokens, chunk).float().cpu()
    return out


def fit_predict_lora(encoder: TorchEncoder, tokens: TokenizedCells, labels: npt.NDArray, groups: npt.NDArray | None,
                     folds: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]],
                     config: LoRAConfig | None = None) -> list[tuple[npt.NDArray[np.float32], dict[str, Any]]]:
    """Fine-tune one adapted copy per (train, test) fold of token positions; return test probabilities."""
    import torch

    config = config or LoRAConfig()
    results = []
    for train, test in folds:
        fit, val = inner_validation_split(labels[train], None if groups is None else groups[train],
                                          fraction=config.val_fraction, seed=config.seed)
        fitted = fine_tune(encoder, tokens, labels, train[fit], train[val], config)
        with using_module(encoder, fitted.module):
            probability = torch.sigmoid(predict_logits(encoder, fitted.head, tokens, test, config.batch_size))
        results.append((probability.numpy().astype(np.float32), fitted.info))
    return results


# --- bundles ------------------------------------------------------------------------------------------------

def load_lora_bundle(encoder: TorchEncoder, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.nn.Module:
    """Put a saved bundle's adapters into ``encoder`` (in place) and return its head.

    Raises
    ------
    CheckpointError
        When an adapter of the bundle has no place in the network, or one is missing.
    """
    import torch

    settings = {k: v for k, v in meta.get("lora", {}).items() if k in LoRAConfig.__dataclass_fields__}
    config = LoRAConfig(**settings)
    encoder.module = add_adapters(encoder.module, encoder.lora_targets, config, dict(encoder.lora_options))
    parameters = dict(encoder.module.named_parameters())
    adapters = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
    expected = {name for name in parameters if "lora_" in name}
    if set(adapters) != expected:
        msg = (f"the bundle's adapters do not fit {encoder.name}: missing {sorted(expected - set(adapters))[:5]}, "
               f"unexpected {sorted(set(adapters) - expected)[:5]}. Was it trained for another model or variant?")
        raise CheckpointError(msg)
    with torch.no_grad():
        for name, value in adapters.items():
            parameters[name].copy_(value)
    head = make_mlp(encoder.embedding_dim, config.hidden)
    head.load_state_dict({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})
    return head


def lora_config_dict(config: LoRAConfig) -> dict[str, Any]:
    return asdict(config)
