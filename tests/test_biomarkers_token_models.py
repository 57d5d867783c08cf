"""`scdrugmap biomarkers --model M --head HEAD` attributes and deletes genes with every token model (golden weights).

Per model: a logistic head trained with `sdm.tl.train` on 32 golden cells (labels that vary within samples, so the
differential expression is the fast Wilcoxon test), then the command with ``--cells 4 --genes 10 --steps 24 --bootstrap 0``.
The golden checkpoints need loader options the command line has no flags for (tiny configs, gene index files;
`token_model_cases.FAST_OPTIONS`), so the test adds them to `load_encoder` (and loads each model once); and the figures are not drawn (their
own tests are in test_biomarkers.py): drawing three PNGs costs more than the attribution of these tiny models.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import scdrugmap as sdm
from scdrugmap.cli import app
from token_model_cases import TOKEN_MODELS, attribution_case

pytest.importorskip("captum")
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("name", TOKEN_MODELS)
def test_biomarkers_attributes_and_deletes_genes_with_every_token_model(name, shared, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from scdrugmap.models import base

    case = attribution_case(name, shared, tmp_path)
    loaded = {}
    load_encoder = base.load_encoder

    def load_once(model, weights=None, **options):
        """The golden options, and one load per test (train, predict and attribution ask for the same model)."""
        if model not in loaded:
            loaded[model] = load_encoder(model, weights, **{**case.options, **options})
        return loaded[model]

    monkeypatch.setattr(base, "load_encoder", load_once)
    monkeypatch.setattr(sdm.tl, "_save", lambda figure, path: (plt.close(figure), path.write_bytes(b"")))
    cells = case.adata[:32].copy()
    cells.obs["response"] = np.where((np.arange(cells.n_obs) // 8) % 2, "sensitive", "resistant")
    head = sdm.tl.train(cells, name, head="logistic", weights=str(case.weights))
    head.save(tmp_path / "head")
    cells.write_h5ad(tmp_path / "cells.h5ad")

    result = runner.invoke(app, ["--quiet", "biomarkers", str(tmp_path / "cells.h5ad"), "--model", name,
                                 "--head", str(tmp_path / "head"), "--weights", str(case.weights),
                                 "--out", str(tmp_path / "out"), "--comparisons", "observed", "--cells", "4",
                                 "--genes", "10", "--steps", "24", "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    assert "attribution: integrated_gradients" in result.output and "completeness:" in result.output
    facts = json.loads((tmp_path / "out" / "biomarkers.json").read_text())
    about = facts["attribution"]
    assert about["method"] == "integrated_gradients" and about["n_cells"] == 4 and about["baseline"]
    assert about["completeness_error_max"] < 0.05
    assert facts["deletion"]["n_genes"] == 10 and facts["deletion"]["n_cells"] == 4
    table = pd.read_parquet(tmp_path / "out" / "biomarkers.parquet")
    assert (table["attribution_abs_mean"] > 0).any()
    assert table["deletion_delta"].notna().sum() >= 1
