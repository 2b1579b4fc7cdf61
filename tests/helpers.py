"""Shared test helpers: tiny models, inputs, shared fixtures, tensor snapshots."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_freeze.tiny import CFG, IMAGE_SIZE, tiny_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_FREEZE_SHARED", ROOT.parent / "shared"))
MOBILENET_V2 = SHARED / "models" / "mobilenet_v2_1.0_224-imagenet"
MOBILENET_V1 = SHARED / "models" / "mobilenet_v1_0.25_128-imagenet"
FASHION_MNIST = SHARED / "data" / "fashion-mnist"
IMAGENET_SAMPLES = SHARED / "data" / "imagenet-samples"

NOT_BUILDABLE = {"dinat": "needs the natten package, which cannot be installed here"}
NOT_A_CLASSIFIER = {"shieldgemma2"}
ALL_TYPES = sorted(CFG)
BUILDABLE = [t for t in ALL_TYPES if t not in NOT_BUILDABLE]
CLASSIFIERS = [t for t in BUILDABLE if t not in NOT_A_CLASSIFIER]


def model_inputs(model_type: str, model, batch: int = 4, seed: int = 0) -> dict:
    """Inputs of the right kind for ``model`` (pixel_values for nearly all; see README for the exceptions)."""
    g = torch.Generator().manual_seed(seed)
    size = IMAGE_SIZE.get(model_type, 32)
    labels = torch.randint(0, model.config.num_labels, (batch,), generator=g)
    pixels = torch.randn(batch, 3, size, size, generator=g)
    if model_type == "imagegpt":
        return {"input_ids": torch.randint(0, 512, (batch, 16), generator=g), "labels": labels}
    if model_type == "perceiver":
        return {"inputs": pixels, "labels": labels}
    if model_type == "siglip2":
        cfg = model.config.vision_config
        n = cfg.num_patches
        side = int(n ** 0.5)
        return {"pixel_values": torch.randn(batch, n, 3 * cfg.patch_size ** 2, generator=g),
                "pixel_attention_mask": torch.ones(batch, n, dtype=torch.long),
                "spatial_shapes": torch.tensor([[side, side]] * batch), "labels": labels}
    if model_type == "pp_lcnet":
        return {"pixel_values": pixels, "_labels": labels}
    return {"pixel_values": pixels, "labels": labels}


def loss_of(model, inputs: dict) -> torch.Tensor:
    labels = inputs.get("_labels")
    out = model(**{k: v for k, v in inputs.items() if k != "_labels"})
    if labels is None:
        return out.loss
    logits = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return torch.nn.functional.cross_entropy(logits.reshape(len(labels), -1), labels)


def snapshot(model) -> dict[str, torch.Tensor]:
    """Independent copies of every parameter and buffer (the ground truth the fingerprint must agree with)."""
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return out


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and bytes (NaN-safe)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) if a.numel() else True


def differing(a: dict, b: dict) -> list[str]:
    """Names whose tensors are not bit-identical between two snapshots of the same set of tensors."""
    assert sorted(a) == sorted(b)
    return [n for n in a if not identical(a[n], b[n])]


def tiny_vit(**config):
    """A tiny random ViT whose widths are multiples of 32 (the caches' probe's short position check applies)."""
    from transformers import ViTForImageClassification

    from hf_freeze.tiny import tiny_config

    torch.manual_seed(2)
    cfg = tiny_config("vit")
    cfg.intermediate_size = 64
    for k, v in config.items():
        setattr(cfg, k, v)
    return ViTForImageClassification(cfg)


def changed_names(before: dict, model) -> list[str]:
    now = snapshot(model)
    return [n for n in before if not identical(before[n], now[n])]


def model_state(model) -> dict:
    """Everything apply_policy may touch: requires_grad, training flags, instance attributes."""
    return {
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "instance_train": sorted(n for n, m in model.named_modules() if "train" in m.__dict__),
        "policy_state": hasattr(model, "_hf_freeze_state"),
        "tensors": snapshot(model),
    }


def same_state(a: dict, b: dict) -> bool:
    return (a["requires_grad"] == b["requires_grad"] and a["training"] == b["training"]
            and a["instance_train"] == b["instance_train"] and a["policy_state"] == b["policy_state"]
            and all(identical(a["tensors"][n], b["tensors"][n]) for n in a["tensors"]))


__all__ = ["tiny_model", "model_inputs", "loss_of", "snapshot", "identical", "changed_names", "model_state",
           "same_state", "SHARED", "MOBILENET_V2", "MOBILENET_V1", "FASHION_MNIST", "IMAGENET_SAMPLES",
           "ALL_TYPES", "BUILDABLE", "CLASSIFIERS", "NOT_BUILDABLE"]


class TinyImages(torch.utils.data.Dataset):
    """A deterministic little image-classification dataset (pixel_values/labels dicts) for Trainer runs."""

    def __init__(self, n: int = 32, size: int = 32, num_labels: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_labels, (n,), generator=g)
        # class-dependent mean so that training has signal
        self.pixels = torch.randn(n, 3, size, size, generator=g) + self.labels.view(-1, 1, 1, 1).float()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def training_args(tmp_path, **overrides):
    from hf_freeze import FreezeTrainingArguments

    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=0.05,
                  num_train_epochs=2, report_to=[], logging_steps=1, save_strategy="no", seed=0, data_seed=0,
                  use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, weight_decay=0.01)
    kwargs.update(overrides)
    return FreezeTrainingArguments(**kwargs)


def group_tensors(model, group: str) -> dict[str, torch.Tensor]:
    import hf_freeze

    g = hf_freeze.layer_groups(model)[group]
    tensors = dict(model.named_parameters())
    return {n: tensors[n].detach().clone() for n in g.param_names}


class StopAt(TrainerCallback):
    """Stop training right after optimizer step ``step`` (an interrupted run, for resume tests)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


def head_phase_served(trainer) -> int:
    """Training steps of the head-only phase served from a cache: the linear-probe cache's, or (``auto`` with a
    schedule that reaches a frozen prefix later) the frozen-prefix cache's at the deepest frozen module, whose pass
    computes the later boundaries too (tests/test_prefix_cache.py::test_auto_computes_every_boundary_of_a_schedule_in_one_pass)."""
    if "serves the whole schedule" in (trainer.feature_cache_refusal or ""):
        import hf_freeze

        below = [g.name for g in hf_freeze.get_state(trainer.model).groups if g.name != "head"]
        return sum(i["served_steps"] for i in trainer.prefix_cache_info if i["groups"] == below)
    return trainer.feature_cache_info.get("served_steps", 0)
