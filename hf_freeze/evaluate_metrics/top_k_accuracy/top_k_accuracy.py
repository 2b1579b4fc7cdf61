"""Top-k accuracy as an ``evaluate`` metric module shipped with hf_freeze, loadable offline by path.

A prediction is correct when the true class is among the ``k`` classes with the highest scores. Ties are
ranked as ``numpy.argmax`` and a stable descending sort rank them (the lower class id first), so ``k=1``
gives exactly the accuracy of ``argmax`` predictions. Without ties the values are scikit-learn's
``top_k_accuracy_score``; on tied scores they can differ (scikit-learn ranks the higher class id first).
Non-finite scores (NaN, inf: a diverged model) are refused, as scikit-learn refuses them.

    import evaluate
    from hf_freeze.metrics import TOP_K_ACCURACY

    top_k = evaluate.load(TOP_K_ACCURACY)
    top_k.compute(predictions=logits, references=labels, k=5)  # {'top_k_accuracy': ...}
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k accuracy is the proportion of examples whose true class is among the k highest-scoring classes.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): per example, a score (logit or probability) for every class.
    references (`list` of `int`): true class ids.
    k (`int`, defaults to 5): how many of the highest-scoring classes count as a hit.
    normalize (`bool`, defaults to `True`): if `False`, return the number (or total sample weight) of hits.
    sample_weight (`list` of `float`, optional): a weight per example.
Returns:
    top_k_accuracy (`float`): the proportion (or, with `normalize=False`, the count) of hits.
Examples:
    >>> top_k = evaluate.load(hf_freeze.metrics.TOP_K_ACCURACY)
    >>> top_k.compute(predictions=[[0.1, 0.5, 0.4], [0.6, 0.3, 0.1]], references=[2, 1], k=2)
    {'top_k_accuracy': 1.0}
"""

_CITATION = ""


def hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per example: is ``labels[i]`` among the ``k`` highest of ``scores[i]`` (ties: lower class id first)?"""
    true = scores[np.arange(len(labels)), labels][:, None]
    classes = np.arange(scores.shape[1])[None, :]
    rank = (scores > true).sum(axis=1) + ((scores == true) & (classes < labels[:, None])).sum(axis=1)
    return rank < k


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32")),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, k=5, normalize=True, sample_weight=None):
        scores, labels = np.asarray(predictions, dtype=np.float32), np.asarray(references)
        if scores.ndim != 2:
            raise ValueError(f"predictions must hold one score per class for every example, got shape {scores.shape}")
        if not (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1):
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if len(labels) == 0:
            raise ValueError("no predictions: top-k accuracy of an empty set is undefined")
        if not np.isfinite(scores).all():
            bad = int((~np.isfinite(scores)).any(axis=1).sum())
            raise ValueError(f"predictions hold non-finite scores (NaN or inf) in {bad} of {len(scores)} examples "
                             "(a diverged model?); top-k accuracy needs finite scores")
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= scores.shape[1]:
            raise ValueError(f"references must be class ids in [0, {scores.shape[1]}), got {labels.min()}..{labels.max()}")
        weights = np.ones(len(labels)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if len(weights) != len(labels):
            raise ValueError(f"sample_weight has {len(weights)} values for {len(labels)} examples")
        if normalize and not weights.sum() > 0:
            raise ValueError(f"sample_weight sums to {weights.sum():g}: a normalized top-k accuracy needs a positive "
                             "total weight")
        total = float((hits(scores, labels, int(k)) * weights).sum())
        return {"top_k_accuracy": total / float(weights.sum()) if normalize else total}
