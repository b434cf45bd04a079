"""The float model is checked before quantizing: a model near chance level stops the run (verify.min_float_accuracy)."""

from __future__ import annotations

import numpy as np
import pytest

from tidlq.core.errors import UserError
from tidlq.stages.evaluate_float import chance_threshold, check_above_chance

BALANCED = np.repeat(np.arange(10), 20)  # 10 classes, 20 images each
SKEWED = np.array([0] * 70 + [1] * 30)
SPEC = {"name": "net", "weights": "w.pt"}


def test_chance_is_the_most_frequent_class_and_the_threshold_a_tenth_of_the_way_to_100() -> None:
    assert chance_threshold(BALANCED) == pytest.approx((10.0, 19.0))
    assert chance_threshold(SKEWED) == pytest.approx((70.0, 73.0))


def test_a_model_at_chance_is_refused_naming_its_accuracy_and_what_to_check() -> None:
    with pytest.raises(UserError) as err:
        check_above_chance(10.5, BALANCED, None, SPEC)
    message = str(err.value)
    for part in ("'net' reaches only 10.50 %", "below 19.00 %", "chance level", "10.00 %", "model.weights (w.pt)",
                 "BatchNorm running statistics", "verify.min_float_accuracy"):
        assert part in message
    with pytest.raises(UserError, match="float training converged"):
        check_above_chance(10.5, BALANCED, None, {"name": "net", "weights": None})
    with pytest.raises(UserError, match="below 73.00 %"):  # predicting the majority class is not learning
        check_above_chance(71.0, SKEWED, None, SPEC)


def test_a_model_above_the_threshold_or_with_the_check_off_passes() -> None:
    check_above_chance(19.0, BALANCED, None, SPEC)
    check_above_chance(10.0, BALANCED, 0.0, SPEC)
    with pytest.raises(UserError, match="below 50.00 %"):
        check_above_chance(40.0, BALANCED, 50.0, SPEC)
