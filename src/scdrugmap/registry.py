"""The models scDrugMap knows, their published sizes and official weights (``sdm.list_models()``, ``sdm.download_weights``).

Listing never imports torch: a model's class is imported only to read its flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scdrugmap.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable


@dataclass(frozen=True)
class WeightsInfo:
    """One published variant of a model's weights: where it comes from and whether it is here."""

    variant: str
    cached: bool
    cache_path: Path
    homepage: str
    files: list[tuple[str, str]] = field(default_factory=list)  # (file name, URL)


@dataclass(frozen=True)
class ModelCard:
    """What `scdrugmap models list/info` shows about one registered model."""

    name: str
    family: str
    input_kind: str
    lora_targets: tuple[str, ...]
    parameters: int | None
    embedding_dim: int | None
    variant: str
    weights_state: str  # built in, installed, cached, downloadable, or unavailable (...)
    summary: str = ""
    description: str = ""
    weights: list[WeightsInfo] = field(default_factory=list)
    #: What ``dtype="auto"`` runs in per device ("cpu", "cuda").
    default_dtypes: dict[str, str] = field(default_factory=dict)
    #: Whether ``dtype="bfloat16"`` is allowed, with the measured parity (or why it is refused).
    bfloat16: str = ""


def _bfloat16_verdict(cls: Any) -> str:
    """Return one line on bfloat16 for ``cls``: allowed or refused, with the parity measured against float32."""
    from scdrugmap.models.base import TorchEncoder
    from scdrugmap.models.precision import parity_of

    if not issubclass(cls, TorchEncoder):
        return "computes in float32 whatever is asked (no network)"
    parity = parity_of(cls)
    if parity is None:
        return "refused: parity with float32 never measured"
    if parity.holds:
        return f"allowed: {parity.summary()}"
    return f"refused: {'; '.join(parity.failures())} ({parity.summary()})"


def _weights_state(cls: Any) -> str:
    from scdrugmap.models.weights import is_cached

    sources = getattr(cls, "weights_sources", {}) or {}
    if not sources:
        return "built in"
    default_path = getattr(cls, "_default_path", None)
    if default_path is not None and default_path(next(iter(sources))) is not None:
        return "installed"  # shipped by a pip package (all-MiniLM-L6-v2)
    if any(is_cached(source) for source in sources.values()):
        return "cached"
    return "downloadable"


def model_card(name: str) -> ModelCard:
    """Return the card of the model registered as ``name``.

    Raises
    ------
    ConfigError
        When no model has that name.
    ImportError
        When the model's optional dependencies are missing.

    Examples
    --------
    >>> import scdrugmap as sdm
    >>> card = sdm.model_card("geneformer")
    >>> card.family, card.embedding_dim
    ('scfm', 256)
    """
    from importlib import import_module

    from scdrugmap.models.base import PUBLISHED_SIZES, get_encoder_class
    from scdrugmap.models.precision import default_dtype
    from scdrugmap.models.weights import cache_path, is_cached

    cls = get_encoder_class(name)
    key = name.lower()
    parameters, width, variant = PUBLISHED_SIZES.get(key, (None, None, ""))
    doc = (cls.__doc__ or "").strip()
    weights = [WeightsInfo(variant=v, cached=is_cached(source), cache_path=cache_path(source),
                           homepage=source.homepage, files=[(f.filename, f.resolved_url()) for f in source.files])
               for v, source in (getattr(cls, "weights_sources", {}) or {}).items()]
    return ModelCard(name=key, family=cls.family, input_kind=cls.input_kind, lora_targets=tuple(cls.lora_targets),
                     parameters=parameters, embedding_dim=width, variant=variant, weights_state=_weights_state(cls),
                     summary=doc.splitlines()[0] if doc else "",
                     description=(import_module(cls.__module__).__doc__ or "").strip(), weights=weights,
                     default_dtypes={device: default_dtype(cls, device) for device in ("cpu", "cuda")},
                     bfloat16=_bfloat16_verdict(cls))


def list_models() -> list[ModelCard]:
    """Return the card of every registered model (built-in and from entry points), sorted by name.

    A model whose optional dependencies are missing gets a card whose ``weights_state`` says so.
    """
    from scdrugmap.models.base import registry

    cards = []
    for name in sorted(registry()):
        try:
            cards.append(model_card(name))
        except ImportError as err:
            cards.append(ModelCard(name=name, family="?", input_kind="", lora_targets=(), parameters=None,
                                   embedding_dim=None, variant="", weights_state=f"unavailable ({err.name} missing)"))
    return cards


def model_names() -> list[str]:
    """Return every registry name (no model class imported)."""
    from scdrugmap.models.base import registry

    return sorted(registry())


def input_kind(name: str) -> str:
    """Return what a model reads: ``counts``, ``nonnegative`` or ``any``."""
    from scdrugmap.models.base import get_encoder_class

    return get_encoder_class(name).input_kind


def download_weights(name: str, *, force: bool = False,
                     progress: Callable[[str, int, int | None], None] | None = None) -> Path:
    """Download a model's official weights into the cache (``name`` or ``name:variant``); return the folder.

    Raises
    ------
    ConfigError
        When the model has no weights (a baseline) or no such variant; downloads are checksummed and
        refused offline (``SCDRUGMAP_OFFLINE=1``).
    """
    from scdrugmap.models.base import get_encoder_class
    from scdrugmap.models.weights import download

    model, _, variant = name.partition(":")
    sources = getattr(get_encoder_class(model), "weights_sources", {}) or {}
    if not sources:
        msg = f"{model} has no weights to download (it is computed from the data)."
        raise ConfigError(msg)
    if variant and variant not in sources:
        msg = f"{model} has no variant {variant!r}; variants: {', '.join(sources)}."
        raise ConfigError(msg)
    source = sources[variant] if variant else next(iter(sources.values()))
    return download(source, force=force, progress=progress)
