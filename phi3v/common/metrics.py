"""Task metrics as pure functions: accuracy, ANLS (standard and the original script's variant), ROC AUC."""

from __future__ import annotations

import bisect


def normalize_answer(text: str) -> str:
    """The original recipe's normalisation for accuracy: strip whitespace, then periods, then lowercase."""
    return text.strip().strip(".").lower()


def accuracy(predictions: list[str], references: list[str]) -> float:
    """Exact match after `normalize_answer` on both sides (as the original hateful memes / NLVR2 / UCF101 scripts)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    matches = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]
    return sum(matches) / max(len(matches), 1)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of single characters)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls_score(prediction: str, references: list[str], threshold: float = 0.5, case_sensitive: bool = False) -> float:
    """Max over references of 1 - NL(reference, prediction), zeroed when NL >= threshold; standard DocVQA lowercases
    and collapses whitespace, `case_sensitive=True` is the original script's (the prediction only stripped)."""
    if case_sensitive:
        prediction = prediction.strip().strip(".")
        if not prediction:
            return 0.0
    else:
        prediction = " ".join(prediction.lower().split())
        references = [" ".join(r.lower().split()) for r in references]
    best = 0.0
    for reference in references:
        longest = max(len(reference), len(prediction))
        distance = levenshtein(reference, prediction) / longest if longest else 0.0
        best = max(best, 1 - distance if distance < threshold else 0.0)
    return best


def anls(predictions: list[str], references: list[list[str]], threshold: float = 0.5,
         case_sensitive: bool = False) -> float:
    """Average normalized Levenshtein similarity over questions (0..1)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    scores = [anls_score(p, r, threshold, case_sensitive) for p, r in zip(predictions, references)]
    return sum(scores) / max(len(scores), 1)


def roc_auc(scores: list[float], labels: list[int]) -> float:
    """Area under the ROC curve: P(a random positive scores above a random negative), ties counting one half."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    positives = sum(1 for label in labels if label)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("ROC AUC needs both positive and negative examples")
    # rank-sum (Mann-Whitney U); tied scores share their average rank: (# below + # at or below + 1) / 2
    ordered = sorted(scores)
    rank_sum = sum((bisect.bisect_left(ordered, score) + bisect.bisect_right(ordered, score) + 1) / 2
                   for score, label in zip(scores, labels) if label)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
