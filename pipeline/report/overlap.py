"""Token-overlap F1 of two tokenised answers: shared by the cost report and the eval harness."""

from __future__ import annotations

from collections import Counter


def overlap_f1(a: list[str], b: list[str]) -> float:
    """Harmonic mean of token precision and recall (bag of words); 1.0 when both are empty."""
    if not a or not b:
        return float(a == b)
    same = sum((Counter(a) & Counter(b)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(a), same / len(b)
    return 2 * precision * recall / (precision + recall)
