"""FreezePolicy: forms, round trips, and bad policies that must fail cleanly before any mutation."""

import copy
import json

import pytest
from helpers import model_state, same_state, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_freeze
from hf_freeze import FreezePolicy, FreezePolicyError, Unfreeze

GOOD = [
    FreezePolicy(),
    FreezePolicy(freeze="none", layer_lr_decay=0.7),
    FreezePolicy(freeze=2, train_bn=True),
    FreezePolicy(unfreeze=[Unfreeze(at_epoch=1)], unfreeze_bn=True),
    FreezePolicy(freeze=["stem:stage.0", "*.normalization.*"]),
    FreezePolicy(unfreeze=[Unfreeze(at_epoch=2, lr_scale=0.1), Unfreeze(at_epoch=3.5, groups=2, lr_scale=0.01)]),
    FreezePolicy(unfreeze=[Unfreeze(at_step=10, groups=["stage.1"]), Unfreeze(at_step=20, groups=["stem", "stage.0"])],
                 verify=False),
]


@pytest.mark.parametrize("policy", GOOD, ids=str)
def test_round_trips(policy, tmp_path):
    assert FreezePolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    assert FreezePolicy.from_string(policy.to_string()) == policy
    policy.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "freeze_policy.json").read_text())["version"] == 1
    assert FreezePolicy.from_pretrained(tmp_path / "out") == policy
    hf_freeze.apply_policy(tiny_model("resnet"), policy)  # every good policy applies to a real model


def test_string_form_examples():
    p = FreezePolicy.from_string("freeze=stem:stage.0;unfreeze=epoch2:1@0.1,step50:head+stage.1;train_bn=yes;layer_lr_decay=0.8")
    assert p.freeze == ["stem:stage.0"] and p.train_bn and p.layer_lr_decay == 0.8
    assert p.unfreeze == [Unfreeze(at_epoch=2.0, groups=1, lr_scale=0.1), Unfreeze(at_step=50, groups=["head", "stage.1"])]
    assert FreezePolicy.from_string("backbone") == FreezePolicy()
    assert FreezePolicy.from_string("3").freeze == 3
    assert FreezePolicy("stem,stage.0").freeze == ["stem", "stage.0"]


def test_int_range_list_and_glob_select_the_right_parameters():
    model = tiny_model("resnet")
    groups = hf_freeze.layer_groups(model)
    frozen = lambda p: hf_freeze.resolve(FreezePolicy.coerce(p), groups).frozen_params  # noqa: E731
    stem_and_0 = set(groups["stem"].param_names) | set(groups["stage.0"].param_names)
    assert frozen(2) == frozen(["stem:stage.0"]) == frozen(["stem", "stage.0"]) == stem_and_0
    assert frozen("none") == set()
    bn = frozen(["*.normalization.*"])
    assert bn and all(".normalization." in n for n in bn)
    plan = hf_freeze.resolve(FreezePolicy(unfreeze=[Unfreeze(at_epoch=1, groups=2), Unfreeze(at_epoch=2)]), groups)
    assert [e.groups for e in plan.events] == [("stage.0", "stage.1"), ("stem",)]


def test_layer_lr_decay_is_geometric_from_the_head():
    groups = hf_freeze.layer_groups(tiny_model("resnet"))
    plan = hf_freeze.resolve(FreezePolicy(freeze="none", layer_lr_decay=0.5), groups)
    assert [plan.depth_scale[g] for g in groups.names] == [0.125, 0.25, 0.5, 1.0]


