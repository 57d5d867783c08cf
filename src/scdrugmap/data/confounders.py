"""Where labels coincide with the units that carry them: samples, cell lines, sublines, studies.

When every sample (patient, cell line, subline) holds one label, a model can score by recognising the
unit instead of reading response: anything that tells samples apart (a batch, a genotype, a cell-type
mixture) predicts the label. The benchmark's patient-grouped split and sample-level results guard
against that; `label_coincidences` names the columns where it happens, for ``scdrugmap check`` and the
report. Nothing here imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import numpy.typing as npt

    from scdrugmap.data.schema import ObsKeys

#: Other obs columns that name units cells come from (cell lines, sublines, clones, donors, batches).
UNIT_COLUMN = re.compile(r"(cell_?line|sub_?line|clone|donor|patient|individual|batch|replicate)", re.IGNORECASE)
#: Values named in a message.
EXAMPLES = 3


@dataclass(frozen=True)
class Coincidence:
    """An obs column whose every value holds cells of one label only."""

    column: str
    kind: str
    n_values: int
    examples: tuple[str, ...]

    def message(self) -> str:
        shown = ", ".join(self.examples)
        more = f", ... ({self.n_values} in all)" if self.n_values > len(self.examples) else ""
        advice = {"sample": "use patient-grouped splits (--split sample) and read the sample-level results",
                  "study": "the cross-study scenario then holds out one label at a time; compare studies with care"}
        return (f"labels coincide with {self.kind}s (obs[{self.column!r}]): each of its {self.n_values} values holds "
                f"one label ({shown}{more}), so a model can score by recognising the {self.kind} rather than the "
                f"response; {advice.get(self.kind, 'keep each ' + self.kind + ' on one side of every split')}.")


def text_codes(values: pd.Series) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.object_]]:
    """Return (a code per cell, the sorted distinct texts) of ``values.astype(str)``.

    What ``pd.factorize(values.astype(str).to_numpy(), sort=True)`` returns (tested equal). A categorical
    column is read from its codes, its categories made text once each: no text per cell is made or hashed.
    """
    if not isinstance(values.dtype, pd.CategoricalDtype):
        return pd.factorize(values.astype(str).to_numpy(), sort=True)
    codes = values.cat.codes.to_numpy()
    texts = np.asarray(values.cat.categories.astype(str), dtype=object)
    missing = codes < 0
    if missing.any():  # NaN: the text astype(str) gives it, as one more category
        texts = np.append(texts, values[missing].astype(str).iloc[0])
        codes = np.where(missing, texts.size - 1, codes)
    per_category, names = pd.factorize(texts, sort=True)  # categories of one text share its code
    cell_codes = per_category[codes]
    used = np.bincount(cell_codes, minlength=names.size) > 0
    if not used.all():  # categories no cell holds are not values
        cell_codes, names = (np.cumsum(used) - 1)[cell_codes], names[used]
    return cell_codes, names


def unit_columns(columns: list[str], keys: ObsKeys) -> list[tuple[str, str]]:
    """Return (column, kind) of the columns that may carry labels: sample, dataset, study, cell lines..."""
    found = [(keys.sample, "sample"), (keys.dataset, "dataset"), (keys.study, "study")]
    found += [(c, match.group(1).lower().replace("_", " ")) for c in columns
              if (match := UNIT_COLUMN.search(c)) and c not in {keys.sample, keys.dataset, keys.study}]
    return [(column, kind) for column, kind in found if column in columns]


def label_coincidences(obs: pd.DataFrame, labels: npt.ArrayLike, keys: ObsKeys) -> list[Coincidence]:
    """Return the unit columns (`unit_columns`) with two or more values where each value holds one label.

    Parameters
    ----------
    obs
        Cell metadata (or a run's cells table).
    labels
        1 = sensitive, 0 = resistant, per cell.
    keys
        The obs column names of the contract.
    """
    labels = np.asarray(labels)
    found = []
    for column, kind in unit_columns(list(obs.columns), keys):
        position, names = text_codes(obs[column])  # np.unique(obs[column].astype(str), return_inverse=True)
        if names.size < 2:
            continue
        share = np.bincount(position, weights=labels.astype(np.float64)) / np.bincount(position)
        if np.all((share == 0) | (share == 1)):
            examples = tuple(f"{names[i]}: {'sensitive' if share[i] else 'resistant'}"
                             for i in range(min(EXAMPLES, names.size)))
            found.append(Coincidence(column, kind, int(names.size), examples))
    return found
