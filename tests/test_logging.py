"""hf_freeze's messages follow transformers' logging: its verbosity switches and its handler.

Real Trainer runs (tiny ResNet, an unfreeze at epoch 1). The records are read where transformers' own go: a
handler on the ``transformers`` logger (the one ``set_verbosity_*`` sets, holding transformers' stderr handler).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from helpers import TinyImages, training_args

import hf_freeze
from hf_freeze.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
POLICY = "freeze=backbone;unfreeze=epoch1:1"


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[tuple[str, str]] = []

    def emit(self, record):
        self.messages.append((record.name, record.getMessage()))


@pytest.fixture
def transformers_logs():
    """What reaches transformers' library logger (and so its handler), at the verbosity the test sets."""
    root = logging.getLogger("transformers")
    handler, level = Records(), transformers.logging.get_verbosity()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)
    transformers.logging.set_verbosity(level)


def train(tmp_path):
    trainer = hf_freeze.FreezeTrainer(model=tiny_model("resnet"), args=training_args(tmp_path), train_dataset=TinyImages(16),
                                      freeze_policy=POLICY, feature_cache="off")
    trainer.train()


def test_info_verbosity_shows_the_report_table_and_each_unfreeze(tmp_path, transformers_logs):
    transformers.logging.set_verbosity_info()
    train(tmp_path)
    ours = [(name, m) for name, m in transformers_logs.messages if name.startswith("hf_freeze")]
    reports = [m for _, m in ours if m.startswith("hf_freeze: freeze policy at the start of training:")]
    assert len(reports) == 1
    table = reports[0].splitlines()
    assert table[1] == f"Freeze policy: {POLICY}"
    assert table[4].split() == ["group", "params", "trainable", "state", "batchnorm", "lr", "x"]
    assert [line.split()[0] for line in table[6:10]] == ["stem", "stage.0", "stage.1", "head"]
    unfreezes = [m for _, m in ours if m.startswith("hf_freeze: unfroze")]
    assert len(unfreezes) == 1 and unfreezes[0].startswith("hf_freeze: unfroze stage.1 at epoch 1 (step 2, lr x1): ")
    assert any("Running training" in m for name, m in transformers_logs.messages if name.startswith("transformers"))


def test_warning_verbosity_hides_them(tmp_path, transformers_logs):
    transformers.logging.set_verbosity_warning()
    train(tmp_path)
    assert not [m for name, m in transformers_logs.messages if name.startswith("hf_freeze")]
    assert not [m for name, m in transformers_logs.messages if "Running training" in m]  # as transformers' own


def test_transformers_verbosity_variable_applies(tmp_path):
    """``TRANSFORMERS_VERBOSITY=info``, read by transformers at start-up, shows them on stderr (its handler)."""
    code = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; import hf_freeze\n"
            "from helpers import TinyImages, training_args; from hf_freeze.tiny import tiny_model\n"
            f"hf_freeze.FreezeTrainer(model=tiny_model('resnet'), args=training_args(Path({str(tmp_path)!r})), "
            f"train_dataset=TinyImages(16), freeze_policy={POLICY!r}, feature_cache='off').train()\n")
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT,
                           env={**run_env, "TRANSFORMERS_VERBOSITY": "info"})
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert shown.stderr.count("hf_freeze: freeze policy at the start of training:") == 1
    assert shown.stderr.count("hf_freeze: unfroze stage.1 at epoch 1") == 1


def test_a_level_on_the_hf_freeze_logger_still_wins(tmp_path, transformers_logs):
    transformers.logging.set_verbosity_info()
    logging.getLogger("hf_freeze").setLevel(logging.WARNING)
    try:
        train(tmp_path)
    finally:
        logging.getLogger("hf_freeze").setLevel(logging.NOTSET)
    assert not [m for name, m in transformers_logs.messages if name.startswith("hf_freeze")]
