"""Depth: the real ImageNet MobileNetV2 (shared fixture) keeps its pretrained knowledge under head-only training."""

import torch
from helpers import FASHION_MNIST, IMAGENET_SAMPLES, changed_names, snapshot
from PIL import Image
from shared_data import fashion_mnist, few_shot_indices, imagenet_top1

import hf_freeze


def test_head_only_training_preserves_backbone_and_original_head_accuracy(mobilenet_v2_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(mobilenet_v2_path)
    original = AutoModelForImageClassification.from_pretrained(mobilenet_v2_path)
    assert imagenet_top1(original, processor, IMAGENET_SAMPLES) == 18

    model = AutoModelForImageClassification.from_pretrained(mobilenet_v2_path, num_labels=10, ignore_mismatched_sizes=True)
    report = hf_freeze.apply_policy(model, "backbone")
    assert report.fingerprinted == 312 and report.row("head").params == 1280 * 10 + 10
    before = snapshot(model)

    images, labels = fashion_mnist(FASHION_MNIST, "train")
    idx = few_shot_indices(labels, 4, seed=0)
    batch = processor([Image.fromarray(images[i]).convert("RGB") for i in idx], return_tensors="pt")["pixel_values"]
    targets = torch.as_tensor(labels[idx])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    for _ in range(3):
        for chunk in torch.randperm(len(idx)).split(20):
            model.train()
            model(pixel_values=batch[chunk], labels=targets[chunk]).loss.backward()
            opt.step()
            opt.zero_grad()

    changed = changed_names(before, model)
    assert changed and all(n.startswith("classifier.") for n in changed), changed
    hf_freeze.verify_frozen(model)

    # the trained backbone under its original ImageNet head still recognises the ImageNet photos
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    missing, unexpected = original.load_state_dict(backbone, strict=False)
    assert set(missing) == {"classifier.weight", "classifier.bias"} and not unexpected
    assert imagenet_top1(original, processor, IMAGENET_SAMPLES) == 18
