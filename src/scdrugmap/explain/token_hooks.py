"""Where integrated gradients reach into each token model: one hook per model, the one place that knows its inputs.

`scdrugmap.explain.attribution.attribute_tokens` runs integrated gradients (IG) on a model's *input embedding*:
the per-position vectors that are summed and fed to its first transformer layer. IG moves that tensor on a straight
line from a baseline (the same batch with every gene position replaced by a neutral input) to the cell's own,
sums the attributions over the embedding dimension per position, and maps positions to the data's genes. A
`TokenAttributionHook` tells it, per model, where that tensor is (`TokenAttributionHook.embedding`), what the
baseline batch is (`TokenAttributionHook.baseline`) and which gene each position stands for
(`TokenAttributionHook.gene_columns`). Everything else in the batch (attention masks, positions, special tokens,
CLS, T/S tokens) is held at the cell's own values, so non-gene positions get exactly 0 and the attributions of a
cell sum to P(cell) - P(baseline batch) up to the quadrature error (IG's completeness).

============  =============================================  ===================================  ======================================
model         embedding point (IG interpolates here)         baseline at gene positions           position -> gene
============  =============================================  ===================================  ======================================
geneformer    ``word_embeddings`` output                     the ``<pad>`` token                  token id -> gene (token dictionary)
tgpt          ``transformer.drop``: wte(ids) + wpe + wte(0)  the ``<pad>`` token                  token id -> symbol (one-token symbols)
scgpt         ``transformer_encoder`` input: gene + value    ``<pad>`` gene and pad value         gene id -> gene (vocab.json)
scfoundation  ``encoder`` input: value + gene position       value 0 (gene kept, unexpressed)     position id -> gene (gene index)
uce           ``pos_encoder`` input: projected proteins      the ``[PAD]`` token                  token id -> gene (protein table)
scbert        ``token_emb`` output: expression bins          bin 0 (unexpressed), gene2vec kept   position -> reference gene
celllm        ``token_emb`` output: expression bins          bin 0 (lowest), gene positions kept  ``gene_pos`` -> reference gene
cellplm       terms log1p(x_g) emb[g] of the cell vector     the pass's mean cell vector          the genes of the pass
minilm, llm   ``get_input_embeddings()`` output              the pad token (Llama 3: EOS)         sub-word tokens -> gene (offsets)
============  =============================================  ===================================  ======================================

Why these baselines: models that read gene tokens (Geneformer, tGPT, scGPT, UCE, the language models) learn
what a gene's *presence* does, so the baseline removes the gene token (padding, as Geneformer's own in-silico
deletion removes it); models that read every gene of a fixed list with a value (scBERT, scFoundation) or the
expressed genes with a value (CellLM) learn what a gene's *level* does, so the baseline keeps the gene and sets
its value to the model's own "not expressed" (scBERT bin 0, as for the other ~16,900 genes of a cell;
scFoundation's value-0 embedding, how its decoder reads unexpressed genes) or, for CellLM, which never sees
unexpressed genes, its lowest bin.

Special cases
-------------
* scBERT, CellLM: IG runs with ``key_max="cell"`` (see `scdrugmap.models._performer`), so every interpolated
  cell is its own function; the official per-batch key maximum would tie the path points of one forward pass
  together (the two differ by < 3e-3 in the hidden states on the golden fixtures).
* CellPLM reads a cell as one vector, ``v = sum_g log1p(x_g) emb[g]``, and cells attend to the other cells of
  their forward pass; the cluster indicator of its latent layer is a hard random (Gumbel) sample. Each cell is
  attributed on its own: its vector moves from the baseline to its value while the other cells of the pass keep
  theirs, and the cluster indicator stays the one drawn for the cell's prediction. The baseline is the pass's
  mean cell vector, not 0: the GroupNorm after the first Linear makes the model nearly blind to the vector's
  scale, so from 0 the whole change happens within the first few percent of the path (on the golden fixture
  P jumps from 0.32 to 0.91 by 5% of it) and no quadrature of a few dozen steps resolves it (the same reason the
  expression baselines use the mean cell). Since v is linear in the log1p weights, gene g gets
  ``(log1p(x_g) - mean log1p(x_g)) emb[g] . G``, G the path-averaged gradient, for every gene of the pass (a
  gene the cell lacks gets the effect of lacking it). This costs one forward pass of the whole pass per cell and
  step (quadratic in the cells attributed together); the passes are the model's own
  (`CellPLMEncoder.iter_batches`), so the baseline is the mean of the sampled cells of a group.
* tGPT: the official call adds ``wte[<pad>]`` (token type 0) to every position. ``wte`` runs twice per forward,
  so the point is after that sum: the embedding dropout's output (the identity in eval mode). A symbol the
  tokenizer splits into several tokens, or an unknown one, is not attributed.
* Language models: a gene symbol is several sub-word tokens; each token's span in the gene sentence names its
  gene, and the gene's attribution is the sum over its tokens. A fast (Rust) tokenizer is needed for the spans.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from scdrugmap.errors import ConfigError

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt
    import torch

    from scdrugmap.models.base import Encoder, TokenizedCells, TorchEncoder

#: Per batch: (row positions in the tokens, the collated batch on the CPU) -> (cells x positions) var column of
#: each position, -1 where the position is not a gene of the data (special tokens, padding, unknown genes).
GeneColumns = Callable[["npt.NDArray[np.int64]", Mapping[str, Any]], "npt.NDArray[np.int64]"]
#: (encoder, batch on the device, (cells x positions) int64 var columns, head: embeddings -> P, steps, sequences per
#: pass) -> ((cells x positions) attributions, P(cell), P(baseline)), all numpy.
Integrate = Callable[["TorchEncoder", dict[str, Any], "npt.NDArray[np.int64]",
                      Callable[["torch.Tensor"], "torch.Tensor"], int, int],
                     tuple["npt.NDArray[np.float32]", "npt.NDArray[np.float32]", "npt.NDArray[np.float32]"]]


@dataclass(frozen=True)
class TokenAttributionHook:
    """How `attribute_tokens` reaches into a token model: the one place that knows a model's inputs.

    Attributes
    ----------
    gene_columns
        (encoder, adata, tokens, layer) -> `GeneColumns`: prepared once per data set (``tokens`` are
        ``encoder.tokenize(adata, layer=layer)``), then called per batch.
    embedding
        encoder -> the module at whose output (or first input, with ``embedding_input``) the per-position input
        embedding is; IG interpolates that tensor.
    baseline
        (encoder, batch, is_gene) -> the baseline batch: ``batch`` with the gene positions (``is_gene``, a bool
        tensor shaped like the positions) replaced by the neutral input. Only the embedding point may change.
    embedding_input
        IG at the first positional input of ``embedding`` instead of its output.
    description
        The embedding point and the baseline, in words (written to the biomarker facts).
    context
        encoder -> a context manager that the whole attribution runs in (e.g. a per-cell key maximum).
    integrate
        Instead of ``embedding``/``baseline``: the model's own integration of one batch (`Integrate`).
    official_batches
        Cells interact within a forward pass: attribute in the passes ``encoder.iter_batches`` gives by default,
        not in length buckets of ``batch_size`` cells.
    """

    gene_columns: Callable[[TorchEncoder, ad.AnnData, TokenizedCells, str | None], GeneColumns]
    embedding: Callable[[TorchEncoder], torch.nn.Module] | None = None
    baseline: Callable[[TorchEncoder, Mapping[str, Any], torch.Tensor], dict[str, Any]] | None = None
    embedding_input: bool = False
    description: str = ""
    context: Callable[[TorchEncoder], contextlib.AbstractContextManager[Any]] | None = None
    integrate: Integrate | None = None
    official_batches: bool = False


# --- shared pieces ----------------------------------------------------------------------------------------

def submodule(encoder: TorchEncoder, path: str) -> torch.nn.Module:
    """Return ``encoder.module.<path>`` (dotted), or raise naming the path (the hook needs updating)."""
    module = getattr(encoder, "module", None)
    if module is None:
        msg = f"{encoder.name}: no .module to attribute through."
        raise ConfigError(msg)
    try:
        return module.get_submodule(path)
    except AttributeError as err:
        msg = f"{encoder.name}: no submodule {path!r} ({err}); the token attribution hook needs updating."
        raise ConfigError(msg) from err


def module_named(encoder: TorchEncoder, suffix: str) -> torch.nn.Module:
    """Return the first submodule of ``encoder.module`` whose name ends with ``suffix`` (also under peft)."""
    module = getattr(encoder, "module", None)
    if module is None:
        msg = f"{encoder.name}: no .module to attribute through."
        raise ConfigError(msg)
    for name, child in module.named_modules():
        if name.endswith(suffix):
            return child
    msg = f"{encoder.name}: no submodule named *{suffix}; the token attribution hook needs updating."
    raise ConfigError(msg)


def lookup_table(keys: npt.ArrayLike, columns: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Return a dense array mapping each key (a non-negative id) to its column, -1 elsewhere; the first column of
    a repeated key wins (summed duplicates: the first column, as the tokenizers keep one token per id)."""
    keys = np.asarray(keys, dtype=np.int64)
    columns = np.asarray(columns, dtype=np.int64)
    table = np.full(int(keys.max(initial=-1)) + 2, -1, dtype=np.int64)
    order = np.arange(keys.size)[::-1]  # write the last first, so the first occurrence stays
    table[keys[order]] = columns[order]
    return table


