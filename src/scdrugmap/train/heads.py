"""Classification heads on cell embeddings: the paper's MLP, logistic regression, and the class prior.

The MLP is the scDrugMap paper's head: Linear(d->512), ReLU, Linear(512->512), ReLU,
Linear(512->1), sigmoid, BCE, AdamW lr 1e-4, batch 128, 10 epochs, here with early
stopping on an inner validation split. `fit_mlp_heads` trains the heads of many
folds at once as one batched network (AdamW is elementwise, so each fold's head
is exactly what training it alone gives); that turns many small matrix products
into a few large ones.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt
    import torch

log = logging.getLogger(__name__)

HeadKind = Literal["mlp", "logistic"]


@dataclass(frozen=True)
class HeadConfig:
    """Training settings of the MLP head (defaults: the scDrugMap paper)."""

    hidden: int = 512
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 128
    epochs: int = 10
    patience: int = 3
    val_fraction: float = 0.1
    seed: int = 0


def _uniform(generator: torch.Generator, shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    import torch

    bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


class BatchedMLP:
    """``n_heads`` independent MLP heads stored as stacked weights (heads x in x out).

    Initialised like ``nn.Linear`` (uniform within 1/sqrt(fan_in)).
    """

    def __init__(self, n_heads: int, in_dim: int, hidden: int = 512, seed: int = 0, device: str = "cpu") -> None:
        import torch

        generator = torch.Generator().manual_seed(seed)
        shapes = [(in_dim, hidden), (hidden, hidden), (hidden, 1)]
        self.params: list[torch.Tensor] = []
        for fan_in, fan_out in shapes:
            self.params.append(_uniform(generator, (n_heads, fan_in, fan_out), fan_in).to(device).requires_grad_())
            self.params.append(_uniform(generator, (n_heads, 1, fan_out), fan_in).to(device).requires_grad_())
        self.in_dim, self.hidden, self.n_heads = in_dim, hidden, n_heads

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Map (heads x cells x in) to (heads x cells) logits."""
        import torch

        w1, b1, w2, b2, w3, b3 = self.params
        h = torch.relu(torch.baddbmm(b1, x, w1))
        h = torch.relu(torch.baddbmm(b2, h, w2))
        return torch.baddbmm(b3, h, w3).squeeze(-1)

    def head_state(self, index: int) -> dict[str, torch.Tensor]:
        """Return head ``index`` as an ``nn.Sequential``-style state dict (0/2/4 layers)."""
        w1, b1, w2, b2, w3, b3 = (p.detach()[index].cpu() for p in self.params)
        return {"0.weight": w1.T.contiguous(), "0.bias": b1[0], "2.weight": w2.T.contiguous(), "2.bias": b2[0],
                "4.weight": w3.T.contiguous(), "4.bias": b3[0]}


class RowsOnDisk:
    """Cells' embeddings read from a file by rows as training asks for them, instead of held in memory.

    ``source`` is indexed with an array of cell positions and returns those rows (float32), as
    `scdrugmap.models.cache.EmbeddingFile` does; indexing this with a tensor of positions (any shape)
    returns a tensor of their rows on ``device``, as indexing an in-memory tensor would.
    """

    def __init__(self, source: Any, device: str | torch.device = "cpu") -> None:
        import torch

        self.source, self.device = source, torch.device(device)
        self.shape = tuple(source.shape)
        self.dtype = torch.float32

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        import torch

        rows = torch.from_numpy(np.asarray(self.source[index.reshape(-1).cpu().numpy()], dtype=np.float32))
        return rows.reshape(*index.shape, self.shape[1]).to(self.device)


#: Cells per matrix product when validating and predicting (8,192 x 2,000 hvg values: 65 MB).
CHUNK = 8192


def mlp_flops_per_cell(in_dim: int, hidden: int = 512) -> int:
    """Forward FLOPs of the MLP head for one cell (multiply-adds count 2)."""
    return 2 * (in_dim * hidden + hidden * hidden + hidden)


