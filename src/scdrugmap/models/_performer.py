"""What scBERT and CellLM share: the FAVOR+ Performer layers (official parameter names), scBERT's
preprocessing, the official-file loader and the encoder base `PerformerEncoder`.

scBERT (``TencentAILabHealthcare/scBERT``, ``performer_pytorch/performer_pytorch.py``) and CellLM
(``PharMolix/OpenBioMed``, ``open_biomed/models/cell/performer_celllm.py``) both run a modified copy
of lucidrains' performer-pytorch: non-causal FAVOR+ attention with the softmax kernel, pre-LayerNorm
blocks, a GELU feed-forward and gene2vec "positional" embeddings. The two copies are line-for-line the
same in every layer below; they differ only in how the language model feeds the layers (see
`PerformerLM.forward`), so the layers live here once.

What the official kernel does, and this module reproduces
---------------------------------------------------------
With ``d = dim_head`` and ``m = nb_features`` (default ``int(d ln d)``):

- inputs are scaled by ``d^-1/4``; ``dash = x P^T``; ``diag = |x|^2 / 2 * d^-1/2``;
- query features ``m^-1/2 (exp(dash - diag - max_features(dash)) + 1e-4)`` (max per row);
- key features ``m^-1/2 (exp(dash - diag - max(dash)) + 1e-4)``, where the max is taken over the
  **whole tensor**: every cell of the batch, every head, position and feature. Because of the additive
  ``1e-4`` the stabiliser does not cancel, so a cell's output depends on the other cells of its batch
  (``key_max="batch"``, the official behaviour). ``key_max="cell"`` takes the max per cell instead,
  which gives every cell the output it gets alone in a batch of one (scBERT's ``predict.py``), at any
  batch size;
- ``out = q'(k'^T v) / (q' . sum_n k')``.

The random projection matrices are persistent buffers loaded from the checkpoint, never regenerated
at inference. In training mode the official ``Performer`` redraws them every
``feature_redraw_interval`` (1000) forward calls; `Performer` does the same, from a seeded generator
(the official draw uses torch's global RNG).

Compressed padding (an exact rewrite used by CellLM)
----------------------------------------------------
CellLM pads every cell to 6,000 positions; pad positions have V zeroed but still act as keys (in the
normaliser and the global max). All pad positions of a cell hold the same token and the same zero
gene2vec row, so they stay identical through every layer. ``key_weight`` lets one representative pad
slot stand for all of them: keys are weighted by their multiplicity (``n_pad`` for the representative,
1 for real tokens, 0 for filler slots that exist only to make a rectangular batch) and filler slots
are left out of the key max. The result equals the padded computation up to float summation order.

scFoundation's helper does NOT use this module. Its Performer decoder is scFoundation's own copy of
the code (``model/pretrainmodels/performer.py``: qkv bias on, its own key names and padding routing),
ported and golden-tested in `scdrugmap.models.scfoundation` on its own; a change here does not
reach it, and a change there does not reach scBERT or CellLM.

Preprocessing, loader and encoder base
--------------------------------------
CellLM's data sets are scBERT-preprocessed, so both models run scBERT's ``preprocess.py`` here
(`preprocessed_cells`: align to the reference genes, drop cells with fewer than ``min_genes`` of them,
normalise to 1e4, ``log2(1 + x)``, vectorised). `PerformerEncoder` holds the switchable key max and the
strict loader of the official ``.pth`` (`PerformerEncoder._load_official`); each model declares its files,
config and messages through the hooks listed on the class. The tokens (scBERT's bins of every gene,
CellLM's expressed genes with a CLS) stay in each model's module.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import zipfile
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, cast

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from scdrugmap.data.schema import expression_matrix
from scdrugmap.errors import CheckpointError, ConfigError, SchemaError, WeightsNotFoundError
from scdrugmap.models.base import TorchEncoder
from scdrugmap.models.weights import WeightsSource, cache_path, resolve_weights

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

log = logging.getLogger(__name__)

KeyMax = Literal["batch", "cell"]
KEY_MAX_CHOICES: tuple[str, ...] = ("batch", "cell")

#: performer_pytorch.py softmax_kernel(eps=1e-4): added to every random feature.
KERNEL_EPS = 1e-4
#: performer_pytorch.py Performer(feature_redraw_interval=1000).
FEATURE_REDRAW_INTERVAL = 1000


def default_nb_features(dim_head: int) -> int:
    """Return the official number of random features, ``int(dim_head * ln(dim_head))`` (FastAttention)."""
    return int(dim_head * math.log(dim_head))


# --- kernel -----------------------------------------------------------------------------------------------


def gaussian_orthogonal_random_matrix(
    nb_rows: int, nb_columns: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw the official FAVOR+ projection: stacked orthogonal blocks with chi-distributed row norms.

    Drawn on the CPU in float32 (the official code moves each block to the CPU for the QR too).
    """
    blocks = []
    for _ in range(math.ceil(nb_rows / nb_columns)):
        unstructured = torch.randn((nb_columns, nb_columns), generator=generator, device="cpu")
        q, _ = torch.linalg.qr(unstructured, mode="reduced")
        blocks.append(q.t())
    final = torch.cat(blocks)[:nb_rows]
    multiplier = torch.randn((nb_rows, nb_columns), generator=generator, device="cpu").norm(dim=1)
    return torch.diag(multiplier) @ final


