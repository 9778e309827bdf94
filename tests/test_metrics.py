"""plantml.metrics against scikit-learn: the one macro-F1 training, evaluation and the INT8 gate share."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from plantml.metrics import macro_f1, per_class_f1


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn_for_every_class_set(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 6, 80)
    y_pred = np.where(rng.random(80) < 0.6, y_true, rng.integers(0, 8, 80))  # some predictions outside 0..5
    for labels in (None, list(range(6)), list(range(10)), [1, 3]):
        want = f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        assert macro_f1(y_true, y_pred, labels) == pytest.approx(want, abs=1e-12), labels


def test_absent_class_counts_as_zero_only_when_named():
    y = np.array([0, 0, 1, 1])
    assert macro_f1(y, y) == 1.0
    assert macro_f1(y, y, labels=range(4)) == 0.5  # classes 2 and 3: no sample, no prediction
    np.testing.assert_array_equal(per_class_f1(y, y, [0, 1, 2]), [1.0, 1.0, 0.0])


def test_empty_input_is_zero():
    assert macro_f1(np.array([], int), np.array([], int)) == 0.0
