"""The embedding dtype: float32 by default, bfloat16 where a model's measured parity holds, refused elsewhere.

Models that allow bfloat16 must keep the documented parity on their golden cells here too; refusals name the
model, the measured parity and the reason, before any weights are read; baselines stay float32; the dtype
reaches the encoder from `tl.embed`, the CLI and the benchmark config, and is recorded with the embeddings.
"""

import numpy as np
import pytest
import torch
from model_cases import model_case

from scdrugmap import tl
from scdrugmap.errors import ConfigError
from scdrugmap.evaluate.grid import BenchmarkConfig
from scdrugmap.models.base import BUILTIN_ENCODERS, TorchEncoder, get_encoder_class, load_encoder
from scdrugmap.models.precision import (
    MEASURED_PARITY,
    MIN_COSINE,
    BFloat16Parity,
    default_dtype,
    parity_of,
    resolve_dtype,
)
from tests_helpers import make_adata

TORCH_MODELS = [n for n in sorted(BUILTIN_ENCODERS) if issubclass(get_encoder_class(n), TorchEncoder)]
ALLOWED = [n for n in TORCH_MODELS if parity_of(get_encoder_class(n)).holds]
REFUSED = [n for n in TORCH_MODELS if not parity_of(get_encoder_class(n)).holds]
#: Numbers that fail every threshold, for a model made to refuse.
FAILING = BFloat16Parity(golden_cosine=0.95, demo_cosine=0.999, auroc_delta=-0.03, speedup=1.5,
                         reason="the latent's argmax flips")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-cell cosine of ``b`` to ``a``, both centred on ``a``'s mean; `MIN_COSINE` bounds their mean."""
    keep = np.isfinite(a).all(axis=1)
    mean = a[keep].astype(np.float64).mean(axis=0)
    a, b = a[keep] - mean, b[keep] - mean
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_every_torch_model_declares_its_measured_bfloat16_parity():
    for name in TORCH_MODELS:
        parity = parity_of(get_encoder_class(name))
        assert isinstance(parity, BFloat16Parity), f"{name}: run benchmarks/bench_bf16.py and add its row"
        assert parity.holds or parity.failures(), name


@pytest.mark.parametrize("name", ALLOWED)
def test_bfloat16_keeps_the_documented_parity_on_the_golden_cells_and_returns_float32(name, shared, tmp_path):
    case = model_case(name, shared, tmp_path)
    encoder = case.load().to_device("cpu")
    reference = encoder.use_dtype("float32").embed(case.adata)
    encoder.use_dtype("bfloat16")
    assert encoder.compute_dtype == "bfloat16"
    embeddings = encoder.embed(case.adata)
    assert embeddings.dtype == np.float32 and embeddings.shape == reference.shape
    np.testing.assert_array_equal(np.isnan(embeddings), np.isnan(reference))
    assert not np.array_equal(embeddings, reference), "bfloat16 was not applied"
    assert cosines(reference, embeddings).mean() >= MIN_COSINE


def test_float32_after_bfloat16_gives_the_float32_embeddings_again(shared, tmp_path):
    case = model_case("geneformer", shared, tmp_path)
    encoder = case.load()
    cells = case.adata[:12].copy()
    first = encoder.embed(cells)
    encoder.use_dtype("bfloat16").embed(cells)
    np.testing.assert_array_equal(encoder.use_dtype("float32").embed(cells), first)


@pytest.mark.parametrize("name", REFUSED)
def test_a_model_whose_parity_fails_refuses_bfloat16_with_its_reason(name):
    parity = parity_of(get_encoder_class(name))
    with pytest.raises(ConfigError, match=f"{name} refuses --dtype bfloat16") as refused:
        resolve_dtype(get_encoder_class(name), "bfloat16", "cpu")
    assert parity.failures()[0] in str(refused.value) and "Use --dtype float32" in str(refused.value)