def softmax_kernel_features(
    data: torch.Tensor,
    projection_matrix: torch.Tensor,
    *,
    is_query: bool,
    key_max: KeyMax = "batch",
    key_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return positive random features of ``data`` (batch, heads, positions, dim_head).

    ``key_weight`` (batch, positions) multiplies each key's features (its multiplicity); keys with
    weight 0 are left out of the stabilising max. Queries ignore it.

    ``ratio * (exp(z) + eps)`` is computed as ``exp(z + ln ratio) + ratio * eps``, and in place when no
    gradient is needed: the (batch, heads, positions, features) tensors dominate memory traffic.
    """
    normalizer = data.shape[-1] ** -0.25
    ratio = projection_matrix.shape[0] ** -0.5
    dash = torch.matmul(data, (normalizer * projection_matrix).to(data.dtype).t())
    offset = (data**2).sum(dim=-1, keepdim=True) * (0.5 * normalizer**2) - math.log(ratio)
    if is_query:
        offset = offset + dash.amax(dim=-1, keepdim=True)
    else:
        per_key = dash.amax(dim=(1, 3))  # (batch, positions); then over keys that count
        if key_weight is not None:
            per_key = per_key.masked_fill(key_weight == 0, float("-inf"))
        offset = offset + (per_key.amax() if key_max == "batch" else per_key.amax(dim=1)[:, None, None, None])
    weight = None if is_query or key_weight is None else key_weight[:, None, :, None].to(dash.dtype)
    if torch.is_grad_enabled() and (data.requires_grad or projection_matrix.requires_grad):
        features = torch.exp(dash - offset) + ratio * KERNEL_EPS
        return features if weight is None else features * weight
    features = dash.sub_(offset).exp_().add_(ratio * KERNEL_EPS)
    return features if weight is None else features.mul_(weight)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal linear attention ``q'(k'^T v) / (q' . sum_n k')`` (performer_pytorch.linear_attention).

    ``sum_n k'`` rides along as one more column of ``k'^T v``, so ``q'`` is read once for both products.
    """
    context = torch.matmul(k.transpose(-1, -2), v)
    k_sum = k.sum(dim=-2, keepdim=True).transpose(-1, -2).to(context.dtype)
    both = torch.matmul(q, torch.cat([context, k_sum], dim=-1))
    return both[..., :-1] / both[..., -1:]


# --- layers -------------------------------------------------------------------------------------------------


class FastAttention(nn.Module):
    """FAVOR+ softmax-kernel attention; holds the ``projection_matrix`` buffer."""

    projection_matrix: torch.Tensor

    def __init__(self, dim_head: int, nb_features: int | None = None, *, seed: int = 0) -> None:
        super().__init__()
        self.dim_head = dim_head
        self.nb_features = nb_features or default_nb_features(dim_head)
        self.key_max: KeyMax = "batch"
        if torch.empty(()).device.type == "meta":  # a shape-only build: nothing to draw
            projection = torch.empty(self.nb_features, dim_head)
        else:
            generator = torch.Generator().manual_seed(seed)
            projection = gaussian_orthogonal_random_matrix(self.nb_features, dim_head, generator=generator)
            projection = projection.to(torch.empty(()).device)
        self.register_buffer("projection_matrix", projection)

    @torch.no_grad()
    def redraw_projection_matrix(self, generator: torch.Generator) -> None:
        """Replace the projection with a fresh draw (training mode only, as official)."""
        fresh = gaussian_orthogonal_random_matrix(self.nb_features, self.dim_head, generator=generator)
        self.projection_matrix.copy_(fresh)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_weight: torch.Tensor | None = None) -> torch.Tensor:
        q = softmax_kernel_features(q, self.projection_matrix, is_query=True)
        k = softmax_kernel_features(k, self.projection_matrix, is_query=False, key_max=self.key_max,
                                    key_weight=key_weight)
        return linear_attention(q, k, v)


