"""Layer groups for every model type in transformers' image-classification mapping (tiny configs)."""

import re

import pytest
import torch
from helpers import (
    ALL_TYPES,
    BUILDABLE,
    CLASSIFIERS,
    NOT_BUILDABLE,
    changed_names,
    loss_of,
    model_inputs,
    snapshot,
    tiny_model,
)

import hf_freeze
from hf_freeze.groups import build_groups, classify_names, discover_layout, ordered_tensor_names, place_by_position

# What maps features to logits, per the reference notes (written independently of the architecture table).
EXPECTED_HEAD = {
    "resnet": ["classifier.1."], "regnet": ["classifier.1."], "bit": ["classifier.1."],
    "cvt": ["layernorm.", "classifier."], "levit": ["classifier.batch_norm.", "classifier.linear."],
    "swiftformer": ["norm.", "head.", "dist_head."], "hgnet_v2": ["fc."], "textnet": ["fc."],
    "poolformer": ["norm.", "classifier."], "imagegpt": ["score."], "pp_lcnet": ["head."],
    "perceiver": ["perceiver.decoder."], "timm_wrapper": ["timm_model.fc."],
}
BN_TYPES = {"resnet", "regnet", "cvt", "levit", "efficientnet", "mobilenet_v1", "mobilenet_v2", "mobilevit",
            "mobilevitv2", "swiftformer", "hgnet_v2", "textnet", "pp_lcnet", "timm_wrapper"}


def test_every_mapping_type_has_a_tiny_config():
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as mapping

    assert sorted(mapping) == ALL_TYPES


@pytest.fixture(scope="module", params=CLASSIFIERS)
def built(request):
    return request.param, tiny_model(request.param)


def test_groups_partition_every_parameter(built):
    model_type, model = built
    groups = hf_freeze.layer_groups(model)
    names = [n for g in groups for n in g.param_names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()), "each parameter exactly once"
    assert len(names) == len(set(names))
    assert sum(g.num_params for g in groups) == sum(p.numel() for p in model.parameters())
    order = groups.names
    assert order[-1] == "head"
    stages = [n for n in order if n.startswith("stage.")]
    assert stages == [f"stage.{i}" for i in range(len(stages))] and len(stages) >= 1
    expected_order = [n for n in ["stem", *stages, "neck", "head"] if n in order]
    assert order == expected_order
    assert groups.source == ("timm group_matcher" if model_type == "timm_wrapper" else "table")


def test_head_is_what_maps_features_to_logits(built):
    model_type, model = built
    head = hf_freeze.layer_groups(model)["head"].param_names
    prefixes = EXPECTED_HEAD.get(model_type, ["classifier."])
    assert head and all(n.startswith(tuple(prefixes)) for n in head), head
    for p in prefixes:
        assert any(n.startswith(p) for n in head), f"{p} missing from head {head}"


def test_backbone_freeze_trains_only_head_and_keeps_frozen_tensors_bit_identical(built):
    model_type, model = built
    report = hf_freeze.apply_policy(model, "backbone")
    head_group = hf_freeze.layer_groups(model)["head"]
    head = set(head_group.param_names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == head
    assert report.trainable_params == sum(p.numel() for n, p in model.named_parameters() if n in head)
    head |= set(head_group.buffer_names)  # a head-side BatchNorm (levit, swiftformer) trains its statistics
    before = snapshot(model)
    # AdamW over *all* parameters with weight decay, as many scripts do: frozen ones must still not move.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(3):
        model.train()  # the Trainer calls this on every step
        loss_of(model, model_inputs(model_type, model, seed=step)).backward()
        opt.step()
        opt.zero_grad()
    changed = changed_names(before, model)
    assert changed and set(changed) <= head, f"frozen tensors changed: {sorted(set(changed) - head)}"
    assert hf_freeze.changed_frozen_tensors(model) == []
    if model_type in BN_TYPES:
        assert any(r.norms == "eval (locked)" for r in report.rows if r.state == "frozen")
        assert all(r.norms in ("eval (locked)", "-") for r in report.rows if r.state == "frozen")
    hf_freeze.remove_policy(model)


def test_generic_discovery_agrees_with_the_table_on_partition_and_head(built):
    model_type, model = built
    if model_type in ("timm_wrapper", "perceiver"):
        pytest.skip("timm uses group_matcher; perceiver's head lives inside its base model (table only)")
    layout = discover_layout(model)
    order, _, _ = ordered_tensor_names(model)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    groups = build_groups(order, place_by_position(classify_names(order, layout, model.base_model_prefix
                                                                  if hasattr(model, model.base_model_prefix) else "")), sizes)
    assert sorted(n for g in groups for n in g.param_names) == sorted(sizes)
    assert groups[-1].param_names == hf_freeze.layer_groups(model)["head"].param_names


def test_unknown_model_type_falls_back_to_discovery_and_says_so(caplog):
    model = tiny_model("resnet")
    model.config.model_type = "my-new-resnet"
    with caplog.at_level("WARNING"):
        groups = hf_freeze.layer_groups(model)
    assert groups.source == "generic discovery"
    assert "generic discovery" in caplog.text and "my-new-resnet" in caplog.text
    assert groups.names == ["stem", "stage.0", "stage.1", "head"]


def test_not_a_classifier_is_refused_clearly():
    model = tiny_model("shieldgemma2")
    with pytest.raises(hf_freeze.UnsupportedModelError, match="not a pixel_values -> labels classifier"):
        hf_freeze.layer_groups(model)


@pytest.mark.parametrize("model_type", ["imagegpt", "perceiver", "pp_lcnet", "siglip2"])
def test_types_off_the_pixel_values_labels_path_are_reported(model_type):
    groups = hf_freeze.layer_groups(tiny_model(model_type))
    assert groups.input_issue and re.search(r"input_ids|inputs=|labels|patches", groups.input_issue)
    assert "Note:" in str(hf_freeze.apply_policy(tiny_model(model_type), "backbone"))


def test_dinat_is_documented_as_not_buildable():
    assert set(NOT_BUILDABLE) == {"dinat"}
    assert "dinat" in hf_freeze.architectures.ARCHITECTURES
    assert set(BUILDABLE) | {"dinat"} == set(ALL_TYPES)


@pytest.mark.parametrize("arch", ["test_vit", "test_convnext", "test_efficientnet"])
def test_timm_models_group_through_group_matcher(arch):
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture=arch, model_args={}, num_labels=3))
    groups = hf_freeze.layer_groups(model)
    assert groups.source == "timm group_matcher"
    classifier = model.timm_model.pretrained_cfg["classifier"]
    assert all(n.startswith(f"timm_model.{classifier}.") for n in groups["head"].param_names)
    assert sorted(n for g in groups for n in g.param_names) == sorted(n for n, _ in model.named_parameters())
    assert groups.names[0] == "stem" and len([n for n in groups.names if n.startswith("stage.")]) >= 2
