"""The prompt strategy: a chat model reads each test cell's top genes and data source and answers 1 or 0.

`fit_predict_prompt` is the language-model arm of the benchmark: for each fold it
builds the paper's prompts over the TEST cells (ten cells a request), optionally
with k labelled example cells drawn from the TRAINING cells only, sends them
through `ChatClient` (cached, rate limited, retried), reads the answers, and
returns the probability of sensitivity per test cell. Nothing is trained.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scdrugmap.data import schema
from scdrugmap.errors import ConfigError, SchemaError
from scdrugmap.prompting.client import ChatClient, ChatResult, request_key, sanitise_endpoint
from scdrugmap.prompting.prompts import (
    TEMPLATE_PLACEHOLDERS,
    Example,
    ParsedAnswer,
    Templates,
    build_messages,
    build_retry_messages,
    cell_sources,
    gene_symbols,
    label_probabilities,
    load_templates,
    parse_answer,
    top_gene_indices,
)

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

log = logging.getLogger(__name__)

#: Why a cell has no answer; counted per fold in ``info["missing_reasons"]``.
MISSING_REASONS = ("no_expressed_genes", "empty_answer", "unparseable", "wrong_count", "truncated")
NO_LOGPROBS_REASON = "the API returned no log-probabilities"
OPENAI_HOSTS = frozenset({"api.openai.com"})
#: Callback: (requests answered, requests in all).
PromptProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class PromptConfig:
    """Settings of the prompt strategy. The API key is never a field: it is read from ``api_key_env``.

    Parameters
    ----------
    api_base
        Root of an OpenAI-compatible API (OpenAI, or a local vLLM / llama.cpp / Ollama server's ``.../v1``).
    model
        Model name as the server knows it (the paper used ``gpt-4o-mini-2024-07-18``).
    shots
        Labelled example cells from the training fold shown in every request (0: zero-shot, as in the paper).
    cells_per_request, genes_per_cell
        Ten and ten in the paper.
    temperature, seed
        Sent with every request (servers that ignore ``seed`` may still vary); ``temperature=None`` sends none
        (for models that refuse the setting).
    max_tokens
        Cap on the answer length; None sends none (reasoning models need room to think).
    logprobs, top_logprobs
        Ask for token log-probabilities, from which each cell's P(sensitive) is derived.
    max_concurrency, requests_per_minute, timeout, max_retries, backoff_base, backoff_max
        Client limits (see `ChatClient`).
    source_fields
        obs fields of the data-source line, shown in this order.
    layer
        Expression layer to rank genes on (default ``X``); any non-negative values.
    template_dir
        A folder whose ``system.txt``, ``user.txt``, ``few_shot.txt``, ``example.txt``, ``retry.txt`` (any of
        them) replace the packaged templates.
    system_template, user_template, few_shot_template, example_template, retry_template
        Single files replacing a packaged template (these win over ``template_dir``; see `load_templates`).
    price_per_1k_prompt_tokens, price_per_1k_completion_tokens
        USD per 1,000 tokens for the cost estimate (defaults: gpt-4o-mini list prices, 0.15 and 0.60 per million).
    api_key_env
        Environment variable holding the API key; unset sends no key (fine for most local servers).
    """

    api_base: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    shots: int = 0
    cells_per_request: int = 10
    genes_per_cell: int = 10
    temperature: float | None = 0.0
    seed: int = 0
    max_tokens: int | None = None
    logprobs: bool = True
    top_logprobs: int = 5
    max_concurrency: int = 4
    requests_per_minute: float | None = None
    timeout: float = 60.0
    max_retries: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    source_fields: tuple[str, ...] = ("study", "tissue", "cancer_type", "regimen")
    layer: str | None = None
    template_dir: str | None = None
    system_template: str | None = None
    user_template: str | None = None
    few_shot_template: str | None = None
    example_template: str | None = None
    retry_template: str | None = None
    price_per_1k_prompt_tokens: float = 0.00015
    price_per_1k_completion_tokens: float = 0.0006
    api_key_env: str = "OPENAI_API_KEY"

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_fields", tuple(self.source_fields))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PromptConfig:
        """Build from a plain dict (a YAML ``prompt:`` section), naming unknown settings."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            hint = " Put the key in the environment variable, never in a config file." if any(
                "key" in name and name != "api_key_env" for name in unknown) else ""
            msg = f"unknown prompt settings {unknown}; allowed: {sorted(known)}.{hint}"
            raise ConfigError(msg)
        return cls(**values)

    def template_paths(self) -> dict[str, str | Path | None]:
        """Return the template files replacing the packaged ones (None keeps a packaged template)."""
        paths: dict[str, str | Path | None] = dict.fromkeys(TEMPLATE_PLACEHOLDERS)
        if self.template_dir is not None:
            folder = Path(self.template_dir)
            if not folder.is_dir():
                msg = f"template_dir {folder} is not a folder; give a folder holding e.g. user.txt."
                raise ConfigError(msg)
            found = {name: folder / f"{name}.txt" for name in TEMPLATE_PLACEHOLDERS
                     if (folder / f"{name}.txt").is_file()}
            if not found:
                msg = f"template_dir {folder} holds none of {[f'{n}.txt' for n in TEMPLATE_PLACEHOLDERS]}."
                raise ConfigError(msg)
            paths.update(found)
        explicit = {"system": self.system_template, "user": self.user_template, "few_shot": self.few_shot_template,
                    "example": self.example_template, "retry": self.retry_template}
        paths.update({name: path for name, path in explicit.items() if path is not None})
        return paths

    def validate(self) -> None:
        """Refuse settings that cannot work, naming the value and the allowed range."""
        checks = [("shots", self.shots >= 0, ">= 0"), ("cells_per_request", self.cells_per_request >= 1, ">= 1"),
                  ("genes_per_cell", self.genes_per_cell >= 1, ">= 1"),
                  ("top_logprobs", 0 <= self.top_logprobs <= 20, "between 0 and 20"),
                  ("temperature", self.temperature is None or self.temperature >= 0, ">= 0"),
                  ("max_concurrency", self.max_concurrency >= 1, ">= 1"),
                  ("max_retries", self.max_retries >= 0, ">= 0"), ("timeout", self.timeout > 0, "> 0"),
                  ("requests_per_minute", self.requests_per_minute is None or self.requests_per_minute > 0, "> 0"),
                  ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, ">= 1")]
        for name, ok, allowed in checks:
            if not ok:
                msg = f"prompt setting {name}={getattr(self, name)!r} is not allowed; it must be {allowed}."
                raise ConfigError(msg)