def fit_mlp_heads(X: torch.Tensor | RowsOnDisk, y: torch.Tensor, fits: list[tuple[np.ndarray, np.ndarray]],
                  config: HeadConfig | None = None) -> tuple[BatchedMLP, list[dict[str, Any]]]:
    """Train one MLP head per (fit positions, validation positions) pair, all at once.

    Parameters
    ----------
    X, y
        All cells' embeddings (float32) and labels (float32 0/1), on the training device; the
        embeddings may stay on disk (`RowsOnDisk`: each step reads its batch's rows).
    fits
        Per head, the positions to fit on and the positions to validate on (may be empty).
    config
        Training settings.

    Returns
    -------
    The trained heads, each restored to its epoch of lowest validation loss, and per head
    a record (``best_epoch``, ``epochs_run``, ``val_loss``).
    """
    import torch
    import torch.nn.functional as F

    config = config or HeadConfig()
    n_heads = len(fits)
    device = X.device
    model = BatchedMLP(n_heads, X.shape[1], config.hidden, seed=config.seed, device=str(device))
    # fused: one kernel for all heads (10x faster than the per-tensor loop on CPU at 10 x 525k parameters)
    optimizer = torch.optim.AdamW(model.params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
    generator = torch.Generator().manual_seed(config.seed)
    fit_sets = [torch.as_tensor(fit, dtype=torch.long) for fit, _ in fits]
    val_sets = [torch.as_tensor(val, dtype=torch.long, device=device) for _, val in fits]
    steps = max(1, math.ceil(max(f.numel() for f in fit_sets) / config.batch_size))
    best_loss = torch.full((n_heads,), float("inf"))
    best_params = [p.detach().clone() for p in model.params]
    records = [{"best_epoch": 0, "epochs_run": 0, "val_loss": float("nan")} for _ in fits]
    active = torch.ones(n_heads, dtype=torch.bool)
    waited = torch.zeros(n_heads, dtype=torch.long)
    for epoch in range(config.epochs):
        order = torch.stack([
            f[torch.randperm(f.numel(), generator=generator)].repeat(math.ceil(steps * config.batch_size / f.numel()))[
                : steps * config.batch_size] for f in fit_sets
        ]).to(device)
        weight = active.to(device=device, dtype=X.dtype)
        for step in range(steps):
            batch = order[:, step * config.batch_size : (step + 1) * config.batch_size]
            logits = model.logits(X[batch])
            per_head = F.binary_cross_entropy_with_logits(logits, y[batch], reduction="none").mean(dim=1)
            optimizer.zero_grad(set_to_none=True)
            (per_head * weight).sum().backward()
            optimizer.step()
        with torch.no_grad():
            for head, val in enumerate(val_sets):
                if not active[head]:
                    continue
                records[head]["epochs_run"] = epoch + 1
                if val.numel() == 0:  # nothing to validate on: keep the last epoch
                    for kept, current in zip(best_params, model.params, strict=True):
                        kept[head] = current.detach()[head]
                    records[head]["best_epoch"] = epoch + 1
                    continue
                logits = _head_logits(model, head, X, val)  # in chunks of rows: no (validation x dim) copy
                loss = float(F.binary_cross_entropy_with_logits(logits, y[val]))
                if loss < best_loss[head]:
                    best_loss[head] = loss
                    waited[head] = 0
                    for kept, current in zip(best_params, model.params, strict=True):
                        kept[head] = current.detach()[head]
                    records[head].update(best_epoch=epoch + 1, val_loss=loss)
                else:
                    waited[head] += 1
                    if waited[head] >= config.patience:
                        active[head] = False
        if not active.any():
            break
    with torch.no_grad():
        for kept, current in zip(best_params, model.params, strict=True):
            current.copy_(kept)
    return model, records


def _head_logits(model: BatchedMLP, head: int, X: torch.Tensor | RowsOnDisk, positions: npt.ArrayLike,
                 chunk: int = CHUNK) -> torch.Tensor:
    """Return head ``head``'s logits of the cells at ``positions`` (on X's device), `CHUNK` rows at a time."""
    import torch

    positions = torch.as_tensor(positions, dtype=torch.long, device=X.device)
    params = [p[head : head + 1] for p in model.params]
    parts = []
    with torch.no_grad():
        for start in range(0, positions.numel(), chunk):
            h = torch.relu(torch.baddbmm(params[1], X[positions[start : start + chunk]].unsqueeze(0), params[0]))
            h = torch.relu(torch.baddbmm(params[3], h, params[2]))
            parts.append(torch.baddbmm(params[5], h, params[4]).reshape(-1))
    return torch.cat(parts) if parts else torch.empty(0, device=X.device)


def predict_mlp_heads(model: BatchedMLP, X: torch.Tensor | RowsOnDisk, tests: list[np.ndarray],
                      chunk: int = CHUNK, *, logits: bool = False) -> list[npt.NDArray[np.float32]]:
    """Return each head's probability of sensitivity (or its logit) on its own test positions."""
    import torch

    out = []
    for head, test in enumerate(tests):
        values = _head_logits(model, head, X, test, chunk).cpu()
        out.append((values if logits else torch.sigmoid(values)).numpy().astype(np.float32))
    return out


def make_mlp(in_dim: int, hidden: int = 512) -> torch.nn.Sequential:
    """Return the paper's MLP head as an ``nn.Sequential`` (logits out; apply sigmoid for probability)."""
    from torch import nn

    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


#: Standard deviation below which `LogisticHead` treats a feature as constant.
MIN_SCALE = 1e-6


@dataclass
class LogisticHead:
    """Standardised logistic regression (scikit-learn), stored as plain arrays."""

    mean: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    coef: npt.NDArray[np.float64]
    intercept: float

    @classmethod
    def fit(cls, X: npt.NDArray, y: npt.NDArray, seed: int = 0) -> LogisticHead:
        from sklearn.linear_model import LogisticRegression

        mean = X.mean(axis=0)
        scale = X.std(axis=0)
        # a feature constant up to float32 rounding (std below 1e-6) is left unscaled: dividing by its
        # rounding noise would turn any shift of it in new data into logits of 1e4 and more
        scale[scale < MIN_SCALE] = 1.0
        model = LogisticRegression(max_iter=2000, random_state=seed).fit((X - mean) / scale, y)
        return cls(mean, scale, model.coef_.ravel(), float(model.intercept_[0]))

    def decision_function(self, X: npt.NDArray) -> npt.NDArray[np.float64]:
        """Return the logit of sensitivity per row."""
        return ((np.asarray(X, dtype=np.float64) - self.mean) / self.scale) @ self.coef + self.intercept

    def predict_proba(self, X: npt.NDArray) -> npt.NDArray[np.float32]:
        with np.errstate(over="ignore"):
            return (1.0 / (1.0 + np.exp(-self.decision_function(X)))).astype(np.float32)


def head_config_dict(config: HeadConfig) -> dict[str, Any]:
    return asdict(config)
