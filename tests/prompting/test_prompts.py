"""The paper's prompt, the vectorised gene ranking and the tolerant-but-strict answer parser."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdrugmap.data.schema import ObsKeys
from scdrugmap.errors import ConfigError
from scdrugmap.prompting.prompts import (
    Example,
    build_messages,
    build_retry_messages,
    cell_sources,
    example_answer,
    gene_symbols,
    label_probabilities,
    load_templates,
    parse_answer,
    top_gene_indices,
)


def _naive_top(dense: np.ndarray, n: int) -> np.ndarray:
    out = np.full((dense.shape[0], n), -1)
    for i, row in enumerate(dense):
        positive = [j for j in range(row.size) if row[j] > 0]
        ranked = sorted(positive, key=lambda j: (-row[j], j))[:n]
        out[i, :len(ranked)] = ranked
    return out


def test_top_genes_match_a_per_row_sort_with_ties_zeros_and_any_row_order():
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.6, size=(40, 30)).astype(np.float32)  # many ties and zeros
    dense[3] = 0  # a cell with nothing expressed
    dense[5, :] = 0
    dense[5, [4, 9]] = 2  # a cell with fewer than n genes
    rows = np.array([7, 3, 5, 0, 7, 39, 12])
    expected = _naive_top(dense[rows], 10)
    for matrix in (sp.csr_matrix(dense), dense, sp.csc_matrix(dense)):
        got = top_gene_indices(matrix, rows, 10)
        np.testing.assert_array_equal(got, expected)
    assert (top_gene_indices(sp.csr_matrix(dense), [3], 10) == -1).all()
    np.testing.assert_array_equal(top_gene_indices(sp.csr_matrix(dense), [5], 10)[0, :3], [4, 9, -1])


def test_gene_symbols_prefer_var_gene_symbol_and_fall_back_to_var_names():
    var = pd.DataFrame({"gene_symbol": ["TP53", None, "", "EGFR"]}, index=["ENSG1", "ENSG2", "ENSG3", "ENSG4"])
    assert list(gene_symbols(var)) == ["TP53", "ENSG2", "ENSG3", "EGFR"]
    assert list(gene_symbols(pd.DataFrame(index=["A", "B"]))) == ["A", "B"]


def test_source_line_shows_study_bare_then_named_fields_and_skips_missing_values():
    obs = pd.DataFrame({"study": ["GSE1", "GSE2", None], "tissue": ["Tumor tissue", None, None],
                        "regimen": ["anti-PD1", "PI", None]})
    got = cell_sources(obs, ObsKeys(), ("study", "tissue", "cancer_type", "regimen"))
    assert list(got) == ["GSE1; tissue: Tumor tissue; regimen: anti-PD1", "GSE2; regimen: PI", "unknown"]
    with pytest.raises(ConfigError, match="source field 'drug'"):
        cell_sources(obs, ObsKeys(), ("drug",))


def test_zero_shot_prompt_of_ten_cells_is_the_official_message_character_for_character():
    cells = [[f"G{i}_{j}" for j in range(10)] for i in range(10)]
    # the official script (code/GPT4/main.py) concatenates these pieces
    pre = ("Please use your knowledge to identify the sensitivity of the following cells to drugs. I will provide "
           "you with the names of the 10 genes with the highest expression in each cell and the source of the data "
           "set for these cells. A total of 10 cells are stored in the outer list, and the genes of each cell are "
           "stored in the inner list. If you think the cell is sensitive, answer 1, and if you think it is "
           "resistant, answer 0.")
    post = "Please merge the results of 10 cells into a format like this example: {res:1,0,1,1,1,0,0,1,0,0}. \n " * 3
    official = (pre + "\n\n" + "This is the data source:" + "\n" + "GSE161801" + "\n\n"
                + "The following are the gene names:" + "\n" + str(cells) + "\n\n" + post)
    messages = build_messages(load_templates(), source="GSE161801", cells=cells, n_genes=10)
    assert messages == [{"role": "user", "content": official}]


def test_a_short_last_request_announces_its_real_cell_count_and_answer_length():
    content = build_messages(load_templates(), source="S", cells=[["A"], ["B"], ["C"]], n_genes=10)[0]["content"]
    assert "A total of 3 cells" in content and "{res:1,0,1}" in content and "[['A'], ['B'], ['C']]" in content
    assert example_answer(12) == "1,0,1,1,1,0,0,1,0,0,1,0"


def test_few_shot_examples_come_before_the_source_with_their_answers():
    examples = [Example("GSE1; tissue: Blood", ("TP53", "EGFR"), 1), Example("GSE2", ("CD4",), 0)]
    content = build_messages(load_templates(), source="GSE9", cells=[["X"]], n_genes=2,
                             examples=examples)[0]["content"]
    assert "Example 1. Source: GSE1; tissue: Blood. Genes: TP53, EGFR. Answer: 1" in content
    assert "Example 2. Source: GSE2. Genes: CD4. Answer: 0" in content
    assert content.index("Example 2") < content.index("This is the data source:\nGSE9")
    assert "answer 0.\n\nHere are 2 example cells" in content


def test_retry_messages_show_the_bad_answer_and_ask_for_the_format_again():
    messages = [{"role": "user", "content": "q"}]
    retry = build_retry_messages(load_templates(), messages, "{res:1}", problem="it gives 1 answers for 3 cells",
                                 n_cells=3)
    assert retry[:2] == [messages[0], {"role": "assistant", "content": "{res:1}"}]
    assert "it gives 1 answers for 3 cells" in retry[2]["content"] and "{res:1,0,1}" in retry[2]["content"]


def test_user_templates_replace_the_packaged_ones_and_bad_placeholders_are_refused(tmp_path):
    user = tmp_path / "user.txt"
    user.write_text("Source $source costs $$5. Cells: $cells ($n_cells). Reply {res:$example_answer}")
    system = tmp_path / "system.txt"
    system.write_text("You are an oncologist.\n")
    messages = build_messages(load_templates({"user": user, "system": system}), source="S", cells=[["A"]],
                              n_genes=10)
    assert messages == [{"role": "system", "content": "You are an oncologist."},
                        {"role": "user", "content": "Source S costs $5. Cells: [['A']] (1). Reply {res:1}"}]
    user.write_text("Genes: $cells for $drug")
    with pytest.raises(ConfigError, match=r"uses \['drug'\]"):
        load_templates({"user": user})
    user.write_text("no genes here")
    with pytest.raises(ConfigError, match=r"must use \['\$cells'\]"):
        load_templates({"user": user})
    user.write_text("costs $5 $cells")
    with pytest.raises(ConfigError, match=r"write \$\$"):
        load_templates({"user": user})
    with pytest.raises(ConfigError, match="is not a file"):
        load_templates({"user": tmp_path / "absent.txt"})
    with pytest.raises(ConfigError, match="unknown prompt templates"):
        load_templates({"preamble": user})


@pytest.mark.parametrize("text", [
    "{res:1,0,1}",
    "{res: 1, 0, 1}",
    "Here you go:\n```json\n{ \"res\": [1, 0, 1] }\n```",
    "{RES:\n  1,\n  0,\n  1\n}",
    "{'res': ['1', '0', '1']}",
    "<think>maybe {res:0,0,0}</think>\nFinal: {res:1,0,1}",
    "Like the example {res:1,0,1,1,1,0,0,1,0,0}, my answer is {res:1,0,1}.",
])
def test_answers_are_read_whatever_their_layout(text):
    parsed = parse_answer(text, 3)
    assert parsed.labels == (1, 0, 1)
    assert [text[o] for o in parsed.offsets] == ["1", "0", "1"]


@pytest.mark.parametrize(("text", "reason"), [
    (None, "empty_answer"), ("   ", "empty_answer"), ("The first cell is sensitive.", "unparseable"),
    ("{res:1,0,2}", "unparseable"), ("{res:yes,no,yes}", "unparseable"), ("{res:1,0}", "wrong_count"),
    ("{res:1,0,1,1}", "wrong_count"), ("<think>{res:1,0,1}</think> I am not sure.", "unparseable"),
])
def test_unusable_answers_are_refused_with_a_reason(text, reason):
    parsed = parse_answer(text, 3)
    assert parsed.labels is None and parsed.reason == reason and parsed.problem


def _entry(token, logprob, top=()):
    return {"token": token, "logprob": logprob, "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top]}


def test_label_probability_is_the_softmax_over_zero_and_one_at_each_answer_token():
    content = "{res: 1,0}"
    tokens = [_entry("{", 0), _entry("res", 0), _entry(":", 0),
              _entry(" 1", math.log(0.6), [(" 1", math.log(0.6)), ("1", math.log(0.1)), (" 0", math.log(0.2)),
                                            ("x", math.log(0.1))]),
              _entry(",", 0), _entry("0", math.log(0.9), [("0", math.log(0.9))]), _entry("}", 0)]
    parsed = parse_answer(content, 2)
    got = label_probabilities(content, {"content": tokens}, parsed)
    np.testing.assert_allclose(got, [0.7 / 0.9, 0.0])  # P(1) sums both spellings of 1; an absent 1 counts 0
    assert label_probabilities(content, None, parsed) is None
    assert label_probabilities(content, {"content": None}, parsed) is None


def test_label_probability_reads_the_tokens_when_they_do_not_spell_the_content():
    tokens = [_entry("{res:", 0), _entry("1", math.log(0.8), [("1", math.log(0.8)), ("0", math.log(0.2))]),
              _entry("}", 0)]
    parsed = parse_answer("```\n{res:1}\n```", 1)
    np.testing.assert_allclose(label_probabilities("```\n{res:1}\n```", {"content": tokens}, parsed), [0.8])
    merged = [_entry("{res:1}", 0.0)]  # the digit shares a token with other text: no probability
    assert np.isnan(label_probabilities("{res:1}", {"content": merged}, parse_answer("{res:1}", 1))).all()