def describe_config(config: PromptConfig) -> dict[str, Any]:
    """Return the config as a JSON-safe dict for run records (the endpoint without credentials)."""
    values = asdict(config)
    values["api_base"] = sanitise_endpoint(config.api_base)
    values["source_fields"] = list(config.source_fields)
    return values


def choose_examples(labels: npt.NDArray, train: npt.NDArray[np.int64], shots: int, *, seed: int,
                    usable: Callable[[npt.NDArray[np.int64]], npt.NDArray[np.bool_]] | None = None,
                    ) -> npt.NDArray[np.int64]:
    """Return ``shots`` training positions to show as examples: seeded, balanced by class where possible.

    Half the examples are sensitive and half resistant (an odd one goes to a seeded class); a class with
    too few cells is topped up from the other. ``usable`` (positions -> bool) rejects cells that cannot be
    shown, e.g. with no expressed gene. The examples come in a seeded random order.
    """
    train = np.asarray(train, dtype=np.int64)
    if shots == 0 or train.size == 0:
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    pools = {}
    for label in (0, 1):
        candidates = rng.permutation(train[labels[train] == label])
        if usable is not None:  # test candidates block by block: never rank the whole training set
            kept, block = [], max(4 * shots, 64)
            for start in range(0, candidates.size, block):
                part = candidates[start:start + block]
                kept.append(part[usable(part)])
                if sum(k.size for k in kept) >= shots:
                    break
            candidates = np.concatenate([np.empty(0, dtype=np.int64), *kept])[:shots]
        pools[label] = candidates
    odd_class = int(rng.integers(2))
    want = {label: shots // 2 + (shots % 2 if label == odd_class else 0) for label in (0, 1)}
    take = {label: min(want[label], pools[label].size) for label in (0, 1)}
    for label in (0, 1):
        other = 1 - label
        take[label] += min(want[other] - take[other], pools[label].size - take[label])
    chosen = np.concatenate([pools[label][:take[label]] for label in (0, 1)])
    if chosen.size < shots:
        log.warning("only %d usable training cells for %d few-shot examples", chosen.size, shots)
    return rng.permutation(chosen)


@dataclass
class _Request:
    """One request of one fold: which test cells (slots of the fold's test array) and the chat body."""

    fold: int
    slots: npt.NDArray[np.int64]
    body: dict[str, Any]
    results: list[ChatResult] = field(default_factory=list)
    parsed: ParsedAnswer | None = None
    retry_body: dict[str, Any] | None = None


def _api_key(config: PromptConfig) -> str | None:
    key = os.environ.get(config.api_key_env) or None
    host = urllib.parse.urlsplit(config.api_base).hostname or ""
    if key is None and host in OPENAI_HOSTS:
        msg = (f"the OpenAI API needs a key, but the environment variable {config.api_key_env} is not set. "
               f"Export it (export {config.api_key_env}=...); never put it in a config file.")
        raise ConfigError(msg)
    return key


def _request_body(config: PromptConfig, messages: list[dict[str, str]]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": config.model, "messages": messages, "seed": config.seed}
    if config.temperature is not None:
        body["temperature"] = config.temperature
    if config.max_tokens is not None:
        body["max_tokens"] = config.max_tokens
    if config.logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = config.top_logprobs
    return body


def _parse(result: ChatResult, n_cells: int) -> ParsedAnswer:
    parsed = parse_answer(result.content, n_cells)
    if parsed.labels is None and result.finish_reason == "length":
        return ParsedAnswer(None, reason="truncated", problem=f"it was cut off ({parsed.problem})")
    return parsed


def fit_predict_prompt(adata: ad.AnnData, labels: npt.ArrayLike,
                       folds: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]], *, keys: schema.ObsKeys,
                       config: PromptConfig, cache_dir: str | Path, progress: PromptProgress | None = None,
                       ) -> list[tuple[npt.NDArray[np.float32], dict[str, Any]]]:
    """Ask a chat model for the response of every test cell of every fold.

    Parameters
    ----------
    adata
        Cells x genes with non-negative expression in ``X`` (or ``config.layer``) and the obs of ``keys``.
    labels
        1 (sensitive) / 0 (resistant) per cell; only training cells' labels are read (for few-shot examples).
    folds
        (train positions, test positions) per fold.
    keys
        obs column names.
    config
        The strategy's settings; the API key comes from the environment variable ``config.api_key_env``.
    cache_dir
        Folder of the answer cache (shared by runs: identical requests are never sent twice).
    progress
        Called with (requests answered, requests in all) as answers arrive.

    Returns
    -------
    Per fold, (P(sensitive) per test cell as float32, info). P is the token probability of the answer ``1``
    when the API returns log-probabilities (``info["has_probabilities"]`` True), else the 0/1 answer itself
    (``has_probabilities`` False, with ``auroc_reason``). Cells without a valid answer are NaN, never filled;
    ``info`` counts them (``n_missing``, ``missing_reasons``) next to requests sent, cache hits, tokens and
    the estimated cost.

    Raises
    ------
    SchemaError
        When the expression has negative or non-finite values, or labels/positions do not fit the data.
    ConfigError
        When a setting or template is invalid, the key is missing for OpenAI, or the server refuses requests.
    PromptRequestError
        When requests keep failing after every retry (answers received so far stay cached).
    """
    start = time.perf_counter()
    config.validate()
    templates = load_templates(config.template_paths())
    labels = np.asarray(labels)
    if labels.shape != (adata.n_obs,):
        msg = f"labels have shape {labels.shape}; expected one label per cell ({adata.n_obs},)."
        raise SchemaError(msg)
    schema.require_value_kind(adata, needs="nonnegative", model=f"the prompt strategy ({config.model})",
                              layer=config.layer)
    X = schema.expression_matrix(adata, config.layer)
    folds = [(np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)) for train, test in folds]
    for index, (train, test) in enumerate(folds):
        for name, positions in (("train", train), ("test", test)):
            if positions.size and (positions.min() < 0 or positions.max() >= adata.n_obs):
                msg = f"fold {index}: {name} positions run outside 0..{adata.n_obs - 1}."
                raise SchemaError(msg)
        if config.shots and not np.isin(labels[train], (0, 1)).all():
            msg = f"fold {index}: training labels must be 1 (sensitive) or 0 (resistant) for few-shot examples."
            raise SchemaError(msg)
    client = ChatClient(config.api_base, api_key=_api_key(config), cache_dir=cache_dir, timeout=config.timeout,
                        max_retries=config.max_retries, max_concurrency=config.max_concurrency,
                        requests_per_minute=config.requests_per_minute, backoff_base=config.backoff_base,
                        backoff_max=config.backoff_max, seed=config.seed)
    symbols = gene_symbols(adata.var)
    sources = cell_sources(adata.obs, keys, config.source_fields)

    def usable(positions: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        return top_gene_indices(X, positions, 1)[:, 0] >= 0

    examples = [choose_examples(labels, train, config.shots, seed=config.seed, usable=usable)
                for train, _ in folds]
    needed = np.unique(np.concatenate([np.empty(0, dtype=np.int64), *(test for _, test in folds), *examples]))
    ranks = top_gene_indices(X, needed, config.genes_per_cell)

    def genes_of(position: int) -> list[str]:
        row = ranks[np.searchsorted(needed, position)]
        return [str(symbols[g]) for g in row[row >= 0]]

    requests, missing = _plan_requests(folds, examples, labels, sources, needed, ranks, genes_of, templates,
                                       config)
    n_first = len({request_key(r.body) for r in requests})
    log.info("prompting %s at %s: %d folds, %d requests of up to %d cells (%d-shot)", config.model,
             sanitise_endpoint(config.api_base), len(folds), len(requests), config.cells_per_request, config.shots)
    answers = client.complete_many([r.body for r in requests], progress=progress)
    retries: list[_Request] = []
    retry_bodies: list[dict[str, Any]] = []
    for request, result in zip(requests, answers, strict=True):
        request.results.append(result)
        request.parsed = _parse(result, request.slots.size)
        if request.parsed.labels is None:
            messages = build_retry_messages(templates, request.body["messages"], result.content or "",
                                            problem=request.parsed.problem or "", n_cells=request.slots.size)
            request.retry_body = {**request.body, "messages": messages}
            retries.append(request)
            retry_bodies.append(request.retry_body)
    if retries:
        log.info("%d answers could not be read; asking those requests once more", len(retries))
        offset = n_first
        second_report = None if progress is None else (lambda done, total: progress(offset + done, offset + total))
        for request, result in zip(retries, client.complete_many(retry_bodies, progress=second_report),
                                   strict=True):
            request.results.append(result)
            request.parsed = _parse(result, request.slots.size)
    outputs = _assemble(folds, requests, missing, examples, config, templates)
    log.info("    finished prompting in %.1fs: %d requests sent, %d cache hits", time.perf_counter() - start,
             client.counters.sent, client.counters.cache_hits)
    return outputs


def _plan_requests(folds, examples, labels, sources, needed, ranks, genes_of, templates: Templates,
                   config: PromptConfig) -> tuple[list[_Request], list[dict[str, Any]]]:
    """Group each fold's test cells by data source into requests; note cells with nothing to show."""
    requests: list[_Request] = []
    missing: list[dict[str, Any]] = []
    for index, (_, test) in enumerate(folds):
        shown = [Example(str(sources[p]), tuple(genes_of(int(p))), int(labels[p])) for p in examples[index]]
        expressed = ranks[np.searchsorted(needed, test), 0] >= 0 if test.size else np.zeros(0, dtype=bool)
        missing.append({"no_expressed_genes": np.flatnonzero(~expressed)})
        slots = np.flatnonzero(expressed)
        codes, _ = pd.factorize(sources[test[slots]])
        slots = slots[np.argsort(codes, kind="stable")]
        codes = np.sort(codes, kind="stable")
        for group in np.split(slots, np.flatnonzero(np.diff(codes)) + 1) if slots.size else []:
            for first in range(0, group.size, config.cells_per_request):
                chunk = group[first:first + config.cells_per_request]
                cells = [genes_of(int(p)) for p in test[chunk]]
                messages = build_messages(templates, source=str(sources[test[chunk[0]]]), cells=cells,
                                          n_genes=config.genes_per_cell, examples=shown)
                requests.append(_Request(index, chunk, _request_body(config, messages)))
    return requests, missing


def _assemble(folds, requests: list[_Request], missing: list[dict[str, Any]], examples, config: PromptConfig,
              templates: Templates) -> list[tuple[npt.NDArray[np.float32], dict[str, Any]]]:
    """Turn parsed answers into per-fold probabilities and facts (requests, cache hits, tokens, cost)."""
    seen: set[str] = set()
    outputs = []
    for index, (_, test) in enumerate(folds):
        answers = np.full(test.size, np.nan, dtype=np.float32)
        token_probability = np.full(test.size, np.nan, dtype=np.float64)
        reasons: Counter[str] = Counter({"no_expressed_genes": int(missing[index]["no_expressed_genes"].size)})
        facts: Counter[str] = Counter()
        any_logprobs = False
        for request in (r for r in requests if r.fold == index):
            for result in request.results:
                prompt_tokens, completion_tokens = result.usage
                first_use = result.key not in seen
                seen.add(result.key)
                sent = first_use and not result.from_cache
                facts.update(n_requests=1, n_requests_sent=int(sent), n_cache_hits=int(not sent),
                             n_http_retries=max(result.attempts - 1, 0) if sent else 0,
                             prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                             sent_prompt_tokens=prompt_tokens if sent else 0,
                             sent_completion_tokens=completion_tokens if sent else 0)
            facts.update(n_answer_retries=len(request.results) - 1)
            parsed = request.parsed
            if parsed is None or parsed.labels is None:
                reasons[(parsed.reason if parsed else None) or "unparseable"] += request.slots.size
                continue
            answers[request.slots] = parsed.labels
            final = request.results[-1]
            from_tokens = label_probabilities(final.content or "", final.logprobs, parsed)
            if from_tokens is not None:
                any_logprobs = True
                token_probability[request.slots] = from_tokens
        answered = ~np.isnan(answers)
        n_answered = int(answered.sum())
        n_with_logprobs = int((answered & ~np.isnan(token_probability)).sum())
        has_probabilities = bool(config.logprobs and n_answered and n_with_logprobs == n_answered)
        info: dict[str, Any] = {
            "n_cells": int(test.size), "n_answered": n_answered, "n_missing": int(test.size - n_answered),
            "missing_reasons": {k: int(v) for k, v in sorted(reasons.items()) if v},
            **{name: int(facts[name]) for name in ("n_requests", "n_requests_sent", "n_cache_hits",
                                                   "n_answer_retries", "n_http_retries", "prompt_tokens",
                                                   "completion_tokens", "sent_prompt_tokens",
                                                   "sent_completion_tokens")},
            "has_probabilities": has_probabilities,
        }
        info["estimated_cost_usd"] = _cost(info["prompt_tokens"], info["completion_tokens"], config)
        info["sent_cost_usd"] = _cost(info["sent_prompt_tokens"], info["sent_completion_tokens"], config)
        probability: npt.NDArray[np.float32]
        if has_probabilities:
            probability = token_probability.astype(np.float32)
            probability[~answered] = np.nan
        else:
            probability = answers
            if not config.logprobs:
                info["auroc_reason"] = "log-probabilities were not requested (logprobs=False)"
            elif not n_answered:
                info["auroc_reason"] = "no cell was answered"
            elif not any_logprobs:
                info["auroc_reason"] = NO_LOGPROBS_REASON
            else:
                info["auroc_reason"] = (f"the API returned usable log-probabilities for {n_with_logprobs} of "
                                        f"{n_answered} answered cells")
        info.update({"model": config.model, "api_base": sanitise_endpoint(config.api_base), "shots": config.shots,
                     "few_shot_positions": [int(p) for p in examples[index]],
                     "cells_per_request": config.cells_per_request, "genes_per_cell": config.genes_per_cell,
                     "template_sha256": templates.sha256})
        outputs.append((probability, info))
    return outputs


def _cost(prompt_tokens: int, completion_tokens: int, config: PromptConfig) -> float:
    return round(prompt_tokens / 1000 * config.price_per_1k_prompt_tokens
                 + completion_tokens / 1000 * config.price_per_1k_completion_tokens, 6)
