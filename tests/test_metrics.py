"""The ``evaluate`` metric modules shipped in hf_freeze: loaded offline by path, same results as scikit-learn
(whose ``accuracy_score`` the Hub's ``evaluate.load("accuracy")`` wraps), and the Trainer's compute_metrics."""

from __future__ import annotations

import evaluate
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, top_k_accuracy_score
from transformers import EvalPrediction

from hf_freeze.metrics import ACCURACY, TOP_K_ACCURACY, classification_metrics


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 12)).astype(np.float32)  # continuous scores: no ties
    labels = rng.integers(0, 12, size=200)
    weights = rng.uniform(0.1, 2.0, size=200)
    return logits, labels, weights


def test_modules_load_offline_by_path():
    assert evaluate.load(ACCURACY).name == "accuracy"
    assert evaluate.load(TOP_K_ACCURACY).name == "top_k_accuracy"


def test_accuracy_matches_sklearn_with_the_same_options(data):
    logits, labels, weights = data
    predictions = logits.argmax(-1)
    accuracy = evaluate.load(ACCURACY)
    for kwargs in ({}, {"normalize": False}, {"sample_weight": weights}, {"normalize": False, "sample_weight": weights}):
        got = accuracy.compute(predictions=predictions, references=labels, **kwargs)
        assert list(got) == ["accuracy"]
        assert got["accuracy"] == pytest.approx(accuracy_score(labels, predictions, **kwargs), rel=1e-12)


@pytest.mark.parametrize("k", [1, 3, 5, 11])
def test_top_k_matches_sklearn(data, k):
    logits, labels, weights = data
    top_k = evaluate.load(TOP_K_ACCURACY)
    for kwargs in ({}, {"sample_weight": weights}, {"normalize": False}):
        got = top_k.compute(predictions=logits, references=labels, k=k, **kwargs)["top_k_accuracy"]
        assert got == pytest.approx(top_k_accuracy_score(labels, logits, k=k, labels=np.arange(12), **kwargs), rel=1e-6)


def test_top_1_is_argmax_accuracy_even_with_ties():
    scores = np.array([[1, 1, 0], [0, 2, 2], [3, 3, 3], [0, 0, 1]], dtype=np.float32)  # ties: argmax takes the first
    labels = np.array([1, 1, 0, 2])
    top_1 = evaluate.load(TOP_K_ACCURACY).compute(predictions=scores, references=labels, k=1)["top_k_accuracy"]
    assert top_1 == float((scores.argmax(-1) == labels).mean()) == 0.75
    top_2 = evaluate.load(TOP_K_ACCURACY).compute(predictions=scores, references=labels, k=2)["top_k_accuracy"]
    assert top_2 == 1.0


def test_bad_inputs_are_named():
    top_k = evaluate.load(TOP_K_ACCURACY)
    with pytest.raises(ValueError, match=r"references must be class ids in \[0, 3\)"):
        top_k.compute(predictions=[[0.1, 0.2, 0.7]], references=[3], k=1)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        top_k.compute(predictions=[[0.1, 0.2, 0.7]], references=[2], k=0)


def test_classification_metrics_for_the_trainer(data):
    logits, labels, _ = data
    got = classification_metrics(EvalPrediction(predictions=(logits, None), label_ids=labels))
    assert got == {"accuracy": pytest.approx(accuracy_score(labels, logits.argmax(-1))),
                   "top5_accuracy": pytest.approx(top_k_accuracy_score(labels, logits, k=5, labels=np.arange(12)))}
    assert list(classification_metrics(EvalPrediction(predictions=logits[:, :5], label_ids=labels % 5))) == ["accuracy"]
