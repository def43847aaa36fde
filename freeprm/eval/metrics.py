"""Ranking metrics of reward scores against binary labels."""

from __future__ import annotations

import bisect
from collections.abc import Iterable


def auroc(scores: Iterable[float], labels: Iterable[float]) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count half); nan if one class only.

    Plain Python: the fraction of (positive, negative) pairs with ``s_pos > s_neg``, ties 1/2, i.e.
    ``mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])``, in ``O(n log n)``.
    """
    s, y = list(scores), [bool(v) for v in labels]
    pos = sorted(v for v, t in zip(s, y) if t)
    neg = sorted(v for v, t in zip(s, y) if not t)
    if not pos or not neg:
        return float("nan")
    wins = sum(bisect.bisect_left(neg, v) + 0.5 * (bisect.bisect_right(neg, v) - bisect.bisect_left(neg, v))
               for v in pos)
    return wins / (len(pos) * len(neg))
