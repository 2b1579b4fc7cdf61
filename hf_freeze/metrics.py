"""Classification metrics computed locally (``evaluate.load`` needs the Hub)."""

from __future__ import annotations

import numpy as np


def classification_metrics(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: accuracy, plus top-5 accuracy when there are more than 5 classes."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    metrics = {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}
    if logits.shape[-1] > 5:
        top5 = np.argsort(-logits, axis=-1)[:, :5]
        metrics["top5_accuracy"] = float((top5 == labels[:, None]).any(axis=-1).mean())
    return metrics
