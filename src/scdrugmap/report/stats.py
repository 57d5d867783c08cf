"""Friedman test and Nemenyi post-hoc critical difference over models ranked on several blocks.

Following Demšar (2006), "Statistical Comparisons of Classifiers over Multiple Data Sets",
JMLR 7:1-30, sections 3.2.2 and 3.2.3. With k models ranked on N blocks (rank 1 = best,
ties share the average rank) and R_j the average rank of model j:

    chi2_F = 12 N / (k (k + 1)) * (sum_j R_j^2 - k (k + 1)^2 / 4)          (df = k - 1)

divided here by the tie correction 1 - sum_b sum_t (t^3 - t) / (N k (k^2 - 1)) (t the sizes
of tied groups; as in scipy.stats.friedmanchisquare), and the Iman-Davenport statistic

    F_F = (N - 1) chi2_F / (N (k - 1) - chi2_F)                             (df = k - 1, (k - 1)(N - 1)).

Two models differ (Nemenyi test) when their average ranks differ by at least

    CD = q_alpha * sqrt(k (k + 1) / (6 N)),

where q_alpha is the studentized range quantile q(1 - alpha; k, inf) divided by sqrt(2)
(Demšar's table 5: 1.960, 2.343, 2.569, 2.728 ... for k = 2, 3, 4, 5 at alpha = 0.05).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

#: Demšar's q_0.05 for k = 2 ... 20 models: `nemenyi_q` as scipy.stats computes it (tested equal), so a report
#: needs neither scipy.stats' import (about a second) nor its numerical integral.
NEMENYI_Q_05: dict[int, float] = {
    2: 1.9599639845400534, 3: 2.343700586378409, 4: 2.569031772546482, 5: 2.7277743708703763,
    6: 2.8497054196100016, 7: 2.9483200175296744, 8: 3.030878449614413, 9: 3.1017303413033805,
    10: 3.163683577053373, 11: 3.2186536073291525, 12: 3.268003924466142, 13: 3.31273859335082,
    14: 3.3536177518523043, 15: 3.391230283765257, 16: 3.4260413793706097, 17: 3.4584247073473247,
    18: 3.4886847993791976, 19: 3.517073008691811, 20: 3.5437991315177815,
}


@dataclass(frozen=True)
class RankTest:
    """Result of a Friedman test with Nemenyi critical difference."""

    models: list[str]
    average_ranks: np.ndarray
    n_blocks: int
    chi2: float
    p_value: float
    iman_davenport: float
    p_value_iman_davenport: float
    critical_difference: float
    alpha: float

    def cliques(self) -> list[list[str]]:
        """Return maximal groups of models (by rank order) whose ranks all differ by less than CD."""
        order = np.argsort(self.average_ranks, kind="stable")
        ranks = self.average_ranks[order]
        spans: list[tuple[int, int]] = []
        for start in range(ranks.size):
            end = start
            while end + 1 < ranks.size and ranks[end + 1] - ranks[start] < self.critical_difference:
                end += 1
            if end > start and not any(s <= start and end <= e for s, e in spans):
                spans.append((start, end))
        return [[self.models[i] for i in order[s:e + 1]] for s, e in spans]


def nemenyi_q(k: int, alpha: float = 0.05) -> float:
    """Return Demšar's q_alpha for k models: the studentized range quantile (infinite df) / sqrt(2)."""
    if alpha == 0.05 and k in NEMENYI_Q_05:
        return NEMENYI_Q_05[k]
    from scipy import stats

    return float(stats.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2))


def friedman_nemenyi(scores: pd.DataFrame, *, alpha: float = 0.05, higher_is_better: bool = True) -> RankTest:
    """Rank models within each block and run the Friedman test and the Nemenyi critical difference.

    Parameters
    ----------
    scores
        One row per block (e.g. a category value), one column per model, no NaN.
    alpha
        Significance level of the Nemenyi test.
    higher_is_better
        Rank 1 goes to the highest score when True.

    Returns
    -------
    A `RankTest`; ``chi2``/``p_value`` are NaN when fewer than two blocks or models are given.
    """
    values = scores.to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        msg = "friedman_nemenyi needs complete blocks: drop blocks where a model has no score first"
        raise ValueError(msg)
    from scipy.special import chdtrc, fdtrc  # the survival functions scipy.stats' chi2 and f call

    n, k = values.shape
    # average ranks of ties, rank 1 the best (as scipy.stats.rankdata of the negated scores)
    ranks = (pd.DataFrame(values).rank(axis=1, method="average", ascending=not higher_is_better).to_numpy()
             if n else np.empty((0, k)))
    average = ranks.mean(axis=0) if n else np.full(k, np.nan)
    chi2 = p_value = f_stat = p_f = float("nan")
    if n >= 2 and k >= 2:
        chi2 = 12 * n / (k * (k + 1)) * (np.sum(average**2) - k * (k + 1) ** 2 / 4)
        ties = 0.0
        for row in ranks:
            _, counts = np.unique(row, return_counts=True)
            ties += float(np.sum(counts**3 - counts))
        correction = 1 - ties / (n * k * (k * k - 1))
        if correction > 0:
            chi2 = chi2 / correction
            p_value = float(chdtrc(k - 1, chi2))
            denominator = n * (k - 1) - chi2
            if denominator > 0:
                f_stat = (n - 1) * chi2 / denominator
                p_f = float(fdtrc(k - 1, (k - 1) * (n - 1), f_stat))
        else:  # every block ties every model: no evidence of any difference
            chi2, p_value = 0.0, 1.0
    cd = nemenyi_q(k, alpha) * np.sqrt(k * (k + 1) / (6 * n)) if n and k >= 2 else float("nan")
    return RankTest(models=[str(c) for c in scores.columns], average_ranks=np.asarray(average, dtype=np.float64),
                    n_blocks=n, chi2=float(chi2), p_value=float(p_value), iman_davenport=float(f_stat),
                    p_value_iman_davenport=float(p_f), critical_difference=float(cd), alpha=alpha)
