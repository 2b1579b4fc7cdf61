"""Push a saved model folder (full checkpoint, hf_freeze delta or PEFT adapter) to the Hub, failing loudly.

``FreezeTrainer.push_to_hub`` goes through the Trainer's own upload; :func:`push_folder` is the same upload for
a folder saved any other way (``save_delta``, ``peft_model.save_pretrained``, ``model.save_pretrained``). Both turn
an upload error into :class:`PushFailed`, which says that the local folder is intact and that a retry is safe.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from huggingface_hub import HfApi

from .folder import checkpoint_kind

#: what the Trainer leaves out of its uploads too (private files, checkpoints)
IGNORE_PATTERNS = ["_*", "checkpoint-*", "checkpoint-*/*"]


class PushFailed(RuntimeError):
    """An upload to the Hub failed. The local folder was not modified; pushing again is safe."""

    def __init__(self, repo_id: str, folder: str | os.PathLike, cause: BaseException):
        self.repo_id, self.folder, self.cause = repo_id, str(folder), cause
        super().__init__(
            f"pushing {self.folder} to the Hub repo {repo_id!r} failed: {type(cause).__name__}: {cause}\n"
            f"The local folder is complete and unchanged. An upload is a single commit, so the repo holds either its "
            f"previous state or this whole folder: retry the push (trainer.push_to_hub() or hf_freeze.push_folder(...)) "
            f"once the Hub is reachable.")


@contextlib.contextmanager
def explain_push_failure(repo_id: str | Callable[[], str], folder: str | os.PathLike):
    """Re-raise any error of the upload inside as :class:`PushFailed` (the original is its ``__cause__``).

    ``repo_id`` may be a callable, asked only on failure (the full id is known once the repo was created).
    """
    try:
        yield
    except PushFailed:
        raise
    except Exception as e:  # HfHubHTTPError (an OSError), httpx2 connection errors (plain Exceptions), ...
        raise PushFailed(repo_id() if callable(repo_id) else repo_id, folder, e) from e


def push_folder(folder: str | os.PathLike, repo_id: str, *, commit_message: str = "Upload model with hf_freeze",
                token: str | None = None, revision: str | None = None, private: bool | None = None,
                create_pr: bool = False):
    """Create ``repo_id`` if needed and upload ``folder`` in one commit; returns the ``CommitInfo``.

    The folder is checked to hold a complete checkpoint before anything is sent. Files the Trainer never uploads
    (``_*``, ``checkpoint-*``) are skipped. Errors raise :class:`PushFailed`.
    """
    kind = checkpoint_kind(folder)
    api = HfApi(token=token)  # created per call: it copies the endpoint configured at this moment
    created = {}
    with explain_push_failure(lambda: created.get("id", repo_id), folder):
        created["id"] = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        return api.upload_folder(repo_id=created["id"], folder_path=str(folder), revision=revision,
                                 commit_message=f"{commit_message} ({kind} checkpoint)", create_pr=create_pr,
                                 ignore_patterns=IGNORE_PATTERNS)
