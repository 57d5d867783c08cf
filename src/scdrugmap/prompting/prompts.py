"""The prompt of scDrugMap's language-model arm: each cell as its most expressed genes, ten cells a request.

Notes
-----
The scDrugMap paper (Wang et al. 2025, arXiv:2505.05612; official code
``QSong-github/scDrugMap``, ``code/GPT4/main.py``) sends GPT-4o-mini one user
message per ten cells: a reasoning preamble, the data source of the cells, the
names of each cell's ten most expressed genes as a Python list of lists, and the
answer format ``{res:1,0,...}`` (asked three times). The packaged
``templates/user.txt`` reproduces that message character for character when
there are ten cells, ten genes and no examples; every template is a plain
`string.Template` file the user can replace (``$name`` placeholders; ``$$`` for
a literal dollar).

Differences from the official script, each deliberate:

- the official script drops the last request of a data set when it holds fewer
  than ten cells, and drops a request whose answer has the wrong length; here
  the last request carries the remaining cells (the preamble says how many) and
  a malformed answer is asked again once, then its cells are recorded as missing;
- the official parser only reads ``{res:1,0,...}`` without spaces; here spaces,
  quotes, brackets, code fences and ``<think>`` blocks are tolerated, but the
  number of labels must equal the number of cells;
- genes are ranked by value, largest first, ties broken by gene order in ``var``
  (the official ranking code is not published); genes with zero expression are
  never listed, so a cell expressing fewer genes lists fewer.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdrugmap.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy.typing as npt

    from scdrugmap.data.schema import ObsKeys

#: The answer example of the official prompt (``code/GPT4/main.py``, ``post_prompt``), cycled to other lengths.
OFFICIAL_EXAMPLE_ANSWER = (1, 0, 1, 1, 1, 0, 0, 1, 0, 0)
#: Template files, with the placeholders each may use and those it must use.
TEMPLATE_PLACEHOLDERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "system": (frozenset({"n_cells", "n_genes"}), frozenset()),
    "user": (frozenset({"n_cells", "n_genes", "source", "cells", "example_answer", "examples"}),
             frozenset({"cells"})),
    "few_shot": (frozenset({"n_examples", "n_genes", "examples"}), frozenset({"examples"})),
    "example": (frozenset({"index", "source", "genes", "answer"}), frozenset({"genes", "answer"})),
    "retry": (frozenset({"problem", "n_cells", "example_answer"}), frozenset()),
}
#: Labels used for the obs fields of the source line (the study is shown bare, as in the official prompt).
SOURCE_LABELS = {"tissue": "tissue", "cancer_type": "cancer type", "therapy": "therapy", "regimen": "regimen",
                 "dataset": "dataset", "sample": "sample"}
ROW_CHUNK = 16384


# --- templates ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Templates:
    """The five prompt templates as text, with the files they came from."""

    system: str
    user: str
    few_shot: str
    example: str
    retry: str
    origins: tuple[str, ...] = ()

    @property
    def sha256(self) -> str:
        """Return a digest of all five texts (stored with the results, for reproducibility)."""
        digest = hashlib.sha256()
        for name in TEMPLATE_PLACEHOLDERS:
            digest.update(getattr(self, name).encode())
            digest.update(b"\0")
        return digest.hexdigest()


def _placeholders(text: str, origin: str) -> set[str]:
    names = set()
    for match in Template.pattern.finditer(text):
        if match.group("invalid") is not None:
            line = text.count("\n", 0, match.start()) + 1
            msg = (f"{origin}: line {line} has a '$' that starts no placeholder; "
                   "write $$ for a literal dollar sign.")
            raise ConfigError(msg)
        name = match.group("named") or match.group("braced")
        if name:
            names.add(name)
    return names


def load_templates(paths: dict[str, str | Path | None] | None = None) -> Templates:
    """Read the prompt templates: the packaged ones, or the user's files where ``paths`` names one.

    Parameters
    ----------
    paths
        Template name (``system``, ``user``, ``few_shot``, ``example``, ``retry``) to a file replacing
        the packaged one; None or a missing name keeps the default.

    Raises
    ------
    ConfigError
        When a file is missing, a name is unknown, or a template uses a placeholder it may not (or lacks one
        it must have).
    """
    paths = dict(paths or {})
    unknown = sorted(set(paths) - set(TEMPLATE_PLACEHOLDERS))
    if unknown:
        msg = f"unknown prompt templates {unknown}; expected {sorted(TEMPLATE_PLACEHOLDERS)}."
        raise ConfigError(msg)
    texts, origins = {}, []
    packaged = resources.files("scdrugmap.prompting") / "templates"
    for name, (allowed, required) in TEMPLATE_PLACEHOLDERS.items():
        path = paths.get(name)
        if path is None:
            origin = f"scdrugmap/prompting/templates/{name}.txt"
            text = (packaged / f"{name}.txt").read_text(encoding="utf-8")
        else:
            origin = str(path)
            if not Path(path).is_file():
                msg = f"prompt template {name!r}: {path} is not a file. Give the path of a text file."
                raise ConfigError(msg)
            text = Path(path).read_text(encoding="utf-8")
        found = _placeholders(text, origin)
        if found - allowed or required - found:
            msg = (f"{origin}: the {name} template uses {sorted(found - allowed) or 'no unknown'} placeholders "
                   f"and lacks {sorted(required - found) or 'none'}; it may use "
                   f"{sorted('$' + a for a in allowed)} and must use {sorted('$' + r for r in required) or 'none'}.")
            raise ConfigError(msg)
        texts[name] = text
        origins.append(origin)
    return Templates(**texts, origins=tuple(origins))


def example_answer(n_cells: int) -> str:
    """Return the answer example for ``n_cells`` cells: the official ``1,0,1,1,1,0,0,1,0,0``, cycled."""
    return ",".join(str(OFFICIAL_EXAMPLE_ANSWER[i % len(OFFICIAL_EXAMPLE_ANSWER)]) for i in range(n_cells))


def format_gene_lists(cells: list[list[str]]) -> str:
    """Return cells' gene names as the official prompt shows them: a Python list of lists."""
    return repr([[str(gene) for gene in genes] for genes in cells])


