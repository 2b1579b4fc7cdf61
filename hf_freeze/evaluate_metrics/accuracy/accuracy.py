"""Accuracy as an ``evaluate`` metric module shipped with hf_freeze, loadable offline by path.

Same inputs, options and output as the Hub's ``evaluate.load("accuracy")`` for single-label
classification (the Hub module wraps ``sklearn.metrics.accuracy_score``), so either can be swapped in:

    import evaluate
    from hf_freeze.metrics import ACCURACY

    accuracy = evaluate.load(ACCURACY)
    accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])  # {'accuracy': 0.666...}
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all predictions:
Accuracy = (number of predictions equal to their reference) / (number of predictions).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): true class ids.
    normalize (`bool`, defaults to `True`): if `False`, return the number (or total sample weight) of correct
        predictions instead of their proportion.
    sample_weight (`list` of `float`, optional): a weight per prediction.
Returns:
    accuracy (`float`): the proportion (or, with `normalize=False`, the count) of correct predictions.
Examples:
    >>> accuracy = evaluate.load(hf_freeze.metrics.ACCURACY)
    >>> accuracy.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if len(weights) != len(correct):
            raise ValueError(f"sample_weight has {len(weights)} values for {len(correct)} predictions")
        if len(correct) == 0:
            raise ValueError("no predictions: accuracy of an empty set is undefined")
        hits = float((correct * weights).sum())
        if normalize and not weights.sum() > 0:
            raise ValueError(f"sample_weight sums to {weights.sum():g}: a normalized accuracy needs a positive total weight")
        return {"accuracy": hits / float(weights.sum()) if normalize else hits}