def test_a_refusal_names_the_model_the_measured_parity_and_the_reason_before_reading_weights(monkeypatch, tmp_path):
    monkeypatch.setitem(MEASURED_PARITY, "scgpt", FAILING)
    with pytest.raises(ConfigError) as refused:
        load_encoder("scgpt", tmp_path / "no-such-checkpoint", device="cpu", dtype="bfloat16")
    message = str(refused.value)
    assert message.startswith("scgpt refuses --dtype bfloat16: golden-cell mean centred cosine 0.9500 < 0.995; ")
    assert "|demo AUROC change| 0.0300 > 0.01" in message and "the latent's argmax flips" in message
    assert "measured: mean centred cosine 0.9500 on the golden cells, 0.9990 on the demo" in message
    assert message.endswith("Use --dtype float32.")


def test_a_model_without_a_measured_parity_refuses_bfloat16(monkeypatch):
    monkeypatch.delitem(MEASURED_PARITY, "tgpt")
    with pytest.raises(ConfigError, match="tgpt refuses --dtype bfloat16: its parity with float32 was never measured"):
        resolve_dtype(get_encoder_class("tgpt"), "bfloat16", "cpu")


def test_an_unknown_dtype_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match="--dtype float16 is not available; choose from auto, float32, bfloat16"):
        resolve_dtype(get_encoder_class("geneformer"), "float16", "cpu")


@pytest.mark.parametrize("name", TORCH_MODELS)
def test_auto_is_float32_on_the_cpu_and_the_official_mixed_precision_on_cuda(name):
    cls = get_encoder_class(name)
    assert default_dtype(cls, "cpu") == resolve_dtype(cls, "auto", "cpu") == "float32"
    assert resolve_dtype(cls, None, "cuda:1") == ("float16" if name == "scgpt" else "float32")
    assert resolve_dtype(cls, "float32", "cuda") == "float32"


def test_on_cuda_float32_turns_the_official_autocast_off(shared, tmp_path, monkeypatch):
    case = model_case("scgpt", shared, tmp_path)
    encoder = case.load()
    monkeypatch.setattr(type(encoder.module), "to", lambda module, *args, **kwargs: module)  # no GPU here
    monkeypatch.setattr(type(encoder), "device", property(lambda self: torch.device("cuda")))
    encoder.to_device("cuda")
    assert encoder.autocast_dtype == torch.float16 and encoder.compute_dtype == "float16"
    encoder.use_dtype("float32")
    assert encoder.autocast_dtype is None and encoder.compute_dtype == "float32"
    encoder.to_device("cuda")  # a dtype asked for stays asked for
    assert encoder.autocast_dtype is None


@pytest.mark.parametrize("name", ["pca", "hvg"])
def test_baselines_compute_float32_whatever_dtype_is_asked(name, caplog):
    adata = make_adata(n_cells=40)
    with caplog.at_level("INFO", logger="scdrugmap.models.precision"):
        tl.embed(adata, name, dtype="bfloat16")
    assert adata.uns["scdrugmap"][f"X_{name}"]["dtype"] == "float32"
    assert adata.obsm[f"X_{name}"].dtype == np.float32
    assert f"{name} has no network: it computes in float32 whatever --dtype says" in caplog.text


def test_tl_embed_records_the_dtype_next_to_the_model(shared, tmp_path):
    case = model_case("tgpt", shared, tmp_path)
    embedded = tl.embed(case.adata, "tgpt", weights=case.weights, device="cpu", dtype="bfloat16", copy=True)
    default = tl.embed(case.adata, "tgpt", weights=case.weights, device="cpu", copy=True)
    facts = embedded.uns["scdrugmap"]["X_tgpt"]
    assert facts["model"] == "tgpt" and facts["dtype"] == "bfloat16"
    assert default.uns["scdrugmap"]["X_tgpt"]["dtype"] == "float32"
    assert cosines(default.obsm["X_tgpt"], embedded.obsm["X_tgpt"]).mean() >= MIN_COSINE