class SelfAttention(nn.Module):
    """Multi-head FAVOR+ self-attention with explicit ``to_q``/``to_k``/``to_v``/``to_out`` Linears.

    The projections are plain ``nn.Linear`` modules called as modules, so LoRA adapters on them run.
    ``mask`` (batch, positions; True = real token) zeroes V only, as the official code does.
    """

    def __init__(self, dim: int, *, heads: int, dim_head: int, nb_features: int | None = None,
                 qkv_bias: bool = False, seed: int = 0) -> None:
        super().__init__()
        if dim % heads:
            msg = f"dim {dim} must be divisible by heads {heads} (official SelfAttention assertion)."
            raise ValueError(msg)
        inner_dim = dim_head * heads
        self.heads = heads
        self.fast_attention = FastAttention(dim_head, nb_features, seed=seed)
        self.to_q = nn.Linear(dim, inner_dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, inner_dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, inner_dim, bias=qkv_bias)
        self.to_out = nn.Linear(inner_dim, dim)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        batch, length, _ = t.shape
        return t.view(batch, length, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                key_weight: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (self._split_heads(t) for t in (self.to_q(x), self.to_k(x), self.to_v(x)))
        if mask is not None:
            v = v.masked_fill(~mask[:, None, :, None], 0.0)
        out = self.fast_attention(q, k, v, key_weight=key_weight)
        batch, _, length, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    """``w2(GELU(w1(x)))`` (official FeedForward, glu=False, dropout 0)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, dim * mult)
        self.act = nn.GELU()
        self.w2 = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))


class Chunk(nn.Module):
    """The official ``Chunk(ff_chunks=1, ...)`` wrapper; kept only so the keys read ``fn.fn.w1``."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class PreLayerNorm(nn.Module):
    """``fn(LayerNorm(x))`` (official PreLayerNorm, eps 1e-5)."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


class SequentialSequence(nn.Module):
    """Residual stack: ``x += attn(x)``, then ``x += ff(x)``, per layer (official SequentialSequence)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                key_weight: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.layers:
            attention, feed_forward = cast("nn.ModuleList", block)
            x = x + attention(x, mask=mask, key_weight=key_weight)
            x = x + feed_forward(x)
        return x


class Performer(nn.Module):
    """The layer stack with the official redraw counter ``calls_since_last_redraw``."""

    calls_since_last_redraw: torch.Tensor

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, *, nb_features: int | None = None,
                 ff_mult: int = 4, qkv_bias: bool = False,
                 feature_redraw_interval: int | None = FEATURE_REDRAW_INTERVAL, seed: int = 0) -> None:
        super().__init__()
        layers = nn.ModuleList(
            nn.ModuleList([
                PreLayerNorm(dim, SelfAttention(dim, heads=heads, dim_head=dim_head, nb_features=nb_features,
                                                qkv_bias=qkv_bias, seed=seed + index)),
                PreLayerNorm(dim, Chunk(FeedForward(dim, mult=ff_mult))),
            ])
            for index in range(depth)
        )
        self.net = SequentialSequence(layers)
        self.feature_redraw_interval = feature_redraw_interval
        self.redraw_seed = seed
        self._redraws = 0
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))

    @property
    def key_max(self) -> KeyMax:
        attentions = [m for m in self.modules() if isinstance(m, FastAttention)]
        return attentions[0].key_max if attentions else "batch"

    @key_max.setter
    def key_max(self, value: KeyMax) -> None:
        if value not in KEY_MAX_CHOICES:
            msg = f"key_max={value!r}; expected one of {KEY_MAX_CHOICES}."
            raise ConfigError(msg)
        for module in self.modules():
            if isinstance(module, FastAttention):
                module.key_max = value

    def fix_projection_matrices_(self) -> None:
        """Never redraw the projections, even in training mode (official ``fix_projection_matrices_``)."""
        self.feature_redraw_interval = None

    def check_redraw_projections(self) -> None:
        """Count training-mode calls and redraw every ``feature_redraw_interval`` of them (official rule)."""
        if not self.training or self.feature_redraw_interval is None:
            return
        if int(self.calls_since_last_redraw) >= self.feature_redraw_interval:
            self._redraws += 1
            generator = torch.Generator().manual_seed(self.redraw_seed + 7919 * self._redraws)
            for module in self.modules():
                if isinstance(module, FastAttention):
                    module.redraw_projection_matrix(generator)
            self.calls_since_last_redraw.zero_()
            return
        self.calls_since_last_redraw += 1

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                key_weight: torch.Tensor | None = None) -> torch.Tensor:
        self.check_redraw_projections()
        return self.net(x, mask=mask, key_weight=key_weight)


