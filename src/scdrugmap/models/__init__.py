"""The model room: the encoder contract, the registry, weights, and one module per model."""

from scdrugmap.models.base import (
    Encoder,
    TokenizedCells,
    TorchEncoder,
    get_encoder_class,
    load_encoder,
    registry,
)

__all__ = ["Encoder", "TokenizedCells", "TorchEncoder", "get_encoder_class", "load_encoder", "registry"]
