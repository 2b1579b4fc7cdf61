"""benchmarks/transfer.py: skips cleanly without the shared files; its measuring helpers measure the right thing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from helpers import tiny_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import transfer  # noqa: E402


def test_skips_with_the_reason_when_shared_files_are_missing(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "transfer.py"), "--shared", str(tmp_path),
                           "--cache", str(tmp_path / "cache")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "transfer benchmark skipped: shared files not found" in proc.stdout
    assert str(tmp_path / "models" / "mobilenet_v2_1.0_224-imagenet" / "model.safetensors") in proc.stdout
    assert not (tmp_path / "cache").exists()


def test_delta_holds_exactly_the_tensors_that_changed(tmp_path):
    model = tiny_model("resnet")
    pretrained = transfer.state_copy(model)
    with torch.no_grad():
        model.classifier[1].weight.add_(1.0)
        first_bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        first_bn.running_mean.add_(0.5)
    full, delta, count = transfer.artefact_bytes(model, pretrained, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "delta.safetensors")
    bn_name = next(n for n, m in model.named_modules() if m is first_bn)
    assert sorted(saved) == sorted(["classifier.1.weight", f"{bn_name}.running_mean"]) and count == 2
    assert torch.equal(saved["classifier.1.weight"], model.classifier[1].weight)
    assert delta == (tmp_path / "delta.safetensors").stat().st_size < full
    assert full == sum(f.stat().st_size for f in (tmp_path / "full").glob("*.safetensors"))


def test_pixels_are_the_processors_rescale_and_normalise():
    gray = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    x = transfer.to_pixels(gray, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    assert x.shape == (1, 3, 2, 2)
    expected = torch.tensor([[-1.0, 1.0], [51 / 127.5 - 1, 102 / 127.5 - 1]])
    for c in range(3):
        assert torch.allclose(x[0, c], expected)
    assert transfer.resized_uint8(np.zeros((2, 28, 28), np.uint8), 64).shape == (2, 64, 64)


def test_strategies_are_registered_with_policies_that_parse():
    import hf_freeze

    for key, strategy in transfer.STRATEGIES.items():
        assert strategy.runner in {"trainer", "classic", "freeze_trainer", "lightning", "lightning_train"}, key
        if strategy.runner == "freeze_trainer":
            for epochs in transfer.EPOCHS.values():
                hf_freeze.FreezePolicy.from_string(strategy.policy(epochs))
    assert set(transfer.DEFAULT) <= set(transfer.STRATEGIES)
    assert transfer.gradual_policy(2) == "freeze=backbone;unfreeze=epoch0.5:6@0.1,epoch1:6@0.1"
    assert [transfer.lightning_unfreeze_epoch(e) for e in (2, 4, 6)] == [1, 1, 2]
