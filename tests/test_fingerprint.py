"""Fingerprint scheme 2 and compatibility: old (version 1) delta manifests keep loading, checked for real.

``tests/data/delta_v1`` was written by hf_freeze at commit d800fd4 (scheme-1 digests) with
``save_delta(model, ..., base_model="deterministic-tiny-resnet")`` on :func:`deterministic_base` under policy
``backbone``, after adding 0.25 to ``classifier.1.weight`` and subtracting 0.5 from ``classifier.1.bias``.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import identical, snapshot, tiny_model

import hf_freeze
from hf_freeze import FrozenWeightsChanged
from hf_freeze.delta import BaseModelChanged, DeltaManifest
from hf_freeze.fingerprint import Fingerprint, tensor_digest, tensor_digest_v1

V1 = Path(__file__).parent / "data" / "delta_v1"


def deterministic_base():
    """A tiny ResNet whose float tensors come from integer arithmetic (exact on every platform, no RNG)."""
    model = tiny_model("resnet")
    with torch.no_grad():
        for i, t in enumerate([*model.parameters(), *model.buffers()]):
            if t.is_floating_point():
                t.copy_(((torch.arange(t.numel()) * 7919 + i * 104729) % 2001 - 1000).reshape(t.shape).to(t.dtype) / 512)
    return model


def test_a_version_1_manifest_still_loads_and_checks_its_base_bit_for_bit():
    manifest = DeltaManifest.load(V1)
    assert manifest.version == 1 and manifest.frozen_fingerprint().scheme == 1
    model = deterministic_base()
    base = snapshot(model)
    assert {n: tensor_digest_v1(base[n]) for n in manifest.frozen_digests} == manifest.frozen_digests
    hf_freeze.apply_delta(model, V1)
    now = snapshot(model)
    assert torch.equal(now["classifier.1.weight"], base["classifier.1.weight"] + 0.25)
    assert torch.equal(now["classifier.1.bias"], base["classifier.1.bias"] - 0.5)
    assert [n for n in base if not n.startswith("classifier.") and not identical(now[n], base[n])] == []


def test_a_version_1_manifest_still_catches_a_changed_base():
    model = deterministic_base()
    with torch.no_grad():
        model.resnet.encoder.stages[0].layers[0].layer[0].convolution.weight.view(-1)[3] += 2 ** -9
    with pytest.raises(BaseModelChanged, match="1 of .* frozen tensors differ .*stages.0.layers.0.layer.0.convolution.weight"):
        hf_freeze.apply_delta(model, V1)


def test_new_deltas_are_version_2_and_round_trip(tmp_path):
    model = deterministic_base()
    hf_freeze.apply_policy(model, "backbone")
    with torch.no_grad():
        model.classifier[1].weight.add_(1.0)
    manifest = hf_freeze.save_delta(model, tmp_path, base_model="deterministic-tiny-resnet")
    assert json.loads((tmp_path / "freeze_delta.json").read_text())["version"] == manifest.version == 2
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert manifest.frozen_digests == {n: tensor_digest(tensors[n]) for n in manifest.frozen_digests}
    assert set(manifest.frozen_digests.values()).isdisjoint(tensor_digest_v1(tensors[n]) for n in manifest.frozen_digests)
    rebuilt = hf_freeze.apply_delta(deterministic_base(), tmp_path)
    assert identical(rebuilt.classifier[1].weight, model.classifier[1].weight)


def test_a_manifest_from_the_future_is_refused_by_name(tmp_path):
    shutil.copytree(V1, tmp_path / "d")
    path = tmp_path / "d" / "freeze_delta.json"
    path.write_text(path.read_text().replace('"version": 1', '"version": 3'))
    with pytest.raises(ValueError, match="delta manifest version 3 is not one this hf_freeze understands"):
        DeltaManifest.load(tmp_path / "d")
    with pytest.raises(ValueError, match="unknown fingerprint scheme 7"):
        Fingerprint({}, scheme=7)


def test_verification_reads_a_gathered_state_dict_when_given_one():
    """What Trainer.save_model hands _save on rank 0 under FSDP: checked instead of the (sharded) model."""
    model = tiny_model("resnet")
    hf_freeze.apply_policy(model, "backbone")
    state_dict = {n: t.clone() for n, t in model.state_dict().items()}
    hf_freeze.verify_frozen(model, state_dict=state_dict)
    state_dict["resnet.embedder.embedder.convolution.weight"].view(-1)[0] += 1
    with pytest.raises(FrozenWeightsChanged, match="resnet.embedder.embedder.convolution.weight"):
        hf_freeze.verify_frozen(model, "before saving", state_dict=state_dict)
    with pytest.raises(FrozenWeightsChanged, match="before saving a delta checkpoint"):
        hf_freeze.save_delta(model, "unused", base_model="x", state_dict=state_dict)
    hf_freeze.verify_frozen(model)  # the model itself is untouched


def test_digests_are_device_and_layout_independent():
    t = torch.randn(300, 70, generator=torch.Generator().manual_seed(0))
    assert tensor_digest(t) == tensor_digest(t.t().contiguous().t())  # a transposed copy holds the same values
    assert tensor_digest(t[:, :35]) == tensor_digest(t[:, :35].contiguous())
    assert tensor_digest(torch.empty(0, 3)) != tensor_digest(torch.empty(3, 0))
    assert tensor_digest(torch.empty(2, 3, device="meta")).startswith("meta:")


def test_scheme_2_digests_of_ordinary_tensors_are_the_ones_written_before_quantized_headers():
    """Digests computed by hf_freeze at commit 7b19f75 (before quantized tensors' scale/zero point joined the header):
    fingerprints and delta manifests of ordinary models written then must still match."""
    assert tensor_digest(torch.arange(12, dtype=torch.float32).reshape(3, 4)) == "37031ed4fe16c14e24ab18c12f90e496"
    assert tensor_digest(torch.arange(20000, dtype=torch.float32)) == "fa5e0677a908831409beb0d1990c2bab"  # 5 leaves
    assert tensor_digest(torch.tensor([1, 2, 3], dtype=torch.int8)) == "00c10478d5b75b2922aeec0089b73bfd"


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_quantized_digests_cover_scale_zero_point_and_per_channel_parameters():
    codes = torch.tensor([[1, -2, 3], [4, 5, -6]], dtype=torch.int8)
    per_tensor = {(s, z): tensor_digest(torch._make_per_tensor_quantized_tensor(codes, s, z))
                  for s in (0.01, 0.02) for z in (0, 1)}
    assert len(set(per_tensor.values())) == 4
    assert tensor_digest(torch._make_per_tensor_quantized_tensor(codes, 0.01, 0)) == per_tensor[(0.01, 0)]

    def per_channel(scales, zeros):  # the same int8 codes every time
        return tensor_digest(torch._make_per_channel_quantized_tensor(
            codes, torch.tensor(scales, dtype=torch.float64), torch.tensor(zeros), 0))
    same_codes = per_channel([0.1, 0.2], [0, 0])
    assert same_codes == per_channel([0.1, 0.2], [0, 0])
    assert same_codes != per_channel([0.1, 0.2000001], [0, 0]) and same_codes != per_channel([0.1, 0.2], [0, 1])
    assert same_codes not in per_tensor.values()
