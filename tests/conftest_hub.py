"""pytest plugin: the ``local_hub`` fixture, a ``LocalHub`` that ``huggingface_hub`` and ``transformers`` talk to.

Load it from ``tests/conftest.py`` with ``pytest_plugins = ["conftest_hub"]`` (``tests/`` is on ``sys.path`` under
pytest's default "prepend" import mode), or import the fixture into a test module.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_OFFLINE``... once, when it is imported, into
``huggingface_hub.constants``, and a few objects capture the endpoint when they are created (the module-level
``HfApi`` behind ``huggingface_hub.create_repo``/``upload_file``/..., transformers' shared ``HfApi``). Setting the
environment variables inside a test is therefore not enough once the library is imported: ``point_hf_at`` sets the
variables (for code that reads them later and for subprocesses) *and* patches the already-computed values. All
changes are undone by ``monkeypatch`` (and by the fixture for transformers) at the end of the test.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hub_server import LocalHub

__all__ = ["local_hub", "local_hub_for", "point_hf_at"]


def point_hf_at(hub: LocalHub, monkeypatch: pytest.MonkeyPatch, hf_home: Path) -> None:
    """Make ``huggingface_hub`` (and anything built on it) use ``hub`` as the Hub and ``hf_home`` as HF_HOME."""
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import close_session

    hf_home = Path(hf_home)
    hf_home.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        # A requests/httpx proxy must never see loopback traffic.
        "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])),
        "no_proxy": ",".join(filter(None, [os.environ.get("no_proxy"), "127.0.0.1", "localhost"])),
    }
    if hub.token is not None:
        env["HF_TOKEN"] = hub.token
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # Token sources that would win over HF_TOKEN or leak a real token (OIDC is checked first).
    for name in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(name, raising=False)
    if hub.token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)

    # Values computed at import time. Every path derived from the old HF_HOME (token file, caches, the agent
    # registry cache, ...) moves under the new one, so nothing is read from or written to the real ~/.cache.
    old_home = constants.HF_HOME
    for name, value in list(vars(constants).items()):
        if name.isupper() and isinstance(value, str) and (value == old_home or value.startswith(old_home + os.sep)):
            monkeypatch.setattr(constants, name, str(hf_home) + value[len(old_home) :])
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.setattr(constants, name, env["HF_HUB_CACHE"])
    for name in ("HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE"):
        monkeypatch.setattr(constants, name, env["HF_ASSETS_CACHE"])
    monkeypatch.setattr(constants, "HF_XET_CACHE", env["HF_XET_CACHE"])
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    # The singleton behind huggingface_hub.create_repo / upload_file / ModelCard.push_to_hub / ...
    monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
    # Start from a fresh HTTP client so NO_PROXY applies and no pooled connection outlives an old server.
    close_session()


@contextlib.contextmanager
def local_hub_for(monkeypatch: pytest.MonkeyPatch, hf_home: Path, **hub_kwargs: Any) -> Iterator[LocalHub]:
    """Run a ``LocalHub(**hub_kwargs)`` and point huggingface_hub and transformers at it until exit.

    The env/constant patches of ``point_hf_at`` are undone by ``monkeypatch``. Transformers' shared ``HfApi``
    (``transformers.utils.hub._hf_api``) is reset so that it is rebuilt against the local endpoint, and put back
    on exit -- also when transformers is first imported inside the block.
    """
    with LocalHub(**hub_kwargs) as hub:
        point_hf_at(hub, monkeypatch, hf_home)
        tf_hub = sys.modules.get("transformers.utils.hub")
        saved = getattr(tf_hub, "_hf_api", None)
        if tf_hub is not None:
            tf_hub._hf_api = None
        try:
            yield hub
        finally:
            tf_hub = sys.modules.get("transformers.utils.hub")
            if tf_hub is not None:
                tf_hub._hf_api = saved


@pytest.fixture
def local_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    """A running ``LocalHub`` (token ``hub.token``, user ``hub.user``) that huggingface_hub and transformers use.

    HF_HOME, and so every download cache, is a fresh directory under ``tmp_path``: downloads really go over HTTP.
    """
    with local_hub_for(monkeypatch, tmp_path / "hf_home") as hub:
        yield hub
