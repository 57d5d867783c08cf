"""The README's Python quickstart runs as written, and its two set-up commands are where CI finds them."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_quickstart_runs(tmp_path, monkeypatch, capsys):
    (code,) = _blocks("python")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "sensitive" in printed and "resistant" in printed and "auroc" in printed
    assert "pca" in printed and "majority" in printed
    assert (tmp_path / "runs" / "demo" / "results.parquet").exists()
    assert (tmp_path / "heads" / "pca" / "head.json").exists()


def test_two_setup_commands_are_marked_for_ci():
    text = README.read_text()
    first = re.search(r"<!-- setup:1 -->\n```bash\n(.*?)\n```", text, flags=re.S).group(1)
    second = re.search(r"<!-- setup:2 -->\n```bash\n(.*?)\n```", text, flags=re.S).group(1)
    assert "pip install torch==2.13.0" in first and first.rstrip().endswith("scdrugmap benchmark")
    assert first.index("torch==2.13.0") < first.index('-e ".[all]"')
    assert "pytest" in second
    ci = (README.parent / ".ci" / "run").read_text()
    assert "readme_block 1" in ci and "readme_block 2" in ci and "setup:$1" in ci
