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


def classification_metrics(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: accuracy, plus top-5 accuracy when there are more than 5 classes."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    metrics = dict(load(ACCURACY).compute(predictions=np.argmax(logits, axis=-1), references=labels))
    if logits.shape[-1] > 5:
        top5 = load(TOP_K_ACCURACY).compute(predictions=logits, references=labels, k=5)
        metrics["top5_accuracy"] = top5["top_k_accuracy"]
    return metrics
