"""Transformer blocks that several models run unchanged, with the parameter names of ``torch.nn``.

scGPT (``scgpt/model/model.py``), UCE (``model.py``) and scFoundation (``pretrainmodels/transformer.py``)
all build their encoders from ``nn.TransformerEncoderLayer(batch_first=True)``: self-attention, then a
ReLU feed-forward, each with dropout and a residual, LayerNorm after each (post-norm) or before
(``norm_first``, an scFoundation option). The layer is written out here once, readable, with the
attention as a module of its own, so that LoRA adapters on its projections run (``nn.MultiheadAttention``
calls ``out_proj`` functionally, so adapters on it would be skipped).

What stays in each model's file, and why:

- the stack around the layers (scGPT: no final norm; UCE: only the CLS row of the last layer is
  needed; scFoundation: a final norm, its own module names) and how padding becomes a mask (scGPT and
  scFoundation leave pad keys out; UCE adds the official float ``1 - mask`` to the logits);
- scFoundation's attention: its checkpoint stores the fused ``in_proj_weight`` of ``nn.MultiheadAttention``
  under that name and LoRA adapts only ``out_proj``, so it keeps the fused matrix
  (`scdrugmap.models.scfoundation.SelfAttention`) and passes it to `TransformerEncoderLayer`;
- Geneformer and tGPT run ``transformers``' own ``BertModel`` / ``GPT2Model``; scBERT and CellLM share
  the Performer of `scdrugmap.models._performer`; CellPLM's Flowformer has no counterpart elsewhere.

Every model keeps its golden parity tests; a change here reaches scGPT, UCE and scFoundation at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scdrugmap.errors import ConfigError

#: nn.LayerNorm / nn.TransformerEncoderLayer default eps.
LAYER_NORM_EPS = 1e-5


class SelfAttention(nn.Module):
    """Multi-head attention with explicit ``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linears, run by SDPA.

    Numerically the ``nn.MultiheadAttention`` of the official models, whose fused input projection (rows
    q | k | v) the loaders split into the three Linears; held apart so LoRA adapters on any of them run.

    Parameters
    ----------
    d_model
        Width of the input and output.
    nhead
        Heads; must divide ``d_model``.
    dropout
        Dropout on the attention weights, in training mode only.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % nhead:
            msg = f"d_model={d_model} is not divisible by nhead={nhead}."
            raise ConfigError(msg)
        self.nhead = nhead
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from ``queries`` (batch, q, d_model; default ``x``) over the positions of ``x`` (batch, length, d_model).

        ``attn_mask`` is an SDPA mask broadcast to (batch, heads, q, length): boolean (True = may attend) or
        float (added to the logits, in the queries' dtype).
        """
        queries = x if queries is None else queries
        batch, length, width = x.shape
        n_queries = queries.shape[1]
        head_dim = width // self.nhead
        q = self.q_proj(queries).view(batch, n_queries, self.nhead, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.nhead, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.nhead, head_dim).transpose(1, 2)
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, n_queries, width))


class TransformerEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer(batch_first=True)`` with ReLU, as the official models build it.

    The parameter names are torch's (``self_attn``, ``linear1``, ``linear2``, ``norm1``, ``norm2``), so the
    official keys load unchanged (apart from the attention's own input projection, see each loader).

    Parameters
    ----------
    d_model
        Width of the hidden states.
    nhead
        Attention heads (of the default `SelfAttention`).
    d_hid
        Width of the feed-forward.
    dropout
        Dropout after the attention, inside and after the feed-forward, and on the attention weights.
    layer_norm_eps
        eps of both LayerNorms.
    norm_first
        LayerNorm before each block (pre-norm) instead of after the residual (post-norm, torch's default).
    self_attn
        The attention module, called as ``self_attn(x, attn_mask)`` (with ``queries=`` for ``cls_only``);
        default: `SelfAttention`.
    """

    def __init__(self, d_model: int, nhead: int, d_hid: int, dropout: float, *,
                 layer_norm_eps: float = LAYER_NORM_EPS, norm_first: bool = False,
                 self_attn: nn.Module | None = None) -> None:
        super().__init__()
        self.self_attn = self_attn if self_attn is not None else SelfAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def _attention(self, x: torch.Tensor, attn_mask: torch.Tensor | None, *, cls_only: bool) -> torch.Tensor:
        if cls_only:
            return self.self_attn(x, attn_mask, queries=x[:, :1])
        return self.self_attn(x, attn_mask)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
                cls_only: bool = False) -> torch.Tensor:
        """Run the layer on (batch, length, d_model) with an SDPA ``attn_mask`` (see `SelfAttention`).

        With ``cls_only`` only position 0 is computed (every position stays a key and value): all a pooling
        that reads the first position of the last layer needs.
        """
        residual = x[:, :1] if cls_only else x
        if self.norm_first:
            h = residual + self.dropout1(self._attention(self.norm1(x), attn_mask, cls_only=cls_only))
            return h + self._feed_forward(self.norm2(h))
        h = self.norm1(residual + self.dropout1(self._attention(x, attn_mask, cls_only=cls_only)))
        return self.norm2(h + self._feed_forward(h))
