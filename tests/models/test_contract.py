"""The encoder contract, checked the same way for every registered model (like parametrize_with_checks)."""

import inspect

import numpy as np
import pytest

from scdrugmap.models.base import BUILTIN_ENCODERS, Encoder, TorchEncoder, get_encoder_class, registry
from scdrugmap.models.weights import WeightsSource
from tests_helpers import make_adata

NAMES = sorted(BUILTIN_ENCODERS)


@pytest.mark.parametrize("name", NAMES)
def test_registered_class_declares_the_contract(name):
    cls = get_encoder_class(name)
    assert issubclass(cls, Encoder)
    assert cls.name == name or name == "llm"
    assert cls.family in {"scfm", "llm", "baseline"}
    assert cls.input_kind in {"counts", "nonnegative", "any"}
    assert isinstance(cls.lora_targets, tuple)
    assert not inspect.isabstract(cls), f"{cls.__name__} leaves abstract methods unimplemented"
    if cls.family == "scfm":
        assert issubclass(cls, TorchEncoder) and cls.lora_targets, "foundation models must support LoRA"
        assert cls.weights_sources, "foundation models declare their official weights"
    module = inspect.getmodule(cls)
    assert module.__doc__ and len(module.__doc__) > 80, "the module docstring cites the paper and official code"


@pytest.mark.parametrize("name", NAMES)
def test_weights_sources_are_well_formed(name):
    for variant, source in get_encoder_class(name).weights_sources.items():
        assert isinstance(source, WeightsSource) and variant
        assert source.files, f"{name}:{variant} lists no file"
        for remote in source.files:
            assert remote.url.startswith(("https://", "hf://")), remote.url
            assert remote.sha256 is None or len(remote.sha256) == 64


def test_registry_names_are_lowercase_and_unique():
    names = list(registry())
    assert names == [n.lower() for n in names] and len(set(names)) == len(names)


@pytest.mark.parametrize("name", ["pca", "hvg", "majority"])
def test_baselines_embed_every_cell_as_float32(name):
    adata = make_adata(n_cells=60)
    encoder = get_encoder_class(name).from_pretrained(None)
    embeddings = encoder.embed(adata)
    assert embeddings.dtype == np.float32 and embeddings.shape[0] == adata.n_obs
    assert np.isfinite(embeddings).all()
    assert embeddings.shape[1] == min(encoder.embedding_dim, adata.n_vars)
