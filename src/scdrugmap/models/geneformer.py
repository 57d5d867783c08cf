"""Geneformer V1 and V2 as a scDrugMap encoder: rank-value tokenizer and BERT cell embeddings.

Papers: Theodoris et al., "Transfer learning enables predictions in network biology", Nature 618,
616-624 (2023) (V1, Genecorpus-30M); Chen et al., "Quantized multi-task learning for context-specific
representations of gene network dynamics", bioRxiv 2024.08.16.608180 (V2, ~104M cells).
Official code and weights: https://huggingface.co/ctheodoris/Geneformer @ ``05fcbeb8a27d49e0a7a4349152202ee2c1cbfd28``
(``geneformer/tokenizer.py``: ``TranscriptomeTokenizer``, ``sum_ensembl_ids``, ``rank_genes``;
``geneformer/emb_extractor.py``: ``EmbExtractor.extract_embs``/``get_embs``;
``geneformer/perturber_utils.py``: ``load_model``, ``mean_nonpadding_embs``).

Input
    Non-negative expression; the authors feed raw counts with ``obs['n_counts']`` (total counts per cell) and
    ``var['ensembl_id']``. Each cell's ranking depends only on ``count / median[gene]`` (``n_counts`` is a
    per-cell constant), so any per-cell-scaled expression (TPM) ranks alike.
Tokens
    Each cell's dictionary genes ranked by ``count / n_counts * 10_000 / median[gene]``, truncated to 2,048
    genes (V1) or 4,094 genes framed by ``<cls>`` and ``<eos>`` (V2): the official rank-value tokenizer,
    vectorised in `scdrugmap.models.geneformer_tokenizer` (importable without torch; its docstring gives
    the official contract, the tie rule and the quirks).
Model
    The Hugging Face ``BertModel`` of ``transformers`` (the published ``BertForMaskedLM`` without its
    pretraining head), with SDPA attention. Parameter names are the official state-dict keys. Variants
    are subfolders of the official repository: ``Geneformer-V1-10M`` (formerly ``gf-6L-30M-i2048``),
    ``gf-12L-30M-i2048`` (V1, 12 layers), ``gf-12L-95M-i4096`` (V2, gc95M), ``Geneformer-V2-104M``,
    ``Geneformer-V2-104M_CLcancer`` and ``Geneformer-V2-316M`` (see `WEIGHTS_SOURCES`).
Pooling
    ``EmbExtractor(emb_mode="cell", emb_layer=-1)``: the mean over the non-padding positions of
    ``hidden_states[n_layers - 1]``, the output of the penultimate layer; V2 leaves ``<cls>`` and ``<eos>``
    out of the mean. ``pooling="cls"`` gives the ``<cls>`` state (``emb_mode="cls"``, V2 only); ``emb_layer=0``
    the last layer. Only the layers up to the chosen one are run.

Quirks of the official code and what this module does about them:

* ``EmbExtractor`` hard-codes CUDA; here any device works.
* ``EmbExtractor(max_ncells=1000)`` silently sub-samples larger inputs; every cell is embedded here.
* ``EmbExtractor``'s default ``emb_mode`` is ``"cls"`` for V2 and ``"cell"`` for V1; scDrugMap pools with
  the mean for both by default (``pooling="cls"`` gives the V2 default).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from scdrugmap.errors import CheckpointError, ConfigError
from scdrugmap.models.base import HubModelEncoder, TokenizedCells
from scdrugmap.models.geneformer_tokenizer import (
    DICTIONARY_FILES,
    PAD_TOKEN,
    V1_INPUT_SIZE,
    V2_INPUT_SIZE,
    GeneformerTokenizer,
    GeneformerVocabulary,
    find_dictionary,
    load_dictionary,
    normalise_counts,
    token_sequences,
)
from scdrugmap.models.weights import WeightsSource, hf_file

if TYPE_CHECKING:
    import numpy.typing as npt

log = logging.getLogger(__name__)

# --- official constants ---------------------------------------------------------------------------------

HF_REPO = "ctheodoris/Geneformer"
#: The Hugging Face commit the golden fixture was made from (layout: Geneformer-V1-10M/, Geneformer-V2-*/).
HF_REVISION = "05fcbeb8a27d49e0a7a4349152202ee2c1cbfd28"
#: A commit from before the 2025 re-organisation, for the folders it removed (gf-12L-30M-i2048/,
#: gf-12L-95M-i4096/ and the *_gc95M.pkl dictionaries). Taken from a public report of that commit; the
#: file list at it could not be checked offline.
HF_LEGACY_REVISION = "a13a2cfc39aeaf4a2d223502930a6d041277d6f0"

#: emb_extractor.py: EmbExtractor(emb_layer=-1) -> hidden_states[n_layers - 1], the 2nd-to-last layer.
DEFAULT_EMB_LAYER = -1
#: Vocabulary sizes of the two dictionaries (gc30M: 25,426 tokens; gc104M == gc95M: 20,275 tokens).
V1_VOCAB_SIZE = 25_426
V2_VOCAB_SIZE = 20_275
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"


# --- the model ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GeneformerConfig:
    """The BERT configuration of a Geneformer model; defaults are the published Geneformer-V1-10M."""

    vocab_size: int = V1_VOCAB_SIZE
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 512
    hidden_act: str = "relu"
    max_position_embeddings: int = V1_INPUT_SIZE
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.02
    attention_probs_dropout_prob: float = 0.02
    position_embedding_type: str = "absolute"

    @classmethod
    def from_official(cls, path: str | Path) -> GeneformerConfig:
        """Read an official ``config.json`` (a folder or the file); keys this model does not use are ignored.

        Raises
        ------
        CheckpointError
            When the file is missing or unreadable, or describes something other than an absolute-position BERT.
        """
        path = Path(path)
        file = path / CONFIG_FILE if path.is_dir() else path
        try:
            raw = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            msg = f"{file}: cannot read the Geneformer config ({err}). Each official model folder has one."
            raise CheckpointError(msg) from err
        if raw.get("model_type", "bert") != "bert" or raw.get("position_embedding_type", "absolute") != "absolute":
            msg = (f"{file}: model_type={raw.get('model_type')!r}, position_embedding_type="
                   f"{raw.get('position_embedding_type')!r}; Geneformer is a BERT with absolute positions.")
            raise CheckpointError(msg)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names and v is not None})

    def to_transformers(self, attn_implementation: str = "sdpa") -> Any:
        """Return the ``transformers.BertConfig`` of this model."""
        from transformers import BertConfig

        values = {f.name: getattr(self, f.name) for f in fields(self)}
        # PretrainedConfig takes attn_implementation through **kwargs; the transformers stubs omit it.
        return BertConfig(**values, attn_implementation=attn_implementation)  # type: ignore[call-arg]


#: Published architectures (config.json of each official folder), by official subfolder name.
PUBLISHED_CONFIGS: dict[str, GeneformerConfig] = {
    "Geneformer-V1-10M": GeneformerConfig(),
    "gf-12L-30M-i2048": GeneformerConfig(hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                                         intermediate_size=1024),
    "Geneformer-V2-104M": GeneformerConfig(vocab_size=V2_VOCAB_SIZE, hidden_size=768, num_hidden_layers=12,
                                           num_attention_heads=12, intermediate_size=3072,
                                           max_position_embeddings=V2_INPUT_SIZE, hidden_dropout_prob=0.1,
                                           attention_probs_dropout_prob=0.1),
    "Geneformer-V2-316M": GeneformerConfig(vocab_size=V2_VOCAB_SIZE, hidden_size=1152, num_hidden_layers=18,
                                           num_attention_heads=18, intermediate_size=4608,
                                           max_position_embeddings=V2_INPUT_SIZE, hidden_dropout_prob=0.1,
                                           attention_probs_dropout_prob=0.1),
}


class GeneformerModel(nn.Module):
    """``transformers.BertModel`` (as ``bert``) plus the official cell pooling.

    Parameters
    ----------
    config
        The architecture.
    emb_layer
        ``EmbExtractor``'s ``emb_layer``: -1 for the penultimate layer's output, 0 for the last layer's.
    pooling
        ``"mean"`` (``emb_mode="cell"``) or ``"cls"`` (``emb_mode="cls"``).
    exclude_special
        Leave position 0 and the last position out of the mean (V2: ``<cls>`` and ``<eos>``).
    attn_implementation
        ``"sdpa"`` (default) or ``"eager"``, as in ``transformers``.
    """

    def __init__(self, config: GeneformerConfig, *, emb_layer: int = DEFAULT_EMB_LAYER,
                 pooling: Literal["mean", "cls"] = "mean", exclude_special: bool = False,
                 attn_implementation: str = "sdpa") -> None:
        from transformers import BertModel

        super().__init__()
        if not -config.num_hidden_layers <= emb_layer <= 0:
            msg = f"emb_layer={emb_layer}; expected -{config.num_hidden_layers}..0 (0 = last layer, -1 = penultimate)."
            raise ConfigError(msg)
        if pooling not in ("mean", "cls"):
            msg = f"pooling={pooling!r}; expected 'mean' or 'cls'."
            raise ConfigError(msg)
        self.config = config
        self.bert = BertModel(config.to_transformers(attn_implementation), add_pooling_layer=False)
        #: hidden_states index of EmbExtractor: layer_to_quant = n_layers + emb_layer.
        self.n_layers_run = config.num_hidden_layers + emb_layer
        self.pooling = pooling
        self.exclude_special = exclude_special

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      n_layers: int | None = None) -> torch.Tensor:
        """Return ``hidden_states[n_layers]`` of ``BertModel`` (0 = embedding output), running only those layers."""
        n_layers = self.n_layers_run if n_layers is None else n_layers
        hidden = self.bert.embeddings(input_ids=input_ids)
        if bool(attention_mask.all()):
            mask = None
        elif self.bert.config._attn_implementation == "sdpa":
            mask = attention_mask.bool()[:, None, None, :]
        else:  # eager: an additive mask, as transformers builds it
            mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.bert.encoder.layer[:n_layers]:
            hidden = layer(hidden, mask)
        return hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, attention_mask)
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.to(hidden.dtype)
        if self.exclude_special:  # mean_nonpadding_embs over h[:, 1:] with length - 2
            lengths = attention_mask.sum(dim=1, keepdim=True)
            positions = torch.arange(weights.shape[1], device=weights.device)[None, :]
            weights = ((positions >= 1) & (positions < lengths - 1)).to(hidden.dtype)
        total = torch.einsum("bld,bl->bd", hidden, weights)
        return total / weights.sum(dim=1, keepdim=True)


def build_geneformer_model(config: GeneformerConfig, **options: Any) -> GeneformerModel:
    """Instantiate `GeneformerModel` in eval mode (use ``with torch.device("meta")`` for a shape-only model)."""
    return GeneformerModel(config, **options).eval()


# --- the loader -----------------------------------------------------------------------------------------

#: Keys of the official files for parts this encoder never runs: the masked-LM head (cls.*), the pooler of
#: BertModel checkpoints, and the position_ids buffer that older transformers wrote.
UNUSED_PREFIXES = ("cls.", "bert.pooler.")
UNUSED_KEYS = ("bert.embeddings.position_ids",)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` or ``pytorch_model.bin`` (``torch.load(weights_only=True)``).

    Raises
    ------
    CheckpointError
        When the file is unreadable or holds no tensors.
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
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        msg = f"{path}: expected a mapping of parameter names to tensors. Is this an official Geneformer file?"
        raise CheckpointError(msg)
    return dict(state)


def load_official_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
                             prefix: str = "bert.") -> None:
    """Copy an official state dict into ``model`` strictly.

    The one rename: files saved from a bare ``BertModel`` (keys without ``bert.``) get the prefix.
    Keys of parts never run (`UNUSED_PREFIXES`, `UNUSED_KEYS`) are listed in one log line.

    Raises
    ------
    CheckpointError
        Listing every missing, unexpected and mis-shaped key.
    """
    if not any(k.startswith(prefix) for k in state):
        state = {prefix + k: v for k, v in state.items()}
    expected = model.state_dict()
    unused = sorted(k for k in state if k not in expected and (k.startswith(UNUSED_PREFIXES) or k in UNUSED_KEYS))
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
        msg = (f"{source}: does not match the Geneformer architecture of its config.json: " + "; ".join(problems)
               + ". Use the config.json that was published with these weights.")
        raise CheckpointError(msg)
    if unused:
        log.info("%s: ignoring %d keys of parts not run for embeddings: %s", source, len(unused), ", ".join(unused))
    with torch.no_grad():
        model.load_state_dict({k: state[k] for k in expected}, strict=True)


# --- the encoder ----------------------------------------------------------------------------------------

def _source(name: str, folder: str, weights: str, version: Literal["V1", "V2"], *,
            revision: str = HF_REVISION) -> WeightsSource:
    """Describe one official model folder plus the dictionaries of its version."""
    if version == "V1":
        dictionaries = (
            hf_file(HF_REPO, "geneformer/gene_dictionaries_30m/token_dictionary_gc30M.pkl", revision=revision,
                    sha256="ab9dc40973fa5224d77b793e2fd114cacf3d08423ed9c4c49caf0ba9c7f218f1"),
            hf_file(HF_REPO, "geneformer/gene_dictionaries_30m/gene_median_dictionary_gc30M.pkl", revision=revision,
                    sha256="b3b589bb5ec75040d05fc44dd6bf0184cf87f3c362cf158d196a6ed3b7fe5f39"),
            hf_file(HF_REPO, "geneformer/gene_dictionaries_30m/ensembl_mapping_dict_gc30M.pkl", revision=revision),
        )
    else:
        tag = "gc104M" if revision == HF_REVISION else "gc95M"
        dictionaries = (
            hf_file(HF_REPO, f"geneformer/token_dictionary_{tag}.pkl", revision=revision,
                    sha256="67c445f4385127adfc48dcc072320cd65d6822829bf27dd38070e6e787bc597f"),
            hf_file(HF_REPO, f"geneformer/gene_median_dictionary_{tag}.pkl", revision=revision,
                    sha256="a51c53f6a771d64508dfaf61529df70e394c53bd20856926117ae5d641a24bf5"),
            hf_file(HF_REPO, f"geneformer/ensembl_mapping_dict_{tag}.pkl", revision=revision,
                    sha256="0819bcbd869cfa14279449b037eb9ed1d09a91310e77bd1a19d927465030e95c"),
        )
    files = (hf_file(HF_REPO, f"{folder}/{CONFIG_FILE}", revision=revision),
             hf_file(HF_REPO, f"{folder}/{weights}", revision=revision), *dictionaries)
    return WeightsSource(name=name, files=files, homepage=f"https://huggingface.co/{HF_REPO}/tree/{revision}/{folder}",
                         license="Apache-2.0")


#: Official variants (cache name -> source). Dictionary checksums are those of the official files as
#: recorded in ../shared/golden/geneformer/dictionary_subset.json; the publisher gives none for the weights.
WEIGHTS_SOURCES: dict[str, WeightsSource] = {
    "geneformer-v1-10m": _source("geneformer-v1-10m", "Geneformer-V1-10M", "model.safetensors", "V1"),
    "geneformer-v1-12l-30m": _source("geneformer-v1-12l-30m", "gf-12L-30M-i2048", "pytorch_model.bin", "V1",
                                     revision=HF_LEGACY_REVISION),
    "geneformer-v2-104m": _source("geneformer-v2-104m", "Geneformer-V2-104M", "model.safetensors", "V2"),
    "geneformer-v2-104m-clcancer": _source("geneformer-v2-104m-clcancer", "Geneformer-V2-104M_CLcancer",
                                           "model.safetensors", "V2"),
    "geneformer-v2-316m": _source("geneformer-v2-316m", "Geneformer-V2-316M", "model.safetensors", "V2"),
    "geneformer-v2-95m": _source("geneformer-v2-95m", "gf-12L-95M-i4096", "model.safetensors", "V2",
                                 revision=HF_LEGACY_REVISION),
}
#: Official subfolder names accepted as variant names too.
OFFICIAL_FOLDERS = {"geneformer-v1-10m": "Geneformer-V1-10M", "geneformer-v1-12l-30m": "gf-12L-30M-i2048",
                    "geneformer-v2-104m": "Geneformer-V2-104M",
                    "geneformer-v2-104m-clcancer": "Geneformer-V2-104M_CLcancer",
                    "geneformer-v2-316m": "Geneformer-V2-316M", "geneformer-v2-95m": "gf-12L-95M-i4096"}


def _infer_version(config: GeneformerConfig) -> Literal["V1", "V2"]:
    if config.vocab_size == V1_VOCAB_SIZE:
        return "V1"
    if config.vocab_size == V2_VOCAB_SIZE:
        return "V2"
    return "V1" if config.max_position_embeddings <= V1_INPUT_SIZE else "V2"


class GeneformerEncoder(HubModelEncoder):
    """Geneformer V1/V2 cell embeddings (see the module docstring for the official contract).

    Build it with `from_pretrained`; ``tokenize`` / ``tokenize_h5ad`` give `TokenizedCells` whose
    ``arrays`` hold the flat ``input_ids`` and their ``offsets``.

    Parameters
    ----------
    module
        The loaded `GeneformerModel`.
    tokenizer
        The `GeneformerTokenizer` of the model's dictionaries.
    checkpoint_sha256
        sha256 of the weights file.
    """

    name: ClassVar[str] = "geneformer"
    family: ClassVar[Literal["scfm", "llm", "baseline"]] = "scfm"
    input_kind: ClassVar[Literal["counts", "nonnegative", "any"]] = "nonnegative"
    lora_targets: ClassVar[tuple[str, ...]] = ("query", "key", "value")
    shardable: ClassVar[bool] = True  # each cell is its own sequence
    weights_sources: ClassVar[Mapping[str, WeightsSource]] = WEIGHTS_SOURCES
    model_label: ClassVar[str] = "Geneformer"
    weight_files: ClassVar[tuple[str, ...]] = WEIGHT_FILES
    folder_hint: ClassVar[str] = "Point to an official Geneformer model folder."
    known_options: ClassVar[frozenset[str]] = frozenset({
        "model_version", "token_dictionary_file", "gene_median_file", "gene_mapping_file", "model_input_size",
        "emb_layer", "pooling", "attn_implementation", "chunk_size", "n_threads", "device"})
    module: GeneformerModel
    tokenizer: GeneformerTokenizer

    @property
    def embedding_dim(self) -> int:
        return self.module.config.hidden_size

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.vocabulary.token_ids[PAD_TOKEN]

    @property
    def version(self) -> str:
        return self.tokenizer.vocabulary.version

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path | None = None, **options: Any) -> GeneformerEncoder:
        """Load an official Geneformer model folder with its dictionaries.

        Parameters
        ----------
        path_or_name
            None (the default variant, ``geneformer-v1-10m``), a variant name of `weights_sources` or its
            official folder name (``Geneformer-V2-104M``), a model folder (``config.json`` +
            ``model.safetensors`` or ``pytorch_model.bin``), or the weights file itself. Dictionaries are
            looked for in the folder, then where a clone of the official repository keeps them
            (``../geneformer/``, ``../geneformer/gene_dictionaries_30m/``).
        **options
            ``model_version`` ("V1"/"V2"; inferred from the vocabulary size), ``token_dictionary_file``,
            ``gene_median_file``, ``gene_mapping_file`` (None: identity on the token dictionary, the 2023 V1
            behaviour), ``model_input_size``, ``emb_layer`` (-1), ``pooling`` ("mean"/"cls"),
            ``attn_implementation`` ("sdpa"), ``chunk_size``, ``n_threads``, ``device``.

        Raises
        ------
        CheckpointError
            When a file is missing, unreadable or does not fit the architecture (keys named).
        ConfigError
            For an unknown option value.
        """
        cls._check_options(options)
        by_folder = {v.lower(): k for k, v in OFFICIAL_FOLDERS.items()}
        key = None if path_or_name is None else by_folder.get(str(path_or_name).lower(), str(path_or_name))
        folder, weights_path = cls._locate_weights(key)
        config = GeneformerConfig.from_official(folder)
        version = options.get("model_version") or _infer_version(config)
        if version not in ("V1", "V2"):
            msg = f"model_version={version!r}; expected 'V1' or 'V2'."
            raise ConfigError(msg)
        vocabulary = cls._vocabulary(folder, version, options)
        top = max(vocabulary.token_ids.values())
        if top >= config.vocab_size:
            msg = (f"{folder}: the {version} token dictionary has ids up to {top} but the model's vocab_size is "
                   f"{config.vocab_size}. Use the dictionaries of this model's version (model_version=).")
            raise CheckpointError(msg)
        tokenizer = GeneformerTokenizer(vocabulary, model_input_size=options.get("model_input_size"),
                                        chunk_size=options.get("chunk_size", 2048),
                                        n_threads=options.get("n_threads"))
        if tokenizer.model_input_size > config.max_position_embeddings:
            msg = (f"model_input_size={tokenizer.model_input_size} exceeds the model's "
                   f"max_position_embeddings={config.max_position_embeddings}.")
            raise ConfigError(msg)
        pooling = options.get("pooling", "mean")
        if pooling == "cls" and version == "V1":
            msg = "pooling='cls' needs a <cls> token, which only Geneformer V2 has; use pooling='mean'."
            raise ConfigError(msg)
        module = build_geneformer_model(config, emb_layer=options.get("emb_layer", DEFAULT_EMB_LAYER),
                                        pooling=pooling, exclude_special=vocabulary.special_tokens,
                                        attn_implementation=options.get("attn_implementation", "sdpa"))
        load_official_state_dict(module, read_state_dict(weights_path), source=str(weights_path))
        log.info("loaded Geneformer %s (%d layers, hidden %d) from %s", version, config.num_hidden_layers,
                 config.hidden_size, weights_path)
        return cls._assemble(module, tokenizer, weights_path, device=options.get("device"))

    @staticmethod
    def _vocabulary(folder: Path, version: Literal["V1", "V2"], options: Mapping[str, Any]) -> GeneformerVocabulary:
        token_file = options.get("token_dictionary_file") or find_dictionary(folder, version, "token")
        median_file = options.get("gene_median_file") or find_dictionary(folder, version, "median")
        if token_file is None or median_file is None:
            names = DICTIONARY_FILES[version]["token"][0], DICTIONARY_FILES[version]["median"][0]
            msg = (f"{folder}: no Geneformer {version} dictionaries ({', '.join(names)}) next to the model. "
                   "Pass token_dictionary_file= and gene_median_file=, or download the variant.")
            raise CheckpointError(msg)
        if "gene_mapping_file" in options:
            mapping_file = options["gene_mapping_file"]
        else:
            mapping_file = find_dictionary(folder, version, "mapping")
            if mapping_file is None and version == "V2":
                msg = (f"{folder}: no {DICTIONARY_FILES['V2']['mapping'][0]}; the V2 tokenizer maps ids through it. "
                       "Pass gene_mapping_file= (None for the identity).")
                raise CheckpointError(msg)
            if mapping_file is None:
                log.info("%s: no gc30M mapping dictionary; Ensembl ids map to themselves (2023 V1 tokenizer)", folder)
        return GeneformerVocabulary.from_files(token_file, median_file, mapping_file, version=version)

    # -- tokenize (the tokenizer's) / collate (right-padded with <pad>, as pad_tensor_list) / encode --

    def tokenize_h5ad(self, path: str | Path, *, layer: str | None = None,
                      chunk_size: int | None = None) -> TokenizedCells:
        """Tokenize an ``.h5ad`` on disk in chunks of rows (see `GeneformerTokenizer.tokenize_h5ad`)."""
        return self.tokenizer.tokenize_h5ad(path, layer=layer, chunk_size=chunk_size)

    def encode(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts.update(version=self.version, model_input_size=self.tokenizer.model_input_size,
                     emb_layer=self.module.n_layers_run - self.module.config.num_hidden_layers,
                     pooling=self.module.pooling)
        return facts


def forward_flops(config: GeneformerConfig, lengths: npt.ArrayLike, n_layers: int | None = None) -> float:
    """Count the multiply-add FLOPs (2 per MAC) of the encoder layers for sequences of ``lengths`` (no padding).

    Per layer and token: Q, K, V and output projections (4 h^2) and the feed-forward (2 h f) MACs;
    per layer and sequence: scores and weighted values (2 L^2 h) MACs. Embeddings and pooling are ignored.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    layers = config.num_hidden_layers if n_layers is None else n_layers
    h, f = config.hidden_size, config.intermediate_size
    per_token = 4 * h * h + 2 * h * f
    return float(2.0 * layers * (per_token * lengths.sum() + 2 * h * (lengths ** 2).sum()))


__all__ = ["GeneformerConfig", "GeneformerEncoder", "GeneformerModel", "GeneformerTokenizer",
           "GeneformerVocabulary", "forward_flops", "load_dictionary", "load_official_state_dict",
           "normalise_counts", "read_state_dict", "token_sequences"]
