"""`scdrugmap benchmark --strategies prompt` end to end on the demo collection against the local mock server."""

import pandas as pd
from mock_server import MockChatServer
from typer.testing import CliRunner

from scdrugmap.cli import app

runner = CliRunner()


def test_prompt_benchmark_on_the_demo_collection_scores_every_fold(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-123")
    out = tmp_path / "run"
    args = ["-q", "benchmark", "--strategies", "prompt", "--models", "pca", "--demo-cells", "300",
            "--categories", "tissue", "--folds", "3", "--out", str(out)]
    with MockChatServer() as server:
        result = runner.invoke(app, [*args, "--api-base", server.url, "--llm-model", "mock-4o"])
        assert result.exit_code == 0, result.output
        sent = len(server.requests)
        again = runner.invoke(app, [*args, "--api-base", server.url, "--llm-model", "mock-4o"])
        assert again.exit_code == 0 and len(server.requests) == sent  # resumed: nothing sent twice
    results = pd.read_parquet(out / "results.parquet")
    prompt = results[results["strategy"] == "prompt"]
    assert len(prompt) and set(prompt["model"]) == {"mock-4o"}
    assert set(prompt["scenario"]) == {"pooled", "cross"}
    done = prompt[prompt["status"] == "done"]
    assert len(done) and done["auroc"].notna().mean() > 0.8  # the mock returns log-probabilities
    undefined = done[done["auroc"].isna()]
    assert undefined["reasons"].str.contains("holds only").all()  # NaN only where one class is tested
    assert (prompt.loc[prompt["status"] != "done", "reasons"].str.len() > 0).all()
    for path in out.rglob("*"):
        if path.is_file():
            assert b"sk-test-secret-123" not in path.read_bytes(), path