def look_up(table: npt.NDArray[np.int64], ids: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Return ``table[ids]`` with -1 for ids outside the table."""
    ids = np.asarray(ids, dtype=np.int64)
    inside = (ids >= 0) & (ids < table.size)
    return np.where(inside, table[np.clip(ids, 0, table.size - 1)], -1)


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def id_columns(key: str, table: npt.NDArray[np.int64]) -> GeneColumns:
    """Return a `GeneColumns` that reads ``batch[key]`` (ids per position) through ``table``."""
    return lambda rows, batch: look_up(table, _numpy(batch[key]))


def replace_at_genes(**values: Callable[[TorchEncoder], float | int]) -> Callable[
        [TorchEncoder, Mapping[str, Any], torch.Tensor], dict[str, Any]]:
    """Return a baseline that writes ``values[key](encoder)`` into ``batch[key]`` at every gene position."""
    import torch

    def baseline(encoder: TorchEncoder, batch: Mapping[str, Any], is_gene: torch.Tensor) -> dict[str, Any]:
        out = dict(batch)
        for key, value_of in values.items():
            tensor = batch[key]
            out[key] = torch.where(is_gene.to(tensor.device), torch.full_like(tensor, value_of(encoder)), tensor)
        return out

    return baseline


@contextlib.contextmanager
def _per_cell_key_max(encoder: TorchEncoder) -> Iterator[None]:
    """Run with ``key_max="cell"`` (Performer models), restoring the encoder's own setting afterwards."""
    before = encoder.key_max  # type: ignore[attr-defined]
    encoder.key_max = "cell"  # type: ignore[attr-defined]
    try:
        yield
    finally:
        encoder.key_max = before  # type: ignore[attr-defined]


# --- Geneformer -------------------------------------------------------------------------------------------

def _geneformer_vocabulary(encoder: TorchEncoder) -> Any:
    vocabulary = getattr(getattr(encoder, "tokenizer", None), "vocabulary", None)
    if vocabulary is None:
        msg = f"{encoder.name}: no tokenizer.vocabulary; the Geneformer attribution hook needs updating."
        raise ConfigError(msg)
    return vocabulary


def geneformer_token_genes(encoder: TorchEncoder, adata: ad.AnnData) -> dict[int, str]:
    """Return {token id: var name} of the data's genes in Geneformer's token dictionary (special tokens left out)."""
    from scdrugmap.models import geneformer

    vocabulary = _geneformer_vocabulary(encoder)
    key = getattr(geneformer, "GENE_ID_KEY", "ensembl_id")
    special = set(getattr(geneformer, "SPECIAL_TOKENS", ()))
    ids = adata.var[key].to_numpy() if key in adata.var else adata.var_names.to_numpy()
    names = np.asarray(adata.var_names.astype(str))
    genes: dict[int, str] = {}
    for name, gene_id in zip(names, ids, strict=True):
        collapsed = vocabulary.mapping.get(str(gene_id).upper())
        if collapsed is not None and collapsed not in special:
            genes.setdefault(int(vocabulary.token_ids[collapsed]), str(name))  # summed duplicates: first column
    return genes


def _geneformer_columns(encoder: TorchEncoder, adata: ad.AnnData, tokens: TokenizedCells,
                        layer: str | None) -> GeneColumns:
    position = {name: i for i, name in enumerate(adata.var_names.astype(str))}
    token_genes = geneformer_token_genes(encoder, adata)
    table = lookup_table(list(token_genes), [position[g] for g in token_genes.values()])
    return id_columns("input_ids", table)


def geneformer_hook(encoder: Encoder) -> TokenAttributionHook:
    """Geneformer: its word embeddings; the baseline pads every gene token (keeps ``<cls>``/``<eos>``)."""
    from scdrugmap.models import geneformer

    pad = getattr(geneformer, "PAD_TOKEN", "<pad>")
    return TokenAttributionHook(
        gene_columns=_geneformer_columns,
        embedding=lambda e: module_named(e, "embeddings.word_embeddings"),
        baseline=replace_at_genes(input_ids=lambda e: int(_geneformer_vocabulary(e).token_ids[pad])),
        description="Geneformer's input token embeddings; baseline: every gene token replaced by <pad>")


# --- tGPT -------------------------------------------------------------------------------------------------

def _tgpt_columns(encoder: TorchEncoder, adata: ad.AnnData, tokens: TokenizedCells, layer: str | None) -> GeneColumns:
    from scdrugmap.models import tgpt

    tokenizer = encoder.tokenizer  # type: ignore[attr-defined]
    key = tgpt.GENE_SYMBOL_KEY
    symbols = adata.var[key].astype(str).to_numpy() if key in adata.var else np.asarray(adata.var_names, dtype=object)
    flat, offsets = tokenizer.encode_genes(symbols)
    single = np.flatnonzero(np.diff(offsets) == 1)
    ids = flat[offsets[single]]
    known = ids != tokenizer.unk_id
    return id_columns("input_ids", lookup_table(ids[known], single[known]))


def tgpt_hook(encoder: Encoder) -> TokenAttributionHook:
    """tGPT: the summed input embedding (GPT-2's dropout input); the baseline pads every gene token."""
    return TokenAttributionHook(
        gene_columns=_tgpt_columns,
        embedding=lambda e: submodule(e, "transformer.drop"),
        baseline=replace_at_genes(input_ids=lambda e: int(e.tokenizer.pad_id)),  # type: ignore[attr-defined]
        description="tGPT's summed input embedding (token + position + token type); baseline: every gene token "
                    "replaced by <pad>")


# --- scGPT ------------------------------------------------------------------------------------------------

def _scgpt_columns(encoder: TorchEncoder, adata: ad.AnnData, tokens: TokenizedCells, layer: str | None) -> GeneColumns:
    import pandas as pd

    names = encoder.gene_names(adata)  # type: ignore[attr-defined]
    ids = pd.Series(names).map(encoder.vocab).fillna(-1).to_numpy(dtype=np.int64)  # type: ignore[attr-defined]
    special = {encoder.config.pad_token_id, encoder.config.cls_token_id}  # type: ignore[attr-defined]
    keep = np.flatnonzero((ids >= 0) & ~np.isin(ids, list(special)))
    return id_columns("gene_ids", lookup_table(ids[keep], keep))


def scgpt_hook(encoder: Encoder) -> TokenAttributionHook:
    """scGPT: gene + value embedding, the transformer's input; the baseline turns gene positions into padding."""
    return TokenAttributionHook(
        gene_columns=_scgpt_columns,
        embedding=lambda e: submodule(e, "transformer_encoder"),
        embedding_input=True,
        baseline=replace_at_genes(gene_ids=lambda e: int(e.config.pad_token_id),  # type: ignore[attr-defined]
                                  values=lambda e: float(e.config.pad_value)),  # type: ignore[attr-defined]
        description="scGPT's gene + value embedding (the transformer's input); baseline: every gene position "
                    "replaced by the <pad> gene and pad value")


# --- scFoundation -----------------------------------------------------------------------------------------

def _scfoundation_columns(encoder: TorchEncoder, adata: ad.AnnData, tokens: TokenizedCells,
                          layer: str | None) -> GeneColumns:
    from scdrugmap.models.scfoundation import vocabulary_positions

    vocabulary = encoder.genes  # type: ignore[attr-defined]
    if encoder.options.gene_alignment == "official" and adata.n_vars == len(vocabulary):  # type: ignore[attr-defined]
        index = np.arange(adata.n_vars, dtype=np.int64)
    else:
        index = vocabulary_positions(encoder._gene_names(adata), vocabulary)  # type: ignore[attr-defined]
    known = np.flatnonzero(index >= 0)
    table = np.full(len(vocabulary), -1, dtype=np.int64)
    table[index[known]] = known

    def columns(rows: npt.NDArray[np.int64], batch: Mapping[str, Any]) -> npt.NDArray[np.int64]:
        found = look_up(table, _numpy(batch["positions"]))  # T and S sit past the gene index: -1
        return np.where(_numpy(batch["padding"]), -1, found)

    return columns


def scfoundation_hook(encoder: Encoder) -> TokenAttributionHook:
    """scFoundation: value + position embedding, the encoder's input; the baseline sets every gene's value to 0."""
    return TokenAttributionHook(
        gene_columns=_scfoundation_columns,
        embedding=lambda e: submodule(e, "encoder"),
        embedding_input=True,
        baseline=replace_at_genes(values=lambda e: 0.0),
        description="scFoundation's value + gene-position embedding (the encoder's input); baseline: every "
                    "gathered gene at value 0 (T and S kept)")


# --- UCE --------------------------------------------------------------------------------------------------

def _uce_columns(encoder: TorchEncoder, adata: ad.AnnData, tokens: TokenizedCells, layer: str | None) -> GeneColumns:
    import pandas as pd

    genes = encoder.genes  # type: ignore[attr-defined]
    symbols = pd.Index(adata.var.get("gene_symbol", adata.var_names)).astype(str).str.upper()
    where = genes.symbols.get_indexer(symbols)
    known = np.flatnonzero(where >= 0)
    return id_columns("token_ids", lookup_table(genes.token_ids[where[known]], known))


def uce_hook(encoder: Encoder) -> TokenAttributionHook:
    """UCE: the projected protein-token embeddings before the positions; the baseline pads every gene token."""
    from scdrugmap.models.uce import PAD_TOKEN

    return TokenAttributionHook(
        gene_columns=_uce_columns,
        embedding=lambda e: submodule(e, "pos_encoder"),
        embedding_input=True,
        baseline=replace_at_genes(token_ids=lambda e: PAD_TOKEN),
        description="UCE's projected protein-token embeddings (before the positions); baseline: every sampled "
                    "gene token replaced by [PAD]")


# --- scBERT and CellLM (Performer) ------------------------------------------------------------------------

def _reference_table(encoder: TorchEncoder, adata: ad.AnnData, size: int) -> npt.NDArray[np.int64]:
    """Return, per reference-gene index (``size`` rows), the var column preprocess.py copies it from, else -1."""
    from scdrugmap.models._performer import data_gene_names, reference_selection

    selection = reference_selection(data_gene_names(adata, encoder.gene_key),  # type: ignore[attr-defined]
                                    encoder.genes).tocoo()  # type: ignore[attr-defined]
    table = np.full(size, -1, dtype=np.int64)
    table[selection.col] = selection.row
    return table


def _scbert_columns(encoder: TorchEncoder, adata: ad.AnnData, tokens: TokenizedCells, layer: str | None) -> GeneColumns:
    table = _reference_table(encoder, adata, encoder.config.max_seq_len)  # type: ignore[attr-defined]

    def columns(rows: npt.NDArray[np.int64], batch: Mapping[str, Any]) -> npt.NDArray[np.int64]:
        ids = _numpy(batch["input_ids"])  # position i is reference gene i; bin 0 is the baseline already
        return np.where(ids > 0, table[None, : ids.shape[1]], -1)

    return columns


def _expression_bin_hook(gene_columns: Callable[[TorchEncoder, ad.AnnData, TokenizedCells, str | None], GeneColumns],
                         description: str) -> TokenAttributionHook:
    """scBERT and CellLM alike: attribution on ``token_emb`` (expression bins), baseline bin 0, per-cell key max."""
    return TokenAttributionHook(
        gene_columns=gene_columns,
        embedding=lambda e: submodule(e, "token_emb"),
        baseline=replace_at_genes(input_ids=lambda e: 0),
        context=_per_cell_key_max,
        description=description)


def scbert_hook(encoder: Encoder) -> TokenAttributionHook:
    """scBERT: the expression-bin token embeddings; the baseline puts every gene in bin 0 (unexpressed)."""
    return _expression_bin_hook(_scbert_columns, "scBERT's expression-bin token embeddings (gene2vec positions "
                                "kept); baseline: every gene in bin 0 (unexpressed); key_max='cell'")


def _celllm_columns(encoder: TorchEncoder, adata: ad.AnnData, tokens: TokenizedCells, layer: str | None) -> GeneColumns:
    table = _reference_table(encoder, adata, encoder.config.gene_num)  # type: ignore[attr-defined]

    def columns(rows: npt.NDArray[np.int64], batch: Mapping[str, Any]) -> npt.NDArray[np.int64]:
        found = look_up(table, _numpy(batch["gene_pos"]))  # CLS and pad rows sit past the genes: -1
        return np.where(_numpy(batch["mask"]), found, -1)

    return columns


def celllm_hook(encoder: Encoder) -> TokenAttributionHook:
    """CellLM: the expression-bin token embeddings; the baseline puts every expressed gene in bin 0."""
    return _expression_bin_hook(_celllm_columns, "CellLM's expression-bin token embeddings (gene positions kept); "
                                "baseline: every expressed gene in bin 0 (the lowest); key_max='cell'")


# --- CellPLM ----------------------------------------------------------------------------------------------

def _cellplm_columns(encoder: TorchEncoder, adata: ad.AnnData, tokens: TokenizedCells, layer: str | None) -> GeneColumns:
    from scdrugmap.models.cellplm import _gene_ids_of

    rows_of_vocabulary = _gene_ids_of(adata, encoder.config.gene_list)  # type: ignore[attr-defined]
    known = np.flatnonzero(rows_of_vocabulary >= 0)
    table = lookup_table(rows_of_vocabulary[known], known)

    def columns(rows: npt.NDArray[np.int64], batch: Mapping[str, Any]) -> npt.NDArray[np.int64]:
        # every cell of a pass is attributed over the genes of the whole pass (the baseline is their mean)
        genes = look_up(table, np.unique(_numpy(batch["gene_ids"])))
        return np.broadcast_to(genes, (len(rows), genes.size)).copy()

    return columns


@contextlib.contextmanager
def _cellplm_draws(encoder: TorchEncoder) -> Iterator[None]:
    """Restart the Gumbel noise, as `embed` does, so each pass draws what a prediction on these cells draws."""
    if getattr(encoder, "latent_sampling", None) == "gumbel":
        encoder.reset_generator()  # type: ignore[attr-defined]
    yield


def _cellplm_integrate(encoder: TorchEncoder, batch: dict[str, Any], columns: npt.NDArray[np.int64],
                       probability_of: Callable[[torch.Tensor], torch.Tensor], n_steps: int,
                       internal_batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IG of each cell of one CellPLM pass from the pass's mean cell vector to its own, the other cells and its
    cluster draw held; split over genes along the cell vector's per-gene terms (see the module notes)."""
    import torch
    from captum.attr import IntegratedGradients

    module = encoder.module
    embedder: Any = module.get_submodule("embedder.feat_enc")
    latent: Any = module.get_submodule("latent.layers.1")
    gene_ids, counts, offsets = batch["gene_ids"], batch["counts"], batch["offsets"]
    drawn: list[torch.Tensor] = []
    categorical = latent.categorical

    def record(*args: Any, **kwargs: Any) -> torch.Tensor:
        drawn.append(categorical(*args, **kwargs))
        return drawn[-1]

    latent.categorical = record  # the prediction's own draw, recorded (an instance attribute shadows the method)
    try:
        with torch.no_grad():
            probability = probability_of(encoder.encode(batch)).float()
    finally:
        del latent.categorical
    if not drawn:
        msg = f"{encoder.name}: the latent layer drew no cluster indicator; the CellPLM attribution hook needs updating."
        raise ConfigError(msg)
    cluster = drawn[0]
    n_cells = int(offsets.numel())
    # the cell vectors as (cells x genes of the pass) log1p weights times the genes' embeddings: v = W E
    genes, entry_gene = torch.unique(gene_ids, return_inverse=True)
    lengths = torch.diff(torch.cat([offsets, offsets.new_tensor([gene_ids.numel()])]))
    weights = torch.zeros(n_cells, genes.numel(), device=counts.device, dtype=torch.float32)
    weights.index_put_((torch.repeat_interleave(torch.arange(n_cells, device=counts.device), lengths), entry_gene),
                       torch.log1p(counts), accumulate=True)
    with torch.no_grad():
        embeddings = embedder.emb[genes].float()
        vectors = weights @ embeddings
        reference = vectors.mean(dim=0)

    def pass_probability(replaced: torch.Tensor) -> torch.Tensor:
        handle = embedder.register_forward_hook(lambda m, i, o: replaced)
        try:
            return probability_of(module(gene_ids, counts, offsets, sampling="argmax", categorical=cluster))
        finally:
            handle.remove()

    values = np.zeros((n_cells, genes.numel()), dtype=np.float32)
    base = np.empty(n_cells, dtype=np.float32)
    for cell in range(n_cells):
        def forward(points: torch.Tensor, cell: int = cell) -> torch.Tensor:
            out = []
            for point in points:  # one pass per path point: the cells of a pass attend to each other
                replaced = vectors.clone()
                replaced[cell] = point
                out.append(pass_probability(replaced)[cell])
            return torch.stack(out)

        mean_gradient = IntegratedGradients(forward, multiply_by_inputs=False).attribute(
            vectors[cell : cell + 1], baselines=reference[None], n_steps=n_steps,
            internal_batch_size=max(1, internal_batch_size))[0]
        values[cell] = ((weights[cell] - weights.mean(dim=0)) * (embeddings @ mean_gradient)).detach().cpu().numpy()
        with torch.no_grad():
            base[cell] = float(forward(reference[None])[0])
    return values, probability.cpu().numpy(), base


def cellplm_hook(encoder: Encoder) -> TokenAttributionHook:
    """CellPLM: the per-gene terms of the cell vector, per cell with the rest of its pass held (module notes)."""
    return TokenAttributionHook(
        gene_columns=_cellplm_columns,
        integrate=_cellplm_integrate,
        context=_cellplm_draws,
        official_batches=True,
        description="CellPLM's per-gene terms log1p(x) emb[g] of the cell vector, each cell with the other cells of "
                    "its pass and its cluster draw held; baseline: the mean cell vector of the pass")


# --- language models on gene sentences --------------------------------------------------------------------

def _sentence_columns(encoder: TorchEncoder, adata: ad.AnnData, tokens: TokenizedCells,
                      layer: str | None) -> GeneColumns:
    from scdrugmap.data.schema import expression_matrix
    from scdrugmap.models.llm import SEPARATOR, gene_symbols, rank_genes

    llm: Any = encoder
    limit = llm.max_length
    symbols = gene_symbols(adata)
    has_symbol = np.array([s is not None for s in symbols], dtype=bool)
    genes, offsets = rank_genes(expression_matrix(adata, layer), min(llm.sentence_config.top_n_genes, limit),
                                gene_mask=has_symbol)
    flat = np.full(tokens.arrays["input_ids"].size, -1, dtype=np.int64)
    token_offsets = tokens.arrays["offsets"]
    for position, row in enumerate(tokens.cell_index):
        ranked = genes[offsets[row] : offsets[row + 1]]
        words = [str(symbols[g]) for g in ranked]
        ends = np.cumsum([len(w) + len(SEPARATOR) for w in words]) - len(SEPARATOR)
        starts = ends - np.array([len(w) for w in words])
        encoded = llm.tokenizer(SEPARATOR.join(words), truncation=True, max_length=limit, add_special_tokens=True,
                                return_offsets_mapping=True)
        lo, hi = token_offsets[position], token_offsets[position + 1]
        if list(encoded["input_ids"]) != tokens.arrays["input_ids"][lo:hi].tolist():
            msg = f"{encoder.name}: re-tokenizing cell {adata.obs_names[row]!r} gave other tokens; the hook needs updating."
            raise ConfigError(msg)
        spans = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        last = spans[:, 1] - 1  # the token's last character names its gene (a leading space belongs to none)
        word = np.searchsorted(starts, last, side="right") - 1
        inside = (spans[:, 1] > spans[:, 0]) & (word >= 0) & (last < ends[np.maximum(word, 0)])
        flat[lo:hi] = np.where(inside, ranked[np.maximum(word, 0)], -1)

    def columns(rows: npt.NDArray[np.int64], batch: Mapping[str, Any]) -> npt.NDArray[np.int64]:
        lengths = token_offsets[rows + 1] - token_offsets[rows]
        width = _numpy(batch["input_ids"]).shape[1]
        steps = np.arange(width)
        real = steps[None, :] < lengths[:, None]
        index = np.where(real, token_offsets[rows][:, None] + steps[None, :], 0)
        return np.where(real, flat[index] if flat.size else -1, -1)

    return columns


def language_model_hook(encoder: Encoder) -> TokenAttributionHook:
    """Language models: the input token embeddings; each gene's sub-word tokens replaced by the pad token."""
    tokenizer = getattr(encoder, "tokenizer", None)
    if not getattr(tokenizer, "is_fast", False):
        msg = (f"{encoder.name}: its tokenizer ({type(tokenizer).__name__}) gives no character offsets, so sub-word "
               "tokens cannot be mapped to genes. Use measure_deletion_effects (in-silico deletion), which works with "
               "any model.")
        raise ConfigError(msg)
    return TokenAttributionHook(
        gene_columns=_sentence_columns,
        embedding=lambda e: cast(Any, e.module).get_input_embeddings(),  # a Hugging Face PreTrainedModel
        baseline=replace_at_genes(input_ids=lambda e: int(e.pad_token_id)),  # type: ignore[attr-defined]
        description="the language model's input token embeddings, summed over each gene symbol's sub-word tokens; "
                    "baseline: every gene token replaced by the pad token")


#: Token models with an attribution hook: registry key -> hook factory (called with the loaded encoder).
TOKEN_HOOKS: dict[str, Callable[[Encoder], TokenAttributionHook]] = {
    "geneformer": geneformer_hook,
    "tgpt": tgpt_hook,
    "scgpt": scgpt_hook,
    "scfoundation": scfoundation_hook,
    "uce": uce_hook,
    "scbert": scbert_hook,
    "celllm": celllm_hook,
    "cellplm": cellplm_hook,
    "minilm": language_model_hook,
    "llm": language_model_hook,
}


def token_attribution_hook(encoder: Encoder) -> TokenAttributionHook:
    """Return the encoder's own ``attribution_hook`` if it declares one, else the registered hook.

    Raises
    ------
    ConfigError
        When neither exists (the message names the models that have one and the alternative), or the model
        cannot be attributed (the message says why).
    """
    declared = getattr(encoder, "attribution_hook", None)
    if declared is not None:
        return declared if isinstance(declared, TokenAttributionHook) else declared()
    factory = TOKEN_HOOKS.get(encoder.name)
    if factory is None:
        msg = (f"{encoder.name} has no token attribution hook (models with one: {', '.join(TOKEN_HOOKS)}). "
               "Use measure_deletion_effects (in-silico deletion), which works with any model.")
        raise ConfigError(msg)
    return factory(encoder)