@dataclass(frozen=True)
class Example:
    """One labelled training cell shown in a few-shot prompt."""

    source: str
    genes: tuple[str, ...]
    label: int


def build_messages(templates: Templates, *, source: str, cells: list[list[str]], n_genes: int,
                   examples: Sequence[Example] = ()) -> list[dict[str, str]]:
    """Return the chat messages asking for the response of ``cells`` (one user message, and a system one if set).

    Parameters
    ----------
    templates
        From `load_templates`.
    source
        The data-source line shared by these cells.
    cells
        Gene names of each cell, most expressed first.
    n_genes
        Genes per cell the preamble announces (the configured number; a cell may list fewer).
    examples
        Labelled training cells for a few-shot prompt; none for zero-shot.
    """
    n_cells = len(cells)
    block = ""
    if examples:
        lines = [Template(templates.example).substitute(index=i + 1, source=ex.source,
                                                         genes=", ".join(ex.genes), answer=ex.label).rstrip("\n")
                 for i, ex in enumerate(examples)]
        block = Template(templates.few_shot).substitute(n_examples=len(examples), n_genes=n_genes,
                                                        examples="\n".join(lines)).rstrip() + "\n\n"
    user = Template(templates.user).substitute(n_cells=n_cells, n_genes=n_genes, source=source,
                                               cells=format_gene_lists(cells),
                                               example_answer=example_answer(n_cells), examples=block)
    messages = []
    system = Template(templates.system).substitute(n_cells=n_cells, n_genes=n_genes).strip()
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user})
    return messages


