"""Classification metrics as ``evaluate`` modules shipped inside hf_freeze (loaded offline, by path).

``evaluate.load("accuracy")`` fetches its script from the Hub; these load from the installed package:

    import evaluate
    from hf_freeze.metrics import ACCURACY, TOP_K_ACCURACY

    accuracy = evaluate.load(ACCURACY)        # same inputs and output as the Hub's "accuracy"
    top_k = evaluate.load(TOP_K_ACCURACY)     # top_k.compute(predictions=logits, references=labels, k=5)

:func:`classification_metrics` is a ready ``compute_metrics`` for the Trainer built on them (the example
script, ``python -m hf_freeze.demo`` and ``hf-freeze search`` use it). With Hub access a user's own
``evaluate.load("accuracy")`` works the same way.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ._logging import get_logger

logger = get_logger(__name__)

_MODULES = Path(__file__).resolve().parent / "evaluate_metrics"
#: folder of the accuracy module (``evaluate.load(ACCURACY)``)
ACCURACY = str(_MODULES / "accuracy")
#: folder of the top-k accuracy module (``evaluate.load(TOP_K_ACCURACY)``)
TOP_K_ACCURACY = str(_MODULES / "top_k_accuracy")


@functools.cache
def load(path: str):
    """``evaluate.load(path, keep_in_memory=True)``, once per process (no cache files: safe with several processes)."""
    import evaluate  # optional dependency (hf_freeze[examples]): only the metrics need it

    return evaluate.load(path, keep_in_memory=True)


def count_diverged_as_wrong(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``logits`` where every row holding a NaN or inf (a diverged or fp16-overflowed model) scores its true
    class last, so argmax and top-k both count it as wrong (numpy's argmax would pick the NaN, class 0)."""
    bad = ~np.isfinite(logits).all(axis=-1)
    if not bad.any():
        return logits
    logger.warning(f"{int(bad.sum())} of {len(bad)} evaluation examples have non-finite logits (NaN/inf); "
                   "they count as wrong in the accuracy")
    logits = np.where(bad[:, None], 0.0, logits).astype(np.float32)
    logits[np.flatnonzero(bad), labels[bad]] = -1.0
    return logits


def classification_metrics(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: accuracy, plus top-5 accuracy when there are more than 5 classes.
    Examples whose logits are not finite count as wrong (:func:`count_diverged_as_wrong`)."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    logits = count_diverged_as_wrong(np.asarray(logits), np.asarray(labels))
    metrics = dict(load(ACCURACY).compute(predictions=np.argmax(logits, axis=-1), references=labels))
    if logits.shape[-1] > 5:
        top5 = load(TOP_K_ACCURACY).compute(predictions=logits, references=labels, k=5)
        metrics["top5_accuracy"] = top5["top_k_accuracy"]
    return metrics
