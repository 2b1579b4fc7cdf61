"""DeepSpeed ZeRO-2 through FreezeTrainer in two real CPU processes (DeepSpeed's CPU accelerator, gloo).

Skipped when deepspeed is not installed (``pip install 'hf_freeze[deepspeed]'``). The refusals of ZeRO-3, of
DeepSpeed's bf16/fp16 casting and of schedules are checked against the real plugin in ``tests/test_distributed.py``.
"""

import pytest
import torch
from helpers import identical, snapshot, tiny_model
from torchrun import torchrun_script

import hf_freeze

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'hf_freeze[deepspeed]')")


@pytest.mark.slow
def test_zero2_head_only_training_is_verified_and_saves_full_and_delta(tmp_path):
    torchrun_script("deepspeed_train.py", tmp_path, expect=["rank0.pt", "rank1.pt"])
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["deepspeed"] and r1["deepspeed"]
    # an unfreeze schedule is refused when FreezeTrainer is built, on every rank
    assert r0["refusal"] == r1["refusal"] and "DeepSpeed ignores tensors unfrozen" in r0["refusal"]
    # head-only: the head trained identically on both ranks; every other tensor is bit-identical to the base
    final, base = r0["final"], r0["base"]
    assert sorted(n for n in final if not identical(final[n], base[n])) == ["classifier.1.bias", "classifier.1.weight"]
    assert [n for n in final if not identical(final[n], r1["final"][n])] == []
    assert len(r0["tracked"]) > 30  # verified at the checkpoint and at the end (FrozenWeightsChanged otherwise)
    # the step-2 checkpoint is a delta; it rebuilds the step-2 head on the base; save_model wrote the full model
    assert r0["delta_version"] == 2
    rebuilt = hf_freeze.apply_delta(tiny_model("resnet", seed=1), tmp_path / "out" / "checkpoint-2")
    now = snapshot(rebuilt)
    assert [n for n in base if not n.startswith("classifier.") and not identical(now[n], base[n])] == []
    assert not identical(now["classifier.1.weight"], base["classifier.1.weight"])
    assert {"model.safetensors", "freeze_policy.json"} <= set(r0["final_files"])
    full = hf_freeze.from_pretrained(tmp_path / "final")
    assert all(identical(t, final[n]) for n, t in full.state_dict().items())
