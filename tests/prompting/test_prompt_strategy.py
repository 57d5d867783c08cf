"""fit_predict_prompt end to end against the local mock server: prompts, answers, retries, cache, few-shot, key."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import numpy as np
import pytest
from mock_server import GENES_HEADER, MockChatServer, marker_probability, prompt_cells

from scdrugmap.data.schema import ObsKeys, encode_labels
from scdrugmap.errors import ConfigError, SchemaError
from scdrugmap.prompting import NO_LOGPROBS_REASON, PromptConfig, describe_config, fit_predict_prompt
from scdrugmap.prompting.strategy import choose_examples

KEY = "sk-test-DO-NOT-LEAK-0123456789"


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return KEY


@pytest.fixture
def data(adata):
    labels = encode_labels(adata.obs["response"].to_numpy())
    sample = adata.obs["sample"].str[1:].astype(int).to_numpy()
    first = np.flatnonzero(sample < 4)
    second = np.flatnonzero(sample >= 4)
    return adata, labels, [(first, second), (second, first)]


def _config(server, **options) -> PromptConfig:
    return PromptConfig(**{"api_base": server.url, "model": "mock-4o", "backoff_base": 0.001, "backoff_max": 0.01,
                           "max_retries": 2, **options})


def _expected_genes(adata, position: int, n: int = 10) -> list[str]:
    row = adata.X[position].toarray().ravel()
    order = sorted((j for j in range(row.size) if row[j] > 0), key=lambda j: (-row[j], j))[:n]
    return [str(adata.var_names[j]) for j in order]


def _run(adata, labels, folds, config, tmp_path, **kwargs):
    return fit_predict_prompt(adata, labels, folds, keys=ObsKeys(), config=config, cache_dir=tmp_path / "cache",
                              **kwargs)


def test_prompts_carry_ten_cells_of_ten_top_genes_under_their_source_line(key, data, tmp_path):
    adata, labels, folds = data
    with MockChatServer() as server:
        _run(adata, labels, folds[:1], _config(server), tmp_path)
    bodies = [r["body"] for r in server.requests]
    test = folds[0][1]
    # requests of 10 cells sharing a source: 20 test cells of GSE100 and 20 of GSE101
    assert [len(prompt_cells(b)) for b in bodies] == [10, 10, 10, 10]
    sent = sorted(genes for b in bodies for genes in prompt_cells(b))
    assert sent == sorted(_expected_genes(adata, p) for p in test)
    assert all(len(genes) == 10 for genes in sent)
    obs = adata.obs.iloc[test]
    expected_sources = {f"{study}; tissue: {tissue}; cancer type: Melanoma; regimen: anti-PD1"
                        for study, tissue in zip(obs["study"], obs["tissue"], strict=True)}
    shown = set()
    for body in bodies:
        content = body["messages"][0]["content"]
        shown.add(re.search(r"This is the data source:\n(.+)\n\n", content).group(1))
        assert f"A total of {len(prompt_cells(body))} cells" in content
        assert {k: body[k] for k in ("model", "temperature", "seed", "logprobs", "top_logprobs")} == {
            "model": "mock-4o", "temperature": 0.0, "seed": 0, "logprobs": True, "top_logprobs": 5}
    assert shown == expected_sources and len(shown) == 2


def test_each_test_cell_gets_the_token_probability_of_its_answer(key, data, tmp_path):
    adata, labels, folds = data
    with MockChatServer() as server:
        results = _run(adata, labels, folds, _config(server), tmp_path)
    for (_, test), (probability, info) in zip(folds, results, strict=True):
        expected = [marker_probability(_expected_genes(adata, p)) for p in test]
        assert probability.dtype == np.float32 and probability.shape == test.shape
        np.testing.assert_allclose(probability, expected, rtol=1e-6)
        assert info["has_probabilities"] and "auroc_reason" not in info
        assert info["n_missing"] == 0 and info["missing_reasons"] == {}
        assert info["n_requests"] == 4 and info["prompt_tokens"] > 0 and info["estimated_cost_usd"] > 0
    assert np.corrcoef(results[0][0], labels[folds[0][1]])[0, 1] > 0.3  # the mock is a weak marker classifier


def test_a_rerun_sends_no_request_and_gives_the_same_predictions(key, data, tmp_path):
    adata, labels, folds = data
    with MockChatServer() as server:
        first = _run(adata, labels, folds, _config(server), tmp_path)
        sent = len(server.requests)
        second = _run(adata, labels, folds, _config(server), tmp_path)
    assert sent == 8 and len(server.requests) == sent
    assert sum(info["n_requests_sent"] for _, info in first) == 8
    for (p1, i1), (p2, i2) in zip(first, second, strict=True):
        np.testing.assert_array_equal(p1, p2)
        assert i2["n_requests_sent"] == 0 and i2["n_cache_hits"] == i2["n_requests"] == 4 and i2["sent_cost_usd"] == 0
        assert i2["estimated_cost_usd"] == i1["estimated_cost_usd"]


def test_overlapping_folds_send_each_request_once(key, data, tmp_path):
    adata, labels, folds = data
    with MockChatServer() as server:
        results = _run(adata, labels, [folds[0], folds[0]], _config(server), tmp_path)
    assert len(server.requests) == 4
    assert results[0][1]["n_requests_sent"] == 4 and results[1][1]["n_cache_hits"] == 4


def test_an_unreadable_answer_is_asked_again_once_then_its_cells_are_missing(key, data, tmp_path):
    adata, labels, folds = data
    with MockChatServer(answer=lambda body: "These cells look resistant to me.") as server:
        probability, info = _run(adata, labels, folds[:1], _config(server), tmp_path)[0]
    assert len(server.requests) == 8  # 4 requests, each retried once
    retried = [r["body"]["messages"] for r in server.requests if len(r["body"]["messages"]) == 3]
    assert len(retried) == 4
    assert retried[0][1] == {"role": "assistant", "content": "These cells look resistant to me."}
    assert "it holds no {res:...} list" in retried[0][2]["content"]
    assert np.isnan(probability).all()
    assert info["n_missing"] == 40 and info["missing_reasons"] == {"unparseable": 40}
    assert info["n_answer_retries"] == 4 and not info["has_probabilities"]


def test_a_short_answer_is_retried_and_the_second_answer_is_used(key, data, tmp_path):
    adata, labels, folds = data

    def answer(body):
        n = len(prompt_cells(body))
        if len(body["messages"]) == 1:
            return "{res:" + ",".join(["1"] * (n - 1)) + "}"
        return "```\n{res: " + ", ".join(["0"] * n) + "}\n```"

    with MockChatServer(answer=answer) as server:
        probability, info = _run(adata, labels, folds[:1], _config(server), tmp_path)[0]
    assert len(server.requests) == 8
    problems = [r["body"]["messages"][2]["content"] for r in server.requests if len(r["body"]["messages"]) == 3]
    assert sum("it gives 9 answers for 10 cells" in text for text in problems) == 4
    assert (probability == 0).all() and info["n_missing"] == 0 and info["n_answer_retries"] == 4


def test_a_still_wrong_count_is_missing_and_never_filled(key, data, tmp_path):
    adata, labels, folds = data
    with MockChatServer(answer=lambda body: "{res:1,0}") as server:
        probability, info = _run(adata, labels, folds[:1], _config(server), tmp_path)[0]
    assert len(server.requests) == 8
    assert np.isnan(probability).all() and info["missing_reasons"] == {"wrong_count": 40}


def test_without_log_probabilities_the_answers_are_returned_with_the_reason(key, data, tmp_path):
    adata, labels, folds = data
    with MockChatServer(logprobs=False) as server:
        probability, info = _run(adata, labels, folds[:1], _config(server), tmp_path)[0]
    assert set(np.unique(probability)) <= {0.0, 1.0} and not np.isnan(probability).any()
    assert info["has_probabilities"] is False and info["auroc_reason"] == NO_LOGPROBS_REASON
    with MockChatServer() as server:
        _, info = _run(adata, labels, folds[:1], _config(server, logprobs=False), tmp_path)[0]
    assert "logprobs" not in server.requests[0]["body"] and "not requested" in info["auroc_reason"]


def test_few_shot_examples_are_balanced_training_cells_never_test_cells(key, data, tmp_path):
    adata, labels, folds = data
    with MockChatServer() as server:
        results = _run(adata, labels, folds, _config(server, shots=4, seed=7), tmp_path)
        again = _run(adata, labels, folds, _config(server, shots=4, seed=7), tmp_path / "other")
    for fold, ((train, test), (_, info)) in enumerate(zip(folds, results, strict=True)):
        chosen = np.asarray(info["few_shot_positions"])
        assert chosen.size == 4 and np.isin(chosen, train).all() and not np.isin(chosen, test).any()
        assert sorted(labels[chosen]) == [0, 0, 1, 1]
        assert again[fold][1]["few_shot_positions"] == info["few_shot_positions"]  # seeded
        lines = [f"Example {i + 1}. Source: " for i in range(4)]
        expected = [f"Genes: {', '.join(_expected_genes(adata, p))}. Answer: {labels[p]}" for p in chosen]
        fold_bodies = [r["body"] for r in server.requests[:8] if _is_from(adata, r["body"], test)]
        assert len(fold_bodies) == 4
        for body in fold_bodies:
            content = body["messages"][0]["content"]
            block = content.split("This is the data source:")[0]
            assert all(line in block for line in lines) and all(text in block for text in expected)
            assert content.index("Example 4") < content.index(GENES_HEADER)


def _is_from(adata, body, positions) -> bool:
    test_genes = {tuple(_expected_genes(adata, p)) for p in positions}
    return all(tuple(genes) in test_genes for genes in prompt_cells(body))


def test_the_api_key_never_reaches_cache_logs_results_or_config_dumps(key, data, tmp_path, caplog):
    adata, labels, folds = data
    caplog.set_level(logging.DEBUG)
    with MockChatServer() as server:
        server.queue(429, headers={"Retry-After": "0"})
        server.queue(500, {"error": {"message": f"upstream rejected {KEY}"}})
        config = _config(server, shots=2)
        results = _run(adata, labels, folds, config, tmp_path)
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in server.requests)  # the key was used
    assert sum(info["n_http_retries"] for _, info in results) == 2
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text()
    assert KEY not in json.dumps([info for _, info in results])
    assert KEY not in caplog.text and "retry" in caplog.text
    assert KEY not in repr(config) and KEY not in json.dumps(describe_config(config))
    assert KEY not in str(dataclasses.asdict(config))
    assert not any("key" in f.name and f.name != "api_key_env" for f in dataclasses.fields(config))


def test_an_openai_endpoint_without_a_key_is_refused_before_any_request(data, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    adata, labels, folds = data
    with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set"):
        _run(adata, labels, folds, PromptConfig(), tmp_path)
    with pytest.raises(ConfigError, match="never in a config file"):
        PromptConfig.from_dict({"api_key": "sk-..."})


def test_negative_expression_is_refused(key, data, tmp_path):
    adata, labels, folds = data
    adata.X = adata.X.toarray() - 3.0
    with pytest.raises(SchemaError, match="non-negative"):
        _run(adata, labels, folds, PromptConfig(api_base="http://127.0.0.1:9/v1"), tmp_path)


def test_a_cell_with_no_expressed_gene_is_missing_and_never_sent(key, data, tmp_path):
    adata, labels, folds = data
    test = folds[0][1]
    dense = adata.X.toarray()
    dense[test[3]] = 0
    adata.X = dense  # dense input works too
    with MockChatServer() as server:
        probability, info = _run(adata, labels, folds[:1], _config(server), tmp_path)[0]
    assert np.isnan(probability[3]) and not np.isnan(np.delete(probability, 3)).any()
    assert info["missing_reasons"] == {"no_expressed_genes": 1} and info["n_missing"] == 1
    assert sum(len(prompt_cells(r["body"])) for r in server.requests) == test.size - 1
    assert info["has_probabilities"]


def test_progress_counts_requests(key, data, tmp_path):
    adata, labels, folds = data
    seen = []
    with MockChatServer() as server:
        _run(adata, labels, folds[:1], _config(server, cells_per_request=8, genes_per_cell=3), tmp_path,
             progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 6) and seen[-1] == (6, 6)  # 20 cells per source: 8 + 8 + 4
    assert all(len(genes) == 3 for r in server.requests for genes in prompt_cells(r["body"]))


def test_invalid_settings_are_refused_naming_the_setting(key, data, tmp_path):
    adata, labels, folds = data
    with pytest.raises(ConfigError, match="cells_per_request=0"):
        _run(adata, labels, folds, PromptConfig(api_base="http://127.0.0.1:9/v1", cells_per_request=0), tmp_path)
    with pytest.raises(ConfigError, match="unknown prompt settings"):
        PromptConfig.from_dict({"modle": "x"})
    assert PromptConfig.from_dict({"source_fields": ["study"]}).source_fields == ("study",)


def test_example_choice_is_seeded_balanced_and_tops_up_a_small_class():
    labels = np.array([1] * 10 + [0] * 2)
    train = np.arange(12)
    chosen = choose_examples(labels, train, 6, seed=0)
    assert sorted(labels[chosen]) == [0, 0, 1, 1, 1, 1]  # two resistant cells only: the rest are sensitive
    np.testing.assert_array_equal(chosen, choose_examples(labels, train, 6, seed=0))
    odd = choose_examples(np.array([0, 1] * 6), train, 3, seed=1)
    assert odd.size == 3 and len(set(odd)) == 3
    usable = choose_examples(labels, train, 4, seed=0, usable=lambda positions: positions % 2 == 0)
    assert (usable % 2 == 0).all() and usable.size == 4
    assert choose_examples(labels, train, 0, seed=0).size == 0


def test_a_template_folder_replaces_the_packaged_templates_it_holds(key, data, tmp_path):
    adata, labels, folds = data
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "user.txt").write_text(f"Cells from $source.\n{GENES_HEADER}$cells\n\nReply {{res:$example_answer}}")
    (folder / "system.txt").write_text("You are a careful oncologist.")
    retry = tmp_path / "retry.txt"
    retry.write_text("Again please: $problem")
    config = PromptConfig(template_dir=str(folder), retry_template=str(retry))
    paths = config.template_paths()
    assert paths["user"] == folder / "user.txt" and paths["retry"] == str(retry) and paths["example"] is None
    with MockChatServer() as server:
        _, info = _run(adata, labels, folds[:1], _config(server, template_dir=str(folder)), tmp_path)[0]
    messages = server.requests[0]["body"]["messages"]
    assert messages[0] == {"role": "system", "content": "You are a careful oncologist."}
    assert messages[1]["content"].startswith("Cells from GSE10")
    assert info["n_missing"] == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds none of"):
        PromptConfig(template_dir=str(empty)).template_paths()
    with pytest.raises(ConfigError, match="is not a folder"):
        PromptConfig(template_dir=str(tmp_path / "absent")).template_paths()
