"""The shared verification helper: SQNR, agreement, accuracy, confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest

from tidlq.eval import metrics


def test_sqnr_of_known_noise() -> None:
    ref = np.ones((10, 4), dtype=np.float32)
    assert metrics.sqnr_db(ref, ref * 1.1) == pytest.approx(20.0, abs=1e-4)  # noise power 1 % of signal
    assert metrics.sqnr_db(ref, ref) == float("inf")


def test_compare_and_confusion() -> None:
    ref = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    test = np.array([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    labels = np.array([0, 1, 1, 1])
    out = metrics.compare(ref, test, labels)
    assert out["accuracy"] == 50.0
    assert out["agreement"] == 75.0
    assert out["max_abs_diff"] == 2.0
    assert metrics.confusion_matrix(test, labels, 2) == [[1, 0], [2, 1]]