def build_retry_messages(templates: Templates, messages: list[dict[str, str]], answer: str, *, problem: str,
                         n_cells: int) -> list[dict[str, str]]:
    """Return ``messages`` followed by the unusable answer and a request to answer again in the format."""
    retry = Template(templates.retry).substitute(problem=problem, n_cells=n_cells,
                                                 example_answer=example_answer(n_cells))
    return [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": retry}]


# --- cells -------------------------------------------------------------------------------------------------

def gene_symbols(var: pd.DataFrame) -> npt.NDArray[np.object_]:
    """Return one display name per gene: ``var["gene_symbol"]`` where set, else the var name."""
    names = np.asarray(var.index.astype(str), dtype=object)
    if "gene_symbol" in var:
        symbols = var["gene_symbol"]
        text = symbols.astype(str).str.strip()
        known = (symbols.notna() & (text != "") & (text.str.lower() != "nan")).to_numpy()
        names[known] = text.to_numpy()[known]
    return names


def top_gene_indices(X: Any, rows: npt.ArrayLike, n_genes: int) -> npt.NDArray[np.int64]:
    """Return the column indices of each row's ``n_genes`` largest positive values, largest first.

    Vectorised over the CSR rows (one lexsort per block of rows): ties are broken by column order; a row with
    fewer positive values is padded with -1.

    Parameters
    ----------
    X
        Cells x genes, sparse or dense.
    rows
        Rows (cells) to rank, in any order.
    n_genes
        How many genes to keep per row.

    Returns
    -------
    int64 array of shape (len(rows), n_genes).
    """
    rows = np.asarray(rows, dtype=np.int64)
    unique, inverse = np.unique(rows, return_inverse=True)
    out = np.full((unique.size, n_genes), -1, dtype=np.int64)
    for start in range(0, unique.size, ROW_CHUNK):
        part = unique[start:start + ROW_CHUNK]
        block = X[part]
        block = sp.csr_matrix(block) if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
        block.sum_duplicates()  # canonical: columns sorted within each row
        values = np.asarray(block.data, dtype=np.float64)
        row_of = np.repeat(np.arange(part.size), np.diff(block.indptr))
        keep = values > 0
        row_of, columns, values = row_of[keep], block.indices[keep].astype(np.int64), values[keep]
        order = np.lexsort((-values, row_of))  # stable: equal values keep column order
        row_of, columns = row_of[order], columns[order]
        counts = np.bincount(row_of, minlength=part.size)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.arange(row_of.size) - first[row_of]
        chosen = rank < n_genes
        out[start + row_of[chosen], rank[chosen]] = columns[chosen]
    return out[inverse]


def cell_sources(obs: pd.DataFrame, keys: ObsKeys, fields: tuple[str, ...] | list[str]) -> npt.NDArray[np.object_]:
    """Return each cell's data-source line, e.g. ``GSE120575; tissue: Tumor tissue; regimen: anti-PD1``.

    The study is shown bare (the official prompt names the GEO series only); other fields as ``name: value``.
    Columns absent from ``obs`` and missing values are left out; a cell with nothing known gets ``unknown``.

    Raises
    ------
    ConfigError
        When ``fields`` names something that is not an obs field of the contract.
    """
    parts = []
    for name in fields:
        if name != "study" and name not in SOURCE_LABELS:
            msg = f"source field {name!r} is unknown; choose from {['study', *SOURCE_LABELS]}."
            raise ConfigError(msg)
        column = getattr(keys, name)
        if column not in obs:
            continue
        values = obs[column]
        text = values.astype(str).str.strip()
        present = (values.notna() & (text != "") & (text.str.lower() != "nan")).to_numpy()
        rendered = text if name == "study" else f"{SOURCE_LABELS[name]}: " + text
        parts.append(np.where(present, rendered.to_numpy(dtype=object), ""))
    joined = np.full(len(obs), "", dtype=object)
    for part in parts:
        joined = np.where(joined == "", part, np.where(part == "", joined, joined + "; " + part))
    return np.where(joined == "", "unknown", joined).astype(object)


# --- answers -----------------------------------------------------------------------------------------------

_ANSWER = re.compile(r"\{\s*[\"']?res[\"']?\s*:\s*\[?([^{}\[\]]*?)\]?\s*\}", re.IGNORECASE)
_ITEM = re.compile(r"[^,\s]+")
_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class ParsedAnswer:
    """Labels read from one answer, with the character offset of each label's digit, or why none were read."""

    labels: tuple[int, ...] | None
    offsets: tuple[int, ...] = ()
    reason: str | None = None
    problem: str | None = None


def parse_answer(text: str | None, n_cells: int) -> ParsedAnswer:
    """Read ``{res:1,0,...}`` from an answer: tolerant of layout, strict about the count.

    The last ``{res: ...}`` outside ``<think>`` blocks counts (a model may echo the example first). Spaces,
    line breaks, quotes, square brackets and code fences are accepted; each label must be 0 or 1.

    Returns
    -------
    `ParsedAnswer` with ``labels`` set, or ``labels=None`` and ``reason`` one of ``empty_answer``,
    ``unparseable``, ``wrong_count``, with ``problem`` in words (sent back to the model on a retry).
    """
    if not text or not text.strip():
        return ParsedAnswer(None, reason="empty_answer", problem="the answer was empty")
    hidden = [match.span() for match in _THINK.finditer(text)]
    matches = [m for m in _ANSWER.finditer(text) if not any(a <= m.start() < b for a, b in hidden)]
    if not matches:
        return ParsedAnswer(None, reason="unparseable", problem="it holds no {res:...} list")
    match = matches[-1]
    labels, offsets = [], []
    for item in _ITEM.finditer(match.group(1)):
        token = item.group().strip("\"'")
        if token not in {"0", "1"}:
            problem = f"its {{res:...}} list holds {item.group()!r}, but each answer must be 0 or 1"
            return ParsedAnswer(None, reason="unparseable", problem=problem)
        labels.append(int(token))
        offsets.append(match.start(1) + item.start() + item.group().index(token))
    if len(labels) != n_cells:
        return ParsedAnswer(None, reason="wrong_count",
                            problem=f"it gives {len(labels)} answers for {n_cells} cells")
    return ParsedAnswer(tuple(labels), tuple(offsets))


def _log_sum_exp(values: list[float]) -> float:
    if not values:
        return -math.inf
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


def label_probabilities(content: str, logprobs: dict[str, Any] | None,
                        parsed: ParsedAnswer) -> npt.NDArray[np.float64] | None:
    """Return P(sensitive) for each label of a parsed answer from the response's token log-probabilities.

    At each label's token, the alternatives among the returned top log-probabilities (and the chosen token)
    that read ``0`` or ``1`` (ignoring spaces) are softmaxed: P(1) = e^l1 / (e^l0 + e^l1), each class summing
    its spellings. A class absent from the top alternatives counts as probability 0.

    Returns
    -------
    float64 array with one value per label (NaN where a label's token could not be found), or None when the
    response carries no token log-probabilities.
    """
    entries = (logprobs or {}).get("content") or []
    if not entries or parsed.labels is None:
        return None
    tokens = [str(entry.get("token", "")) for entry in entries]
    joined = "".join(tokens)
    offsets = parsed.offsets
    if joined != content:  # some servers' tokens do not spell the content exactly: read the tokens instead
        again = parse_answer(joined, len(parsed.labels))
        if again.labels != parsed.labels:
            return np.full(len(parsed.labels), np.nan)
        offsets = again.offsets
    ends = np.cumsum([len(token) for token in tokens])
    probabilities = np.full(len(parsed.labels), np.nan)
    for index, (label, offset) in enumerate(zip(parsed.labels, offsets, strict=True)):
        position = int(np.searchsorted(ends, offset, side="right"))
        if position >= len(entries) or tokens[position].strip() != str(label):
            continue
        entry = entries[position]
        alternatives = {tokens[position]: float(entry.get("logprob", -math.inf))}
        for alternative in entry.get("top_logprobs") or []:
            alternatives[str(alternative.get("token", ""))] = float(alternative.get("logprob", -math.inf))
        by_class: dict[str, list[float]] = {"0": [], "1": []}
        for token, logprob in alternatives.items():
            if token.strip() in by_class:
                by_class[token.strip()].append(logprob)
        probabilities[index] = _two_class_softmax(_log_sum_exp(by_class["1"]), _log_sum_exp(by_class["0"]))
    return probabilities


def _two_class_softmax(one: float, zero: float) -> float:
    """Return e^one / (e^one + e^zero), stable for large gaps and -inf; NaN when both are -inf."""
    if one == -math.inf and zero == -math.inf:
        return math.nan
    if one >= zero:
        return 1.0 / (1.0 + math.exp(zero - one))
    ratio = math.exp(one - zero)
    return ratio / (1.0 + ratio)
