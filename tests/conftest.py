import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))
sys.path.append(str(Path(__file__).parents[1] / "benchmarks"))  # shared_data: readers of the real fixtures

from helpers import MOBILENET_V2  # noqa: E402

pytest_plugins = ["conftest_hub"]


@pytest.fixture(scope="session")
def mobilenet_v2_path():
    if not (MOBILENET_V2 / "model.safetensors").is_file():
        pytest.skip(f"real MobileNetV2 not found at {MOBILENET_V2} (set HF_FREEZE_SHARED to the shared/ folder)")
    return MOBILENET_V2


@pytest.fixture
def fresh_caches():
    """Both caches' in-process memory emptied before and after the test: each test starts like a new process."""
    from hf_freeze import feature_cache, prefix_cache

    feature_cache._MEMORY.clear()
    prefix_cache._MEMORY.clear()
    yield
    feature_cache._MEMORY.clear()
    prefix_cache._MEMORY.clear()
