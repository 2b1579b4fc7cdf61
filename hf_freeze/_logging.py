"""hf_freeze's loggers live under transformers' logging, so they follow its switches.

``logging.getLogger("hf_freeze")`` is made a child of transformers' library root logger: its level
follows ``--log_level`` / ``transformers.logging.set_verbosity_*`` / ``TRANSFORMERS_VERBOSITY``, and its
records go to transformers' handler (``enable_explicit_format``, ``disable_default_handler`` and
``enable_propagation`` apply to them too). A level set on the ``hf_freeze`` logger itself still wins.
"""

from __future__ import annotations

import logging

from transformers.utils import logging as hf_logging

ROOT = "hf_freeze"


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` for a module of hf_freeze, with the ``hf_freeze`` logger under transformers'."""
    root = logging.getLogger(ROOT)
    if not getattr(root, "_under_transformers", False):
        root.parent = hf_logging.get_logger("transformers")  # the library root, configured (handler, env level)
        root._under_transformers = True
        root.setLevel(root.level)  # clears the loggers' cached effective levels
    return logging.getLogger(name)
