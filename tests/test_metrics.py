"""The metrics' values: hand-computed cases (worked out in the comments) and sklearn's ROC AUC as the reference."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from phi3v.common.metrics import accuracy, anls, anls_score, levenshtein, normalize_answer, roc_auc


@pytest.mark.parametrize("a,b,distance", [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3),
                                          ("abc", "", 3), ("same", "same", 0), ("ab", "ba", 2)])
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance


def test_accuracy_strips_whitespace_then_periods_and_lowercases():
    assert normalize_answer("  Yes.\n") == "yes"
    assert accuracy(["yes\n"], ["yes"]) == 1.0  # generated answers often end with a newline
    assert accuracy([" Archery "], ["archery"]) == 1.0
    # " Yes. " == "yes"; "no" == "No."; "Cat" != "dog"  ->  2 of 3
    assert accuracy([" Yes. ", "no", "Cat"], ["yes", "No.", "dog"]) == pytest.approx(2 / 3)
    assert accuracy(["yes no"], ["yesno"]) == 0.0  # inner whitespace is kept
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        accuracy(["a", "b"], ["a"])


@pytest.mark.parametrize("prediction,references,score", [
    ("abc", ["abd"], 1 - 1 / 3),               # one substitution in 3 characters
    ("ab", ["ax"], 0.0),                       # NL = 1/2 is exactly the threshold: scored 0 (NL < 0.5 passes)
    ("abcd", ["abxd"], 0.75),                  # NL = 1/4
    ("HELLO  World", ["hello world"], 1.0),    # standard ANLS: lowercase, whitespace collapsed
    ("  Total:  12 ", ["total: 12"], 1.0),
    ("cat", ["dog", "cats"], 0.75),            # best reference: "cats", one insertion in 4
    ("", [""], 1.0),                           # both empty: distance 0
    ("xyz", ["abc"], 0.0),
])
def test_anls_standard(prediction, references, score):
    assert anls_score(prediction, references) == pytest.approx(score)


@pytest.mark.parametrize("prediction,references,score", [
    ("Hello.", ["hello"], 0.8),                # periods stripped from the prediction, case kept: 1 edit in 5
    ("Hello", ["Hello"], 1.0),
    (" 12.", ["12"], 1.0),
    ("ab", ["ax"], 0.0),                       # the same threshold rule
    ("", [""], 0.0),                           # the original script scores an empty prediction 0
    ("ABC", ["abc"], 0.0),                     # 3 edits in 3: NL = 1 >= 0.5
])
def test_anls_case_sensitive_as_the_original_script(prediction, references, score):
    assert anls_score(prediction, references, case_sensitive=True) == pytest.approx(score)


def test_anls_threshold_is_a_parameter():
    assert anls_score("ab", ["ax"], threshold=0.6) == pytest.approx(0.5)
    assert anls_score("abcd", ["abxd"], threshold=0.25) == 0.0


def test_anls_averages_over_questions():
    # (2/3 + 0 + 1) / 3
    assert anls(["abc", "ax", "Yes"], [["abd"], ["ab"], ["yes", "no"]]) == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert anls([], []) == 0.0
    with pytest.raises(ValueError, match="1 predictions for 2 reference lists"):
        anls(["a"], [["a"], ["b"]])


def test_roc_auc_by_hand():
    # positives score 0.35 and 0.8, negatives 0.1 and 0.4: of the 4 (positive, negative) pairs 3 are ordered right
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.9, 0.1], [1, 0]) == 1.0
    assert roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert roc_auc([0.5, 0.5], [0, 1]) == 0.5  # a tie counts one half
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_auc([0.1, 0.2], [1, 1])


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=60)
    labels[:2] = [0, 1]
    scores = np.round(rng.random(60) * 0.5 + 0.3 * labels, 1)  # rounded: many ties
    assert roc_auc(scores.tolist(), labels.tolist()) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
