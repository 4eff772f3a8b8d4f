"""Classification metrics: averages over the classes that occur, undefined scores as None."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from distsent.metrics import NonFiniteOutputs, classification_metrics, is_improvement


def test_a_class_absent_from_the_data_does_not_count_as_f1_zero():
    labels = np.array([1, 1, 1, 2, 2])
    perfect = np.eye(3)[labels]
    metrics = classification_metrics(labels, perfect, ["a", "b", "c"])
    assert metrics["accuracy"] == 1.0 and metrics["f1_macro"] == 1.0 and metrics["f1_weighted"] == 1.0
    absent = metrics["per_class"]["a"]
    assert absent == {"precision": None, "recall": None, "f1": None, "accuracy": None, "support": 0}
    assert metrics["per_class"]["c"]["f1"] == 1.0


def test_macro_f1_matches_scikit_learn_over_gold_and_predicted_classes():
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 2, 3], size=200)  # class 1 never occurs as gold
    probs = rng.dirichlet(np.ones(4), size=200)  # but is predicted sometimes
    metrics = classification_metrics(labels, probs, ["a", "b", "c", "d"])
    preds = probs.argmax(axis=1)
    assert metrics["f1_macro"] == pytest.approx(f1_score(labels, preds, average="macro"))
    predicted_only = metrics["per_class"]["b"]
    assert predicted_only["precision"] == 0.0 and predicted_only["recall"] is None


def test_a_class_never_predicted_has_no_precision_rather_than_zero():
    labels = np.array([0, 0, 1, 1, 2])
    never_two = np.eye(3)[[0, 0, 1, 1, 1]]
    scores = classification_metrics(labels, never_two, ["a", "b", "c"])["per_class"]["c"]
    assert scores["precision"] is None  # 0/0: no prediction of c to be right or wrong
    assert scores["recall"] == 0.0 and scores["f1"] == 0.0 and scores["support"] == 1


def test_non_finite_outputs_are_refused_not_scored():
    # NaN rows all argmax to the first class: a broken model would get a plausible accuracy.
    probs = np.full((3, 3), np.nan)
    with pytest.raises(NonFiniteOutputs, match="scored 3 of 3 examples NaN or infinite"):
        classification_metrics(np.array([0, 1, 2]), probs, ["a", "b", "c"])
    # Nor can a NaN become the best value that nothing afterwards beats.
    assert not is_improvement("loss", float("nan"), None)
    assert is_improvement("loss", 0.3, 0.4) and not is_improvement("accuracy", float("nan"), 0.5)