# ----------------------------------------------------------------------------- bad policies
# (description, how to build it, words the error must contain)
BAD = [
    ("freeze bool", lambda: FreezePolicy(freeze=True), "freeze=True"),
    ("freeze float", lambda: FreezePolicy(freeze=2.5), "expected 'backbone'"),
    ("freeze None", lambda: FreezePolicy(freeze=None), "expected 'backbone'"),
    ("freeze empty list", lambda: FreezePolicy(freeze=[]), "non-empty"),
    ("freeze list of ints", lambda: FreezePolicy(freeze=[1, 2]), "non-empty strings"),
    ("freeze negative", lambda: FreezePolicy(freeze=-1), ">= 0"),
    ("freeze too many groups", lambda: FreezePolicy(freeze=9), "only 4 groups"),
    ("freeze everything, never unfreeze", lambda: FreezePolicy(freeze=4), "nothing would train"),
    ("unknown group", lambda: FreezePolicy(freeze=["stage.7"]), "groups are ['stem', 'stage.0', 'stage.1', 'head']"),
    ("typo group", lambda: FreezePolicy(freeze=["stemm"]), "matches no group"),
    ("glob matching nothing", lambda: FreezePolicy(freeze=["*.lora_*"]), "matches no group and no parameter"),
    ("range unknown end", lambda: FreezePolicy(freeze=["stem:stage.9"]), "unknown group(s) ['stage.9']"),
    ("range backwards", lambda: FreezePolicy(freeze=["stage.1:stem"]), "runs backwards"),
    ("train_bn string", lambda: FreezePolicy(train_bn="yes"), "train_bn must be True or False"),
    ("verify int", lambda: FreezePolicy(verify=1), "verify must be True or False"),
    ("unfreeze_bn string", lambda: FreezePolicy(unfreeze_bn="no"), "unfreeze_bn must be True or False"),
    ("decay zero", lambda: FreezePolicy(layer_lr_decay=0), "layer_lr_decay must be in (0, 1]"),
    ("decay above one", lambda: FreezePolicy(layer_lr_decay=1.5), "layer_lr_decay"),
    ("decay nan", lambda: FreezePolicy(layer_lr_decay=float("nan")), "layer_lr_decay"),
    ("decay string", lambda: FreezePolicy(layer_lr_decay="0.5"), "layer_lr_decay"),
    ("unfreeze without time", lambda: FreezePolicy(unfreeze=[Unfreeze()]), "exactly one of at_epoch or at_step"),
    ("unfreeze both times", lambda: Unfreeze(at_epoch=1, at_step=3), "exactly one"),
    ("unfreeze at epoch 0", lambda: Unfreeze(at_epoch=0), "at_epoch must be a number > 0"),
    ("unfreeze negative step", lambda: Unfreeze(at_step=-5), "at_step must be an integer > 0"),
    ("unfreeze float step", lambda: Unfreeze(at_step=2.5), "at_step must be an integer"),
    ("unfreeze zero groups", lambda: Unfreeze(at_epoch=1, groups=0), "groups must be >= 1"),
    ("unfreeze empty groups", lambda: Unfreeze(at_epoch=1, groups=[]), "non-empty list"),
    ("unfreeze lr zero", lambda: Unfreeze(at_epoch=1, lr_scale=0), "lr_scale must be a finite number > 0"),
    ("unfreeze lr inf", lambda: Unfreeze(at_epoch=1, lr_scale=float("inf")), "lr_scale"),
    ("unfreeze too many groups", lambda: FreezePolicy(unfreeze=[Unfreeze(at_epoch=1, groups=4)]), "only 3 are still frozen"),
    ("unfreeze unknown group", lambda: FreezePolicy(unfreeze=[Unfreeze(at_epoch=1, groups=["stage.5"])]), "unknown group(s) ['stage.5']"),
    ("unfreeze a trainable group", lambda: FreezePolicy(unfreeze=[Unfreeze(at_epoch=1, groups=["head"])]), "not frozen at that point"),
    ("unfreeze twice", lambda: FreezePolicy(unfreeze=[Unfreeze(at_epoch=1, groups=["stem"]), Unfreeze(at_epoch=2, groups=["stem"])]), "not frozen at that point"),
    ("unfreeze with freeze none", lambda: FreezePolicy(freeze="none", unfreeze=[Unfreeze(at_epoch=1)]), "only 0 are still frozen"),
    ("unfreeze out of order", lambda: FreezePolicy(unfreeze=[Unfreeze(at_epoch=3), Unfreeze(at_epoch=2)]), "time order"),
    ("unfreeze not a list", lambda: FreezePolicy(unfreeze=5), "unfreeze must be a list"),
    ("unfreeze junk item", lambda: FreezePolicy(unfreeze=[3]), "Unfreeze objects"),
    ("unknown dict key", lambda: FreezePolicy.from_dict({"freez": "backbone"}), "unknown FreezePolicy field(s) ['freez']"),
    ("unknown event key", lambda: FreezePolicy.from_dict({"unfreeze": [{"epoch": 2}]}), "valid fields"),
    ("future version", lambda: FreezePolicy.from_dict({"version": 9}), "version 9 is not supported"),
    ("dict is a list", lambda: FreezePolicy.from_dict(["backbone"]), "dict is expected"),
    ("string bad key", lambda: FreezePolicy.from_string("freeze=backbone;lr=3"), "unknown policy string field(s) ['lr']"),
    ("string repeated key", lambda: FreezePolicy.from_string("freeze=1;freeze=2"), "twice"),
    ("string bad bool", lambda: FreezePolicy.from_string("train_bn=maybe"), "expected true or false"),
    ("string bad event", lambda: FreezePolicy.from_string("unfreeze=at2:1"), "cannot parse unfreeze event"),
    ("string bad decay", lambda: FreezePolicy.from_string("layer_lr_decay=fast"), "layer_lr_decay='fast'"),
    ("string no value", lambda: FreezePolicy.from_string("freeze=backbone;train_bn"), "expected key=value"),
    ("coerce wrong type", lambda: FreezePolicy.coerce(3.0), "expected a FreezePolicy"),
]


