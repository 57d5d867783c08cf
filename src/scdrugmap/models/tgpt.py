"""tGPT as a scDrugMap encoder: a GPT-2 over each cell's top-ranked gene symbols.

Paper: Shen et al., "Generative pretraining from large-scale transcriptomes for single-cell deciphering",
iScience 26(5), 106536 (2023).
Official code: https://github.com/deeplearningplus/tGPT @ ``9714a988cded17284afbf977ce394700a05b19b2``
(``README.md`` / ``example.ipynb`` "Extract features": ``LineDataset``, the tokenizer call and the mean
pooling; ``train.py``: the model config and training batches). Weights and tokenizer:
https://huggingface.co/lixiangchun/transcriptome-gpt-1024-8-16-64 (n_embd 1024, 8 layers, 16 heads,
64 input tokens).

Input
    Non-negative expression; only each cell's gene order is used.
Tokens
    The official code reads precomputed text, one line of ranked gene symbols per cell; turning counts into
    that line is not in the repository, so this module uses the convention of the golden fixture: the
    expressed genes (value > 0) sorted by value, descending, ties in column order. The line is cleaned with
    ``re.sub(r'\\-|\\.', '_', line)`` (``LineDataset``) and tokenized by the official ``tokenizer.json``
    (WordLevel, Whitespace pre-tokenizer, ``</b> $A </s>``) with ``max_length=64, truncation=True``: the first
    62 gene tokens between ``</b>`` and ``</s>``, right-padded with ``<pad>`` = 0. Unknown symbols are kept as
    ``<unk>``.
Pooling
    ``GPT2LMHeadModel.transformer``'s last hidden state (after ``ln_f``) averaged over the gene positions,
    ``h[1:eos_idx].mean(0)`` with ``eos_idx = attention_mask.sum() - 1``: BOS, EOS and padding are excluded.

Quirk kept (it is how the released model was trained): the official call passes ``token_type_ids`` (all 0),
and GPT-2 embeds them with the *word* embedding, so every position gets ``wte[<pad>]`` added.
A cell without any expressed gene would pool an empty slice (NaN) officially; it is dropped here, so its
embedding row is NaN as well.

LoRA: ``c_attn`` is a ``transformers`` ``Conv1D`` whose weight is stored (in x out), so peft needs
``LoraConfig(fan_in_fan_out=True)`` (`TGPTEncoder.lora_options`); peft detects the ``Conv1D`` and sets it
itself, with a warning, when it is left False.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from scdrugmap.data.schema import expression_matrix
from scdrugmap.errors import CheckpointError, ConfigError, SchemaError
from scdrugmap.models.base import HubModelEncoder, TokenizedCells
from scdrugmap.models.weights import WeightsSource, hf_file

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

log = logging.getLogger(__name__)

# --- official constants ---------------------------------------------------------------------------------

HF_REPO = "lixiangchun/transcriptome-gpt-1024-8-16-64"
#: The 126-gene variant the official README mentions.
HF_REPO_128 = "lixiangchun/transcriptome-gpt-1024-8-16-128"
#: Tokens per cell incl. BOS and EOS (README "Extract features": tokenizer(..., max_length=64, truncation=True)).
MAX_LENGTH = 64
#: LineDataset in README/example.ipynb: line = re.sub(r'\-|\.', '_', line).
SYMBOL_CLEANUP = re.compile(r"\-|\.")
#: gpt2tokenizer/special_tokens_map.json.
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "</b>", "</s>", "<pad>", "<unk>"
#: var column holding gene symbols after scDrugMap's harmonisation (DESIGN.md); var_names otherwise.
GENE_SYMBOL_KEY = "gene_symbol"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --- config ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TGPTConfig:
    """The GPT-2 configuration of tGPT; defaults are the published ``transcriptome-gpt-1024-8-16-64``
    (train.py: ``GPT2Config(vocab_size=21150, n_embd=1024, n_layer=8, n_head=16, bos_token_id=1,
    pad_token_id=0, eos_token_id=2)``, everything else a ``GPT2Config`` default)."""

    vocab_size: int = 21_150
    n_positions: int = 1024
    n_embd: int = 1024
    n_layer: int = 8
    n_head: int = 16
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    @classmethod
    def from_official(cls, path: str | Path) -> TGPTConfig:
        """Read the official ``config.json`` (a folder or the file); keys not listed here are ignored.

        Raises
        ------
        CheckpointError
            When the file is missing, unreadable, or not a GPT-2 config.
        """
        path = Path(path)
        file = path / CONFIG_FILE if path.is_dir() else path
        try:
            raw = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            msg = f"{file}: cannot read the tGPT config ({err}). The official model folder has one."
            raise CheckpointError(msg) from err
        if raw.get("model_type", "gpt2") != "gpt2":
            msg = f"{file}: model_type={raw.get('model_type')!r}; tGPT is a GPT-2 ('gpt2')."
            raise CheckpointError(msg)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @property
    def inner_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def to_transformers(self, attn_implementation: str = "sdpa") -> Any:
        """Return the ``transformers.GPT2Config`` of this model."""
        from transformers import GPT2Config

        values = {f.name: getattr(self, f.name) for f in fields(self)}
        # PretrainedConfig takes attn_implementation through **kwargs; the transformers stubs omit it.
        return GPT2Config(**values, attn_implementation=attn_implementation)  # type: ignore[call-arg]


# --- the tokenizer --------------------------------------------------------------------------------------

def clean_symbols(symbols: Any) -> list[str]:
    """Apply the official ``LineDataset`` clean-up (``-`` and ``.`` become ``_``) to each gene symbol."""
    return [SYMBOL_CLEANUP.sub("_", str(s)) for s in symbols]


class TGPTTokenizer:
    """Rank expressed genes per cell and encode them with the official ``tokenizer.json``, vectorised.

    Each gene symbol is encoded once (the Whitespace pre-tokenizer splits the line at spaces, so a line is
    the concatenation of its genes' tokens); cells are then ranked and cut with numpy.

    Parameters
    ----------
    tokenizer_file
        The official ``tokenizer.json``.
    max_length
        Tokens per cell incl. BOS and EOS (64 for the published model).
    chunk_size
        Cells ranked at once.
    """

    def __init__(self, tokenizer_file: str | Path, *, max_length: int = MAX_LENGTH, chunk_size: int = 4096) -> None:
        from tokenizers import Tokenizer

        path = Path(tokenizer_file)
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a plain Exception for bad files
            msg = f"{path}: cannot read the tGPT tokenizer ({err}). Download the official tokenizer.json."
            raise CheckpointError(msg) from err
        ids = {name: self.tokenizer.token_to_id(name) for name in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN)}
        if None in ids.values():
            missing = [k for k, v in ids.items() if v is None]
            msg = f"{path}: special tokens {missing} are not in the vocabulary; is this tGPT's tokenizer.json?"
            raise CheckpointError(msg)
        if max_length < 3:
            msg = f"max_length={max_length}; it counts BOS and EOS, so it must be at least 3."
            raise ConfigError(msg)
        found = {k: v for k, v in ids.items() if v is not None}  # all of them (checked above)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (found[k] for k in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN,
                                                                                 UNK_TOKEN))
        self.max_length = int(max_length)
        self.max_gene_tokens = self.max_length - 2
        self.chunk_size = int(chunk_size)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode_genes(self, symbols: Any) -> tuple[np.ndarray, np.ndarray]:
        """Return (flat token ids, offsets) of each cleaned symbol, without special tokens."""
        encodings = self.tokenizer.encode_batch(clean_symbols(symbols), add_special_tokens=False)
        counts = np.array([len(e.ids) for e in encodings], dtype=np.int64)
        flat = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64, count=int(counts.sum()))
        offsets = np.zeros(counts.size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return flat, offsets

    def tokenize(self, adata: ad.AnnData, *, layer: str | None = None,
                 gene_symbol_key: str = GENE_SYMBOL_KEY) -> TokenizedCells:
        """Tokenize every cell of ``adata`` (see the module docstring).

        Raises
        ------
        SchemaError
            When no gene symbol is in the vocabulary, or the values are negative or not finite.
        """
        start_time = time.perf_counter()
        if gene_symbol_key in adata.var:
            symbols = adata.var[gene_symbol_key].astype(str).to_numpy()
        else:
            symbols = np.asarray(adata.var_names, dtype=object)
        gene_flat, gene_offsets = self.encode_genes(symbols)
        n_tokens = np.diff(gene_offsets)
        # a gene is known when it has tokens and none of them is <unk> (a symbol with no token is unknown)
        gene_of_token = np.repeat(np.arange(n_tokens.size), n_tokens)
        unknown_tokens = np.bincount(gene_of_token[gene_flat == self.unk_id], minlength=n_tokens.size)
        gene_known = (n_tokens > 0) & (unknown_tokens == 0)
        matched = int(gene_known.sum())
        if matched == 0:
            msg = (f"none of the {len(symbols)} genes (e.g. {', '.join(map(str, symbols[:3]))}) is in the tGPT "
                   f"vocabulary; tGPT reads gene symbols. Put them in var['{gene_symbol_key}'] or var_names.")
            raise SchemaError(msg)
        matrix = expression_matrix(adata, layer)
        pieces = []
        for start in range(0, adata.n_obs, self.chunk_size):
            stop = min(start + self.chunk_size, adata.n_obs)
            block = matrix[start:stop]
            csr = sp.csr_matrix(block) if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
            pieces.append(self._tokenize_chunk(csr, gene_flat, gene_offsets, start, adata.obs_names))
        flat = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0, np.int32)
        lengths = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, np.int64)
        cell_index = np.concatenate([p[2] for p in pieces]) if pieces else np.zeros(0, np.int64)
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        empty = np.setdiff1d(np.arange(adata.n_obs), cell_index, assume_unique=True)
        dropped = {int(r): "no expressed gene (the official mean over gene positions would be NaN)" for r in empty}
        if empty.size:
            log.warning("tGPT: %d cells express no gene and are dropped, e.g. %s", empty.size,
                        adata.obs_names[empty[0]])
        log.info("tokenized %d of %d cells for tGPT in %.2fs", cell_index.size, adata.n_obs,
                 time.perf_counter() - start_time)
        return TokenizedCells(cell_index=cell_index, lengths=lengths,
                              arrays={"input_ids": flat, "offsets": offsets}, dropped=dropped,
                              n_genes_matched=matched, gene_known=gene_known)

    def _tokenize_chunk(self, csr: sp.csr_matrix, gene_flat: np.ndarray, gene_offsets: np.ndarray, start: int,
                        obs_names: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n_rows = csr.shape[0]
        data = np.asarray(csr.data)
        rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(csr.indptr))
        if data.size and not (np.isfinite(data).all() and data.min() >= 0):
            bad = int(np.flatnonzero(~(np.isfinite(data) & (data >= 0)))[0])
            msg = (f"cell {obs_names[start + rows[bad]]!r} has expression {data[bad]!r}; tGPT ranks non-negative "
                   "finite values. Pass counts or normalised expression.")
            raise SchemaError(msg)
        take = data > 0
        values, genes, rows = data[take], csr.indices[take].astype(np.int64), rows[take]
        # Rank by value, descending; ties keep column order (the fixture's convention).
        order = np.lexsort((genes, -values.astype(np.float64), rows))
        genes, rows = genes[order], rows[order]
        # Tokens each ranked gene contributes, and how many of its row's tokens come before it.
        n_tok = np.diff(gene_offsets)[genes]
        row_first = np.searchsorted(rows, np.arange(n_rows))
        cumulative = np.cumsum(n_tok) - n_tok
        before = cumulative - np.concatenate([cumulative, [0]])[row_first][rows]
        keep = (before < self.max_gene_tokens) & (n_tok > 0)
        genes, rows, before, n_tok = genes[keep], rows[keep], before[keep], n_tok[keep]
        # Expand genes into their tokens, then cut each row at max_gene_tokens.
        entry = np.repeat(np.arange(genes.size), n_tok)
        within = np.arange(entry.size) - np.repeat(np.cumsum(n_tok) - n_tok, n_tok)
        position = before[entry] + within
        inside = position < self.max_gene_tokens
        token_rows = rows[entry][inside]
        tokens = gene_flat[gene_offsets[genes[entry]] + within][inside]
        n_gene_tokens = np.bincount(token_rows, minlength=n_rows)
        nonempty = np.flatnonzero(n_gene_tokens > 0)
        out_lengths = n_gene_tokens[nonempty] + 2
        flat = np.empty(int(out_lengths.sum()), dtype=np.int32)
        ends = np.cumsum(out_lengths)
        flat[ends - out_lengths] = self.bos_id
        flat[ends - 1] = self.eos_id
        inner = np.ones(flat.size, dtype=bool)
        inner[ends - out_lengths] = False
        inner[ends - 1] = False
        flat[inner] = tokens
        return flat, out_lengths.astype(np.int64), nonempty.astype(np.int64) + start


# --- the model ------------------------------------------------------------------------------------------

class TGPTModel(nn.Module):
    """``transformers.GPT2Model`` (as ``transformer``, the official key prefix) plus the official pooling."""

    def __init__(self, config: TGPTConfig, *, attn_implementation: str = "sdpa") -> None:
        from transformers import GPT2Model

        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config.to_transformers(attn_implementation))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:  # the official call always passes zeros (see the module docstring)
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
        eos_index = attention_mask.sum(dim=1, keepdim=True) - 1
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
        weights = ((positions >= 1) & (positions < eos_index)).to(hidden.dtype)
        return torch.einsum("bld,bl->bd", hidden, weights) / weights.sum(dim=1, keepdim=True)


def build_tgpt_model(config: TGPTConfig, *, attn_implementation: str = "sdpa") -> TGPTModel:
    """Instantiate `TGPTModel` in eval mode (use ``with torch.device("meta")`` for a shape-only model)."""
    return TGPTModel(config, attn_implementation=attn_implementation).eval()


# --- the loader -----------------------------------------------------------------------------------------

#: Keys of the published file for what embeddings never run: the tied LM head and, in the legacy
#: ``pytorch_model.bin``, each layer's causal-mask buffers ``attn.bias`` / ``attn.masked_bias``.
UNUSED_KEY = re.compile(r"^(lm_head\.weight|transformer\.h\.\d+\.attn\.(bias|masked_bias))$")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``pytorch_model.bin`` (``torch.load(weights_only=True)``) or ``model.safetensors``.

    Raises
    ------
    CheckpointError
        When the file is unreadable or not a mapping of names to tensors.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise many types for corrupted files
        msg = f"{path}: cannot read the checkpoint ({type(err).__name__}: {err}). Download it again."
        raise CheckpointError(msg) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        msg = f"{path}: expected a mapping of parameter names to tensors. Is this the official tGPT file?"
        raise CheckpointError(msg)
    return dict(state)


def load_official_state_dict(model: TGPTModel, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Copy an official state dict into ``model`` strictly.

    The one rename: a file saved from a bare ``GPT2Model`` (no ``transformer.`` prefix) gets the prefix.

    Raises
    ------
    CheckpointError
        Listing every missing, unexpected and mis-shaped key.
    """
    if not any(k.startswith("transformer.") for k in state):
        state = {f"transformer.{k}": v for k, v in state.items()}
    expected = model.state_dict()
    unused = sorted(k for k in state if k not in expected and UNUSED_KEY.match(k))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - set(unused))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if shapes:
        problems.append(f"mis-shaped keys {shapes}")
    if problems:
        msg = (f"{source}: does not match the tGPT architecture of its config.json: " + "; ".join(problems)
               + ". Use the config.json published with these weights.")
        raise CheckpointError(msg)
    if unused:
        log.info("%s: ignoring %d keys not run for embeddings (LM head, causal-mask buffers): %s", source,
                 len(unused), ", ".join(unused))
    with torch.no_grad():
        model.load_state_dict({k: state[k] for k in expected}, strict=True)


