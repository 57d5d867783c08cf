"""Device choice: auto picks CUDA only when visible; CPU results stay float32; mixed precision only on CUDA."""

import contextlib

import numpy as np
import pytest
import torch

from scdrugmap.errors import ConfigError
from scdrugmap.models.base import get_encoder_class, load_encoder, resolve_device
from tests_helpers import golden_case


def test_auto_is_the_cpu_without_a_gpu_and_cuda_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == "cpu"
    assert resolve_device("CPU") == "cpu"
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="--device tpu is not a device"):
        resolve_device("tpu")


def test_auto_picks_cuda_when_a_gpu_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"


def test_only_models_whose_official_inference_autocasts_declare_it():
    declared = {name: get_encoder_class(name).gpu_autocast for name in
                ["geneformer", "tgpt", "scgpt", "scfoundation", "uce", "cellplm", "scbert", "celllm", "minilm"]}
    assert declared == {**dict.fromkeys(declared), "scgpt": "float16"}


def test_on_the_cpu_a_model_runs_float32_without_autocast(shared):
    adata, weights, options = golden_case(shared, "scgpt")
    encoder = load_encoder("scgpt", weights, device="cpu", **options)
    assert encoder.autocast_dtype is None and isinstance(encoder.autocast(), contextlib.nullcontext)
    embeddings = encoder.embed(adata[:6].copy())
    assert embeddings.dtype == np.float32 and encoder.device.type == "cpu"
