"""scDrugMap: single-cell drug response prediction and benchmarking with foundation models."""

from scdrugmap.errors import CheckpointError, ScDrugMapError, SchemaError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ScDrugMapError", "SchemaError", "__version__"]