class Gene2VecPositionalEmbedding(nn.Module):
    """The frozen gene2vec table (float64, as ``nn.Embedding.from_pretrained`` of the numpy array)."""

    def __init__(self, num_rows: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(num_rows, dim, dtype=torch.float64)
        self.emb.weight.requires_grad_(False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.emb(positions)


class PerformerLM(nn.Module):
    """Token + gene2vec embedding, the Performer, the final LayerNorm and the ``to_out`` token head.

    ``forward`` takes token ids already built by the model's tokenizer: scBERT feeds every gene in
    reference order (``positions`` = ``arange``), CellLM feeds expressed genes with their gene index as
    position and a ``mask`` (then hidden states are multiplied by the mask, as official).
    """

    def __init__(self, *, num_tokens: int, pos_rows: int, dim: int, depth: int, heads: int, dim_head: int,
                 nb_features: int | None = None, ff_mult: int = 4, qkv_bias: bool = False,
                 feature_redraw_interval: int | None = FEATURE_REDRAW_INTERVAL, seed: int = 0) -> None:
        super().__init__()
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = Gene2VecPositionalEmbedding(pos_rows, dim)
        self.performer = Performer(dim, depth, heads, dim_head, nb_features=nb_features, ff_mult=ff_mult,
                                   qkv_bias=qkv_bias, feature_redraw_interval=feature_redraw_interval, seed=seed)
        self.norm = nn.LayerNorm(dim)
        self.to_out: nn.Linear | None = nn.Linear(dim, num_tokens)

    def embed_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Return token + gene2vec embeddings, added as official: in float64, stored in the token dtype."""
        x = self.token_emb(input_ids)
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        pos = self.pos_emb(positions)
        if pos.dtype == x.dtype:
            return x + pos
        return (x.to(pos.dtype) + pos).to(x.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, key_weight: torch.Tensor | None = None, *,
                return_encodings: bool = False) -> torch.Tensor:
        x = self.embed_inputs(input_ids, positions)
        x = self.performer(x, mask=mask, key_weight=key_weight)
        x = self.norm(x)
        if mask is not None:
            x = x * mask.unsqueeze(-1).to(x.dtype)
        if return_encodings:
            return x
        if self.to_out is None:
            msg = "this checkpoint carries no to_out token head; call with return_encodings=True."
            raise CheckpointError(msg)
        return self.to_out(x)


# --- cost model -------------------------------------------------------------------------------------------


def performer_forward_flops(*, tokens: int, dim: int, depth: int, heads: int, dim_head: int,
                            nb_features: int | None = None, ff_mult: int = 4) -> int:
    """Return the matmul FLOPs (2 per multiply-add) of one sequence of ``tokens`` through the layers.

    Counts q/k/v/out projections, the random-feature maps of q and k, ``k'^T v``, ``q' (k'^T v)``, the
    normaliser and the feed-forward; element-wise work (exp, LayerNorm, GELU) and the head are left out.
    """
    features = nb_features or default_nb_features(dim_head)
    inner = heads * dim_head
    per_layer = (
        3 * 2 * tokens * dim * inner  # to_q, to_k, to_v
        + 2 * 2 * tokens * inner * features  # x P^T for queries and keys
        + 2 * tokens * inner * features  # context = k'^T v
        + 2 * tokens * inner * features  # q' context
        + 2 * tokens * heads * features  # q' . sum_n k'
        + 2 * tokens * inner * dim  # to_out
        + 2 * 2 * tokens * dim * dim * ff_mult  # w1, w2
    )
    return depth * per_layer


# --- checkpoint -----------------------------------------------------------------------------------------


def _numpy_safe_globals() -> list[Any]:
    """Plain-data numpy types a training script may leave in a checkpoint (e.g. a numpy float loss).

    They rebuild numbers and arrays only; listed under both numpy 1 and numpy 2 module paths.
    """
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    dtype_classes = [type(np.dtype(code)) for code in ("f4", "f8", "i4", "i8", "u1", "b1")]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            _reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype, *dtype_classes]


def read_checkpoint(path: str | Path, *, param_key: str = "model_state_dict",
                    model: str = "model") -> dict[str, torch.Tensor]:
    """Read the state dict stored under ``param_key`` of an official ``.pth``, never running pickled code.

    The file is read with ``torch.load(weights_only=True)``, which rebuilds tensors, dicts, lists and
    numbers only. Training containers also hold the epoch, the loss and optimizer / scheduler states:
    these are plain numbers, lists and tensors, which that loader accepts; numpy scalars and arrays (a
    loss computed in numpy) are allowed by name on top. A file that is a bare state dict is accepted.

    Raises
    ------
    CheckpointError
        When the file is missing, truncated or not a torch file, needs other pickled objects, or has
        no ``param_key`` entry.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: no such {model} checkpoint file. Pass the official .pth (or its folder)."
        raise CheckpointError(msg)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            container = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = re.search(r"GLOBAL (\S+)", str(err))
        if blocked is None:  # not a pickle torch can read at all: garbage or a cut-off legacy file
            msg = (f"{path}: cannot read the {model} checkpoint (not a torch file); the file is truncated or "
                   "corrupted. Download it again.")
            raise CheckpointError(msg) from err
        msg = (f"{path}: the {model} checkpoint holds a pickled {blocked.group(1)}, not only tensors, numbers and "
               f"containers, so it is not read (that could run code). If you trust the file, re-save its state "
               f"dict alone: torch.save({{'{param_key}': torch.load(p, weights_only=False)['{param_key}']}}, "
               "new_path).")
        raise CheckpointError(msg) from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        msg = (f"{path}: cannot read the {model} checkpoint ({type(err).__name__}: {str(err)[:200]}); the "
               "file is truncated or corrupted. Download it again.")
        raise CheckpointError(msg) from err
    if not isinstance(container, Mapping):
        msg = f"{path}: expected a dict with {param_key!r}, found {type(container).__name__}."
        raise CheckpointError(msg)
    if param_key in container:
        state = container[param_key]
    elif container and all(isinstance(v, torch.Tensor) for v in container.values()):
        state = container
    else:
        msg = (f"{path}: no {param_key!r} entry in the {model} checkpoint; its top-level keys are "
               f"{sorted(map(str, container))[:10]}. Pass the checkpoint the official loader reads.")
        raise CheckpointError(msg)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        msg = f"{path}: {param_key!r} is not a state dict of tensors."
        raise CheckpointError(msg)
    state = dict(state)
    if state and all(key.startswith("module.") for key in state):  # saved from a DDP wrapper
        log.info("%s: stripping the 'module.' prefix of a DistributedDataParallel save", path)
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


def _shown(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
                           optional_prefixes: Sequence[str] = (), fix: str = "") -> list[str]:
    """Copy ``state`` into ``module``, refusing missing, unexpected or mis-shaped keys.

    Keys under ``optional_prefixes`` (heads the embedding path does not run) may be absent or different;
    they are listed in one log line and their names returned, so the caller can drop that head.
    Tensors keep the module's dtype (e.g. float64 gene2vec stays float64).

    Raises
    ------
    CheckpointError
        Listing every missing, unexpected and mis-shaped key.
    """
    expected = module.state_dict()

    def optional(key: str) -> bool:
        return any(key.startswith(prefix) for prefix in optional_prefixes)

    missing = [k for k in expected if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in expected and not optional(k)]
    misshaped = [f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in expected if k in state and not optional(k) and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_shown(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_shown(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_shown(misshaped)}")
    if problems:
        msg = f"{source}: the checkpoint does not match the architecture; " + "; ".join(problems) + ". " + fix
        raise CheckpointError(msg.strip())
    head_expected = {k for k in expected if optional(k)}
    head_in_state = {k for k in state if optional(k)}
    head_loads = head_in_state == head_expected and all(state[k].shape == expected[k].shape for k in head_expected)
    if not head_loads:
        log.info("%s: head keys the embeddings do not use, left unloaded: %s", source, _shown(head_in_state) or "none")
    to_load = {k: state[k] for k in expected if head_loads or not optional(k)}
    module.load_state_dict(to_load, strict=False)
    return [] if head_loads else sorted(head_expected)


def state_dict_summary(module: nn.Module) -> list[dict[str, Any]]:
    """Return key, shape and dtype of every state-dict entry (for comparing with keys_full.json)."""
    return [{"key": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in module.state_dict().items()]


def flat_offsets(lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Return CSR-style offsets ``[0, l0, l0+l1, ...]`` for ragged per-cell arrays."""
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


# --- official configs -------------------------------------------------------------------------------------


def official_performer_kwargs(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Return the ``PerformerLM`` kwargs of an official config: flat, under ``"PerformerLM"``, or OpenBioMed's
    ``network.structure``."""
    if "PerformerLM" in raw:
        return dict(raw["PerformerLM"])
    if "network" in raw and "structure" in raw["network"]:
        return dict(raw["network"]["structure"])
    return dict(raw)


#: Keys of the official configs that do not change the architecture we build.
IGNORED_CONFIG_KEYS = frozenset({"name", "gene2vec_path", "ckpt_path", "param_key", "gene_num"})


def checked_performer_kwargs(cls: type, kwargs: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Return the kwargs of ``kwargs`` that are fields of the config dataclass ``cls``.

    Raises
    ------
    ConfigError
        When the file asks for features this port does not run (local attention, no gene2vec) or for
        options that are neither fields nor `IGNORED_CONFIG_KEYS`.
    """
    if kwargs.pop("local_attn_heads", 0) not in (0, [0], (0,)):
        msg = f"{path}: local_attn_heads > 0 is not supported (the published model uses 0)."
        raise ConfigError(msg)
    if not kwargs.pop("g2v_position_emb", True):
        msg = f"{path}: g2v_position_emb=False is not supported (the published model uses gene2vec)."
        raise ConfigError(msg)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - known - IGNORED_CONFIG_KEYS)
    if unknown:
        msg = f"{path}: unsupported PerformerLM options {unknown}; supported: {sorted(known)}."
        raise ConfigError(msg)
    return {k: v for k, v in kwargs.items() if k in known}


# --- preprocessing (scBERT's preprocess.py), shared by scBERT and CellLM -----------------------------------

#: preprocess.py ``sc.pp.filter_cells(new, min_genes=200)``.
MIN_GENES = 200
#: preprocess.py ``sc.pp.normalize_total(new, target_sum=1e4)``.
TARGET_SUM = 1e4
#: preprocess.py ``sc.pp.log1p(new, base=2)``.
LOG_BASE = 2.0
#: Rows processed together by the vectorised preprocessing (bounds memory, not a per-cell loop).
PREPROCESS_CHUNK = 8192


def read_gene_list(source: str | Path | Sequence[str]) -> npt.NDArray[np.str_]:
    """Return a reference gene order from a list, a text file (one gene a line) or an ``.h5ad`` (var_names).

    Raises
    ------
    SchemaError
        When the file type is not known or the list is empty.
    """
    if not isinstance(source, str | Path):
        genes = np.asarray([str(g) for g in source])
    else:
        path = Path(source)
        if path.suffix == ".h5ad":
            import anndata as ad

            backed = ad.read_h5ad(path, backed="r")
            genes = np.asarray(backed.var_names.astype(str))
            backed.file.close()
        elif path.suffix in (".txt", ".tsv", ".csv", ""):
            genes = np.asarray([line.strip() for line in path.read_text().splitlines() if line.strip()])
        else:
            msg = f"{path}: cannot read a gene list from a {path.suffix} file; give a .txt (one gene a line) or .h5ad."
            raise SchemaError(msg)
    if genes.size == 0:
        msg = f"{source}: the reference gene list is empty."
        raise SchemaError(msg)
    return genes


def data_gene_names(adata: ad.AnnData, gene_key: str | None = None) -> npt.NDArray[np.str_]:
    """Return the gene symbols of ``adata``: ``var[gene_key]``, else ``var['gene_symbol']``, else var_names."""
    if gene_key is not None:
        if gene_key not in adata.var:
            msg = f"var has no column {gene_key!r}; columns present: {list(adata.var.columns)}. Check --gene-key."
            raise SchemaError(msg)
        return np.asarray(adata.var[gene_key].astype(str))
    if "gene_symbol" in adata.var:
        return np.asarray(adata.var["gene_symbol"].astype(str))
    return np.asarray(adata.var_names.astype(str))


def reference_selection(data_genes: npt.NDArray[np.str_], reference: npt.NDArray[np.str_]) -> sp.csr_matrix:
    """Return the 0/1 (data genes x reference genes) matrix that copies, for every reference gene, the
    column of its **first** occurrence in the data (``obj.index(ref[i])`` in preprocess.py)."""
    unique, first = np.unique(data_genes, return_index=True)
    hit = pd.Index(unique).get_indexer(reference)
    present = np.flatnonzero(hit >= 0)
    source = first[hit[present]]
    ones = np.ones(present.size, dtype=np.float32)
    return sp.csr_matrix((ones, (source, present)), shape=(data_genes.size, reference.size))


def known_gene_columns(adata: ad.AnnData, reference: npt.NDArray[np.str_], *,
                       gene_key: str | None = None) -> npt.NDArray[np.bool_]:
    """Return, per var column, whether preprocess.py copies it into the reference genes (`reference_selection`:
    the first column of each reference gene; a repeated column is not read)."""
    selection = reference_selection(data_gene_names(adata, gene_key), reference)
    return np.diff(selection.indptr) > 0


def preprocess_log2(
    counts: Any, selection: sp.csr_matrix, *, min_genes: int = MIN_GENES, target_sum: float = TARGET_SUM
) -> tuple[sp.csr_matrix, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Run preprocess.py on raw counts: align, filter cells, normalise, log2; vectorised, float32 like scanpy.

    Returns ``(log2 values of the kept cells as a CSR matrix with sorted indices, kept row positions,
    number of expressed reference genes per input row)``. Arithmetic mirrors scanpy 1.11: float64 row sums stored as
    float32, ``x / (sum / target_sum)`` in float32, ``log1p`` in float32 divided by ``ln 2`` in float64.
    """
    parts: list[sp.csr_matrix] = []
    kept: list[npt.NDArray[np.int64]] = []
    n_expressed = np.zeros(counts.shape[0], dtype=np.int64)
    for start in range(0, counts.shape[0], PREPROCESS_CHUNK):
        block = counts[start : start + PREPROCESS_CHUNK]
        block = sp.csr_matrix(block, dtype=np.float32) if sp.issparse(block) else sp.csr_matrix(
            np.asarray(block, dtype=np.float32))
        aligned = (block @ selection).tocsr()
        aligned.eliminate_zeros()
        aligned.sort_indices()
        expressed = np.diff(aligned.indptr)
        n_expressed[start : start + aligned.shape[0]] = expressed
        rows = np.flatnonzero(expressed >= min_genes)
        aligned = aligned[rows]
        sums = np.asarray(aligned.sum(axis=1, dtype=np.float64)).ravel().astype(np.float32)
        factor = sums / np.float32(target_sum)
        factor[factor == 0] = 1  # scanpy: a zero-count cell stays zero
        data = aligned.data / np.repeat(factor, np.diff(aligned.indptr))
        data = (np.log1p(data).astype(np.float64) / np.log(LOG_BASE)).astype(np.float32)
        parts.append(sp.csr_matrix((data, aligned.indices, aligned.indptr), shape=aligned.shape))
        kept.append(rows + start)
    matrix = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, selection.shape[1]), dtype=np.float32)
    matrix.sort_indices()
    kept_rows = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    return matrix, kept_rows.astype(np.int64), n_expressed


def preprocessed_cells(
    adata: ad.AnnData, reference: npt.NDArray[np.str_], *, layer: str | None, gene_key: str | None,
    min_genes: int, model: str,
) -> tuple[sp.csr_matrix, npt.NDArray[np.int64], dict[int, str], int]:
    """Align ``adata`` to ``reference`` and run preprocess.py; return (log2, kept rows, dropped, n matched).

    Raises
    ------
    SchemaError
        When no gene of the data is in the reference (symbols expected).
    """
    genes = data_gene_names(adata, gene_key)
    selection = reference_selection(genes, reference)
    n_matched = int(selection.nnz)
    if n_matched == 0:
        msg = (f"{model}: none of the {genes.size} genes of the data (e.g. {list(genes[:3])}) is in the model's "
               f"{reference.size} reference genes (e.g. {list(reference[:3])}). It expects gene symbols: "
               "harmonise the genes (var['gene_symbol']) or name the column with gene_key.")
        raise SchemaError(msg)
    log.debug("%s: %d of %d reference genes found in the data", model, n_matched, reference.size)
    matrix, kept, n_expressed = preprocess_log2(expression_matrix(adata, layer), selection, min_genes=min_genes)
    dropped_rows = np.setdiff1d(np.arange(adata.n_obs), kept)
    dropped = {int(r): f"{int(n_expressed[r])} reference genes expressed, fewer than min_genes={min_genes}"
               for r in dropped_rows}
    return matrix, kept, dropped, n_matched


# --- official files ---------------------------------------------------------------------------------------

#: Plain-text gene lists looked for beside a checkpoint when the reference .h5ad is absent.
GENE_LIST_FILES = ("genes.txt", "vocab_genes.txt")


def _single_match(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    return found[0] if len(found) == 1 else None


def locate_official_files(path: Path, checkpoint_name: str, reference_names: Sequence[str]) -> tuple[Path, Path | None]:
    """Return (checkpoint file, reference gene file or None) from a file or an official-layout folder."""
    if path.is_file():
        folder, checkpoint = path.parent, path
    else:
        folder = path
        checkpoint = folder / checkpoint_name
        if not checkpoint.exists():
            checkpoint = _single_match(folder, "*.pth") or checkpoint
    reference = next((folder / n for n in reference_names if (folder / n).exists()), None)
    if reference is None:
        reference = _single_match(folder, "*.h5ad")
    return checkpoint, reference


def resolve_official(source: WeightsSource, path_or_name: str | Path | None, sources: Mapping[str, WeightsSource],
                     manual_steps: str) -> Path:
    """Return the local weights path: ``path_or_name`` if it is a path, else the cached variant.

    The official files sit behind share pages that need a request or a browser, so nothing is
    downloaded automatically: a missing cache raises with the manual steps.
    """
    if path_or_name is not None and str(path_or_name) not in sources:
        return resolve_weights(source, path_or_name)
    variant = sources[str(path_or_name)] if path_or_name is not None else source
    folder = cache_path(variant)
    if all((folder / remote.filename).exists() for remote in variant.files):  # copied in by hand: no manifest
        return folder
    try:
        return resolve_weights(variant, allow_download=False)
    except WeightsNotFoundError as err:
        msg = f"{err} {manual_steps}"
        raise WeightsNotFoundError(msg) from err


# --- the encoder base ---------------------------------------------------------------------------------------


class PerformerConfig(Protocol):
    """What `PerformerEncoder` reads of a model's config (`ScBERTConfig`, `CellLMConfig`)."""

    @property
    def dim(self) -> int:
        """Width of the hidden states (the embedding width)."""
        ...

    @property
    def gene_num(self) -> int:
        """Number of genes in the model's reference order."""
        ...


class PerformerEncoder(TorchEncoder):
    """What the scBERT and CellLM encoders share: the switchable key max, the model width and the loader.

    A subclass declares its official files and messages through the hooks below (class attributes and
    static methods); `_load_official` does the rest: resolve the weights, find the checkpoint and the
    gene list, read the config, build the network and load it strictly.
    """

    module: PerformerLM
    config: PerformerConfig
    #: The model's gene order (``config.gene_num`` genes).
    genes: npt.NDArray[np.str_]
    #: Cells with fewer expressed reference genes are dropped (preprocess.py).
    min_genes: int
    #: var column holding gene symbols (None: ``gene_symbol`` if present, else var_names).
    gene_key: str | None

    #: How to fetch the official files by hand (their hosts need a browser); added to a missing-cache error.
    MANUAL_STEPS: ClassVar[str]
    #: File name of the official checkpoint in a weights folder.
    CHECKPOINT_FILE: ClassVar[str]
    #: The official ``.h5ad`` whose var_names are the model's gene order (looked for beside the checkpoint).
    REFERENCE_H5AD: ClassVar[str]
    #: The model's name in messages and logs ("scBERT", "CellLM").
    MODEL_LABEL: ClassVar[str]

    @staticmethod
    @abstractmethod
    def _default_config(config_path: Path) -> PerformerConfig:
        """Return the config of ``config_path`` (an official JSON beside the checkpoint) if it exists, else the published one."""

    @staticmethod
    @abstractmethod
    def _build(config: Any) -> PerformerLM:
        """Return the model's ``PerformerLM`` for ``config`` (official state-dict keys)."""

    @staticmethod
    @abstractmethod
    def _missing_genes_message(folder: Path, config: Any) -> str:
        """Return the message when no gene list sits beside the checkpoint in ``folder``."""

    @staticmethod
    @abstractmethod
    def _gene_count_message(genes: Any, n_genes: int, config: Any) -> str:
        """Return the message when the gene list ``genes`` has ``n_genes`` genes, not ``config.gene_num``."""

    @staticmethod
    @abstractmethod
    def _checkpoint_fix(config: Any) -> str:
        """Return the fix appended to a strict-load error (which config to pass)."""

    @property
    def key_max(self) -> KeyMax:
        """``"batch"`` (official: a cell's output depends on its batch) or ``"cell"`` (batch-independent)."""
        return self.module.performer.key_max

    @key_max.setter
    def key_max(self, value: KeyMax) -> None:
        self.module.performer.key_max = value

    @property
    def embedding_dim(self) -> int:
        return self.config.dim

    @classmethod
    def _load_official(cls, path_or_name: str | Path | None, *, config: Any, genes: Any, device: str | None,
                       options: Mapping[str, Any]) -> tuple[PerformerLM, npt.NDArray[np.str_], Any, Path]:
        """Resolve, read and strictly load an official checkpoint; return (module, genes, config, checkpoint).

        The models differ only in their files, config class, network builder and messages: the hooks
        `_default_config`, `_build`, `_missing_genes_message`, `_gene_count_message` and `_checkpoint_fix`.
        """
        if options:
            msg = f"unknown {cls.name} options {sorted(options)}."
            raise ConfigError(msg)
        default = next(iter(cls.weights_sources.values()))
        path = resolve_official(default, path_or_name, cls.weights_sources, cls.MANUAL_STEPS)
        checkpoint, reference = locate_official_files(Path(path), cls.CHECKPOINT_FILE,
                                                      (cls.REFERENCE_H5AD, *GENE_LIST_FILES))
        if config is None:
            config = cls._default_config(checkpoint.parent / "config.json")
        if genes is None:
            if reference is None:
                raise CheckpointError(cls._missing_genes_message(checkpoint.parent, config))
            genes = reference
        gene_list = read_gene_list(genes)
        if gene_list.size != config.gene_num:
            raise CheckpointError(cls._gene_count_message(genes, gene_list.size, config))
        module = cls._build(config)
        state = read_checkpoint(checkpoint, model=cls.MODEL_LABEL)
        missing_head = load_state_dict_strict(module, state, source=str(checkpoint), optional_prefixes=("to_out.",),
                                              fix=cls._checkpoint_fix(config))
        if missing_head:
            module.to_out = None  # a fine-tuned head (finetune.py's Identity) or none: embeddings do not use it
        if device is not None:
            module.to(device)
        module.eval()
        return module, gene_list, config, checkpoint
