"""The project's exceptions: every expected failure is a `ScDrugMapError`.

The CLI turns these into one red line and exit code 1; anything else is a bug
and keeps its traceback.
"""


class ScDrugMapError(Exception):
    """Base class of every error a user can fix without touching the code."""


class SchemaError(ScDrugMapError):
    """Input data breaks the data contract (obs columns, values, genes)."""


class CheckpointError(ScDrugMapError):
    """A checkpoint is missing, corrupted, or does not match the architecture."""


class WeightsNotFoundError(CheckpointError):
    """Weights are neither local nor cached, and cannot be downloaded now."""


class ConfigError(ScDrugMapError):
    """A run configuration names something that does not exist or cannot work."""


class SplitError(ScDrugMapError):
    """A split cannot be formed from the data as given."""


class OutputError(ScDrugMapError):
    """An output cannot be written (a full disk, no permission); nothing partial is left behind."""