# --- the encoder ----------------------------------------------------------------------------------------

def _source(name: str, repo: str) -> WeightsSource:
    files = tuple(hf_file(repo, f) for f in (CONFIG_FILE, "pytorch_model.bin", *TOKENIZER_FILES))
    return WeightsSource(name=name, files=files, homepage=f"https://huggingface.co/{repo}",
                         license="see https://github.com/deeplearningplus/tGPT")


#: Official variants (the publisher gives no checksums). The number after the last dash is max_length.
WEIGHTS_SOURCES: dict[str, WeightsSource] = {
    "tgpt-1024-8-16-64": _source("tgpt-1024-8-16-64", HF_REPO),
    "tgpt-1024-8-16-128": _source("tgpt-1024-8-16-128", HF_REPO_128),
}
_MAX_LENGTH_IN_NAME = re.compile(r"gpt-\d+-\d+-\d+-(\d+)$")


class TGPTEncoder(HubModelEncoder):
    """tGPT cell embeddings (see the module docstring for the official contract).

    Parameters
    ----------
    module
        The loaded `TGPTModel`.
    tokenizer
        The `TGPTTokenizer` of the official ``tokenizer.json``.
    checkpoint_sha256
        sha256 of the weights file.
    """

    name: ClassVar[str] = "tgpt"
    family: ClassVar[Literal["scfm", "llm", "baseline"]] = "scfm"
    input_kind: ClassVar[Literal["counts", "nonnegative", "any"]] = "nonnegative"
    lora_targets: ClassVar[tuple[str, ...]] = ("c_attn",)
    shardable: ClassVar[bool] = True  # each cell is its own sequence
    #: Extra LoraConfig arguments: GPT-2's c_attn is a transformers Conv1D with an (in x out) weight.
    lora_options: ClassVar[Mapping[str, Any]] = {"fan_in_fan_out": True}
    weights_sources: ClassVar[Mapping[str, WeightsSource]] = WEIGHTS_SOURCES
    model_label: ClassVar[str] = "tGPT"
    weight_files: ClassVar[tuple[str, ...]] = WEIGHT_FILES
    folder_hint: ClassVar[str] = "Point to the official tGPT folder."
    known_options: ClassVar[frozenset[str]] = frozenset({"max_length", "attn_implementation", "chunk_size", "device"})
    module: TGPTModel
    tokenizer: TGPTTokenizer

    @property
    def embedding_dim(self) -> int:
        return self.module.config.n_embd

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_id

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path | None = None, **options: Any) -> TGPTEncoder:
        """Load the official Hugging Face folder (config.json, pytorch_model.bin, tokenizer.json).

        Parameters
        ----------
        path_or_name
            None (``tgpt-1024-8-16-64``), a variant name of `weights_sources`, the folder, or its weights file.
        **options
            ``max_length`` (default: the number ending the variant or folder name, else 64),
            ``attn_implementation`` ("sdpa"), ``chunk_size``, ``device``.

        Raises
        ------
        CheckpointError
            When a file is missing, unreadable, or does not fit the architecture (keys named).
        """
        cls._check_options(options)
        folder, weights_path = cls._locate_weights(path_or_name)
        # the variant or folder name, whose last number is max_length
        name = next(iter(cls.weights_sources)) if path_or_name is None else Path(path_or_name).name
        if not (folder / TOKENIZER_FILE).is_file():
            msg = f"{folder}: no {TOKENIZER_FILE}; the official folder ships it next to the weights."
            raise CheckpointError(msg)
        max_length = options.get("max_length")
        if max_length is None:
            found = _MAX_LENGTH_IN_NAME.search(name)
            max_length = int(found.group(1)) if found else MAX_LENGTH
        config = TGPTConfig.from_official(folder)
        tokenizer = TGPTTokenizer(folder / TOKENIZER_FILE, max_length=max_length,
                                  chunk_size=options.get("chunk_size", 4096))
        if tokenizer.vocab_size != config.vocab_size or max_length > config.n_positions:
            msg = (f"{folder}: tokenizer has {tokenizer.vocab_size} tokens and max_length {max_length}, the model "
                   f"vocab_size {config.vocab_size} and n_positions {config.n_positions}; they must fit.")
            raise CheckpointError(msg)
        module = build_tgpt_model(config, attn_implementation=options.get("attn_implementation", "sdpa"))
        load_official_state_dict(module, read_state_dict(weights_path), source=str(weights_path))
        log.info("loaded tGPT (%d layers, n_embd %d, max_length %d) from %s", config.n_layer, config.n_embd,
                 max_length, weights_path)
        return cls._assemble(module, tokenizer, weights_path, device=options.get("device"))

    def collate(self, tokens: TokenizedCells, rows: npt.NDArray[np.int64]) -> dict[str, torch.Tensor]:
        """Right-pad with ``<pad>`` = 0 to the batch's longest cell; ``token_type_ids`` are 0 as officially."""
        batch = super().collate(tokens, rows)
        batch["token_type_ids"] = torch.zeros(batch["input_ids"].shape, dtype=torch.int64)
        return batch

    def encode(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch.get("token_type_ids"))

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts["max_length"] = self.tokenizer.max_length
        return facts


def forward_flops(config: TGPTConfig, lengths: npt.ArrayLike) -> float:
    """Count the forward FLOPs (2 per multiply-add) of the transformer blocks for unpadded ``lengths``.

    Per layer and token: c_attn (3 d^2), c_proj (d^2) and the MLP (2 d f) MACs; per layer and sequence the
    causal attention's scores and weighted values (2 L^2 d MACs, counted in full as SDPA computes them).
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    d, f = config.n_embd, config.inner_size
    per_token = 4 * d * d + 2 * d * f
    return float(2.0 * config.n_layer * (per_token * lengths.sum() + 2 * d * (lengths ** 2).sum()))


__all__ = ["TGPTConfig", "TGPTEncoder", "TGPTModel", "TGPTTokenizer", "clean_symbols", "forward_flops",
           "load_official_state_dict", "read_state_dict"]