def test_cli_embed_dtype_reaches_the_encoder_and_is_written(shared, tmp_path, monkeypatch):
    import anndata as ad
    from typer.testing import CliRunner

    from scdrugmap.cli import app

    case = model_case("tgpt", shared, tmp_path)
    path = tmp_path / "cells.h5ad"
    case.adata.write_h5ad(path)
    runner = CliRunner()
    args = ["--quiet", "embed", str(path), "--model", "tgpt", "--weights", str(case.weights), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--dtype", "bfloat16", "--out", str(tmp_path / "bf16.h5ad")])
    assert result.exit_code == 0, result.output
    written = ad.read_h5ad(tmp_path / "bf16.h5ad")
    assert written.uns["scdrugmap"]["X_tgpt"]["dtype"] == "bfloat16"
    reference = load_encoder("tgpt", case.weights, device="cpu").embed(case.adata)
    assert written.obsm["X_tgpt"].dtype == np.float32
    assert not np.array_equal(written.obsm["X_tgpt"], reference)
    assert cosines(reference, written.obsm["X_tgpt"]).mean() >= MIN_COSINE

    monkeypatch.setitem(MEASURED_PARITY, "tgpt", FAILING)
    refused = runner.invoke(app, [*args, "--dtype", "bfloat16", "--out", str(tmp_path / "refused.h5ad")])
    assert refused.exit_code != 0 and "tgpt refuses --dtype bfloat16" in str(refused.exception)
    assert not (tmp_path / "refused.h5ad").exists()


def test_benchmark_refuses_bfloat16_for_a_refusing_model_before_running_unless_it_opts_out(monkeypatch, tmp_path):
    monkeypatch.setitem(MEASURED_PARITY, "tgpt", FAILING)
    config = BenchmarkConfig(models=["pca", "tgpt", "majority"], dtype="bfloat16", out=str(tmp_path))
    with pytest.raises(ConfigError, match="tgpt refuses --dtype bfloat16"):
        config.validate()
    BenchmarkConfig(models=["pca", "tgpt", "majority"], dtype="bfloat16", out=str(tmp_path),
                    model_options={"tgpt": {"dtype": "float32"}}).validate()
    with pytest.raises(ConfigError, match="--dtype half is not available"):
        BenchmarkConfig(models=["pca"], dtype="half").validate()


def test_benchmark_dtype_reaches_each_model_is_recorded_and_caches_apart_from_float32(shared, tmp_path):
    import json

    from typer.testing import CliRunner

    from scdrugmap.cli import app

    case = model_case("tgpt", shared, tmp_path)
    path = tmp_path / "cells.h5ad"
    case.adata.write_h5ad(path)
    args = ["-q", "benchmark", "--data", str(path), "--models", "majority,tgpt", "--weights",
            f"tgpt={case.weights}", "--folds", "2", "--categories", "tissue", "--scenarios", "pooled",
            "--device", "cpu"]
    facts = {}
    for dtype in ("float32", "bfloat16"):
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / dtype), "--dtype", dtype])
        assert result.exit_code == 0, result.output
        facts[dtype] = json.loads((tmp_path / dtype / "models.json").read_text())
    assert facts["float32"]["tgpt"]["dtype"] == "float32" and facts["bfloat16"]["tgpt"]["dtype"] == "bfloat16"
    assert facts["bfloat16"]["tgpt"]["cache"] == "miss", "bfloat16 embeddings must not reuse the float32 ones"
    assert facts["bfloat16"]["majority"]["dtype"] == "float32"


def test_a_plugin_declares_its_parity_on_its_class_over_the_table(monkeypatch):
    cls = get_encoder_class("tgpt")
    monkeypatch.setattr(cls, "bfloat16_parity", FAILING)
    with pytest.raises(ConfigError, match="tgpt refuses --dtype bfloat16: golden-cell mean centred cosine 0.9500"):
        resolve_dtype(cls, "bfloat16", "cpu")


def test_model_cards_give_the_default_dtype_per_device_and_the_bfloat16_verdict():
    from scdrugmap.registry import model_card

    for name in TORCH_MODELS:
        card = model_card(name)
        assert card.default_dtypes == {"cpu": "float32", "cuda": "float16" if name == "scgpt" else "float32"}
        assert card.bfloat16.startswith("allowed: " if name in ALLOWED else "refused: "), card.bfloat16
        assert "centred cosine" in card.bfloat16 and "CPU speed-up" in card.bfloat16
    assert model_card("pca").bfloat16 == "computes in float32 whatever is asked (no network)"
