"""The encoder contract, checked the same way for every registered model (like parametrize_with_checks).

Every registered model declares the contract; the baselines embed every cell; every torch model (the
eight single-cell foundation models on their golden tiny checkpoints, MiniLM, a tiny random Llama) gives
float32 (cells x embedding_dim) embeddings, refuses a checkpoint with one parameter removed or mis-shaped
naming that parameter, and takes LoRA adapters through the project's own `scdrugmap.train.lora` that
start as the identity, receive gradients and change the output. Per-model files test golden parity.
"""

import copy
import inspect

import numpy as np
import pytest
from model_cases import broken_checkpoint, model_case

from scdrugmap.errors import CheckpointError
from scdrugmap.models.base import BUILTIN_ENCODERS, Encoder, TorchEncoder, get_encoder_class, registry
from scdrugmap.models.weights import WeightsSource
from tests_helpers import make_adata

NAMES = sorted(BUILTIN_ENCODERS)
#: Registered models backed by a torch network and a checkpoint (all but the baselines, which fit on the data).
TORCH_MODELS = [name for name in NAMES if issubclass(get_encoder_class(name), TorchEncoder)]
#: Cells embedded per check (a few of each case's labelled copies of the golden cells).
N_CELLS = 12


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


# --- every torch model ------------------------------------------------------------------------------------


def test_every_model_but_the_baselines_is_checked_below():
    assert {get_encoder_class(name).family for name in set(NAMES) - set(TORCH_MODELS)} == {"baseline"}


@pytest.mark.parametrize("name", TORCH_MODELS)
def test_embeddings_are_float32_with_one_row_per_cell_and_the_checkpoint_digest_is_kept(name, shared, tmp_path):
    case = model_case(name, shared, tmp_path)
    encoder = case.load()
    adata = case.adata[:N_CELLS].copy()
    embeddings = encoder.embed(adata)
    assert embeddings.dtype == np.float32
    assert embeddings.shape == (adata.n_obs, encoder.embedding_dim)
    kept = np.isfinite(embeddings).all(axis=1)
    assert kept.any() and (kept | np.isnan(embeddings).all(axis=1)).all(), "a dropped cell's row is all NaN"
    assert encoder.checkpoint_sha256 is not None and len(encoder.checkpoint_sha256) == 64


@pytest.mark.parametrize("edit", ["missing", "misshaped"])
@pytest.mark.parametrize("name", TORCH_MODELS)
def test_a_checkpoint_missing_or_misshaping_a_parameter_is_refused_naming_it(name, edit, shared, tmp_path):
    case = model_case(name, shared, tmp_path)
    module = case.load().module
    weights, parameter = broken_checkpoint(case, module, tmp_path / "broken", edit)
    with pytest.raises(CheckpointError) as refused:
        case.load(weights)
    assert parameter in str(refused.value)


@pytest.mark.parametrize("name", TORCH_MODELS)
def test_lora_adapters_start_as_identity_receive_gradients_and_change_the_output(name, shared, tmp_path):
    import torch

    from scdrugmap.train.lora import LoRAConfig, add_adapters, using_module

    case = model_case(name, shared, tmp_path)
    encoder = case.load()
    tokens = encoder.tokenize(case.adata[:N_CELLS].copy())
    base = encoder.embed_tokens(tokens)
    with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global RNG
        torch.manual_seed(0)
        module = add_adapters(copy.deepcopy(encoder.module), encoder.lora_targets, LoRAConfig(),
                              dict(encoder.lora_options))
    adapters = {n: p for n, p in module.named_parameters() if "lora_" in n}
    targeted = [n for n, _ in encoder.module.named_modules() if n.rsplit(".", 1)[-1] in encoder.lora_targets]
    assert len(adapters) == 2 * len(targeted) > 0, "one lora_A and one lora_B per targeted module"
    assert all(p.requires_grad == ("lora_" in n) for n, p in module.named_parameters()), "only adapters train"
    ran = set()
    hooks = [m.register_forward_hook(lambda *_, name=n: ran.add(name)) for n, m in module.named_modules()
             if n.endswith("lora_B.default")]
    optimizer = torch.optim.Adam(adapters.values(), lr=1e-2)
    with using_module(encoder, module):
        before = encoder.embed_tokens(tokens)
        module.eval()  # no dropout: the check is deterministic
        batch = encoder.collate(tokens, np.arange(min(4, tokens.n_cells)))
        batch = {k: v.to(encoder.device) if hasattr(v, "to") else v for k, v in batch.items()}
        pooled = encoder.encode(batch)
        target = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(0))
        (pooled * target.to(pooled.device)).sum().backward()  # not the norm: UCE's embeddings have norm 1
        for hook in hooks:
            hook.remove()
        optimizer.step()
        after = encoder.embed_tokens(tokens)
    np.testing.assert_allclose(before, base, rtol=0, atol=1e-6, err_msg="lora_B starts at 0: no change yet")
    assert ran, "no adapter ran in the forward pass"
    for adapter in ran:  # adapters of layers the pooling never runs (Geneformer's last) get no gradient
        grad = adapters[f"{adapter}.weight"].grad
        assert grad is not None and grad.abs().sum() > 0, f"{adapter} ran but got no gradient"
    assert np.abs(after - before).max() > 1e-3


def test_built_in_encoders_are_found_without_reading_entry_points_and_plugins_still_are(monkeypatch):
    from types import SimpleNamespace

    import scdrugmap.models.base as base
    from scdrugmap.errors import ConfigError

    def no_entry_points(**_):
        raise AssertionError("entry points read for a built-in encoder")

    monkeypatch.setattr(base, "entry_points", no_entry_points)
    assert get_encoder_class("PCA").name == "pca"
    plugin = SimpleNamespace(name="Plugged", value="scdrugmap.models.baselines:HVGEncoder")
    monkeypatch.setattr(base, "entry_points", lambda **_: [plugin])
    assert get_encoder_class("plugged").name == "hvg"
    with pytest.raises(ConfigError, match="unknown model 'nope'.*plugged"):
        get_encoder_class("nope")