@pytest.fixture
def model():
    return tiny_model("resnet")


@pytest.mark.parametrize("what,build,words", BAD, ids=[b[0] for b in BAD])
def test_bad_policy_gives_a_clear_error_and_leaves_the_model_untouched(what, build, words, model):
    hf_freeze.apply_policy(model, FreezePolicy(freeze=1))  # an existing policy must survive a failed re-apply
    before = model_state(model)
    with pytest.raises(FreezePolicyError) as err:
        hf_freeze.apply_policy(model, build())
    assert words in str(err.value), str(err.value)
    assert isinstance(err.value, ValueError)
    assert same_state(before, model_state(model))
    assert hf_freeze.get_state(model).policy == FreezePolicy(freeze=1)


def test_bad_policy_on_a_fresh_model_leaves_it_fresh(model):
    before = model_state(model)
    with pytest.raises(FreezePolicyError):
        hf_freeze.apply_policy(model, {"freeze": ["stem", "nope"]})
    assert same_state(before, model_state(model))


selectors = st.lists(st.sampled_from(["stem", "stage.0", "stage.1", "head", "stem:stage.1", "*.convolution.*",
                                      "stage.9", "stage.1:stem", "*.xyz*", "head:head", "stem:stage.0"]),
                     min_size=1, max_size=4)
events = st.lists(st.builds(lambda e, g, s: Unfreeze(at_epoch=e, groups=g, lr_scale=s),
                            st.integers(1, 4), st.one_of(st.integers(1, 4), st.sampled_from([["stem"], ["stage.1"], ["head"]])),
                            st.sampled_from([1.0, 0.1])), max_size=3)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(freeze=st.one_of(st.integers(-1, 5), selectors, st.sampled_from(["backbone", "none"])), unfreeze=events,
       train_bn=st.booleans())
def test_any_policy_either_applies_or_fails_cleanly(freeze, unfreeze, train_bn):
    model = tiny_model("resnet")
    before = model_state(model)
    try:
        policy = FreezePolicy(freeze=copy.deepcopy(freeze), unfreeze=unfreeze, train_bn=train_bn)
        report = hf_freeze.apply_policy(model, policy)
    except FreezePolicyError as e:
        assert str(e) and same_state(before, model_state(model))
        return
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert report.trainable_params == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert trainable or policy.unfreeze
    hf_freeze.remove_policy(model)
    after = model_state(model)
    assert after["requires_grad"] == before["requires_grad"] and after["instance_train"] == []
