"""FreezePolicy: forms, round trips, and bad policies that must fail cleanly before any mutation."""

import copy
import json

import pytest
from helpers import model_state, same_state, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_freeze
from hf_freeze import FreezePolicy, FreezePolicyError, Unfreeze
from hf_freeze.plan import Timing

GOOD = [
    FreezePolicy(),
    FreezePolicy(freeze="none", layer_lr_decay=0.7),
    FreezePolicy(freeze=2, train_bn=True),
    FreezePolicy(unfreeze=[Unfreeze(at_epoch=1)], unfreeze_bn=True),
    FreezePolicy(freeze=["stem:stage.0", "*.normalization.*"]),
    FreezePolicy(unfreeze=[Unfreeze(at_epoch=2, lr_scale=0.1), Unfreeze(at_epoch=3.5, groups=2, lr_scale=0.01)]),
    FreezePolicy(unfreeze=[Unfreeze(at_step=10, groups=["stage.1"]), Unfreeze(at_step=20, groups=["stem", "stage.0"])],
                 verify=False),
    FreezePolicy(unfreeze=[Unfreeze(at_epoch=3), Unfreeze(at_step=2)], train_bn=True),
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
# 1. wrong in themselves: refused by the constructor / parser, before any model is involved
BAD_FORM = [
    ("freeze bool", lambda: FreezePolicy(freeze=True), "freeze=True"),
    ("freeze float", lambda: FreezePolicy(freeze=2.5), "expected 'backbone'"),
    ("freeze None", lambda: FreezePolicy(freeze=None), "expected 'backbone'"),
    ("freeze empty list", lambda: FreezePolicy(freeze=[]), "non-empty"),
    ("freeze list of ints", lambda: FreezePolicy(freeze=[1, 2]), "non-empty strings"),
    ("freeze negative", lambda: FreezePolicy(freeze=-1), ">= 0"),
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
    ("unfreeze out of order", lambda: FreezePolicy(unfreeze=[Unfreeze(at_epoch=3), Unfreeze(at_epoch=2)]), "time order"),
    ("unfreeze not a list", lambda: FreezePolicy(unfreeze=5), "unfreeze must be a list"),
    ("unfreeze junk item", lambda: FreezePolicy(unfreeze=[3]), "Unfreeze objects"),
    ("adapter with a schedule", lambda: FreezePolicy.from_string("unfreeze=epoch1:1;adapter=lora"), "no unfreeze schedule"),
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

# 2. well-formed policies that do not fit the model: they construct, and apply_policy refuses them
BAD_FOR_MODEL = [
    ("freeze too many groups", "freeze=9", "only 4 groups"),
    ("freeze everything, never unfreeze", "freeze=4", "nothing would train"),
    ("unknown group", "freeze=stage.7", "groups are ['stem', 'stage.0', 'stage.1', 'head']"),
    ("typo group", "freeze=stemm", "matches no group"),
    ("glob matching nothing", "freeze=*.lora_*", "matches no group and no parameter"),
    ("range unknown end", "freeze=stem:stage.9", "unknown group(s) ['stage.9']"),
    ("range backwards", "freeze=stage.1:stem", "runs backwards"),
    ("unfreeze too many groups", "freeze=backbone;unfreeze=epoch1:4", "only 3 are still frozen"),
    ("unfreeze unknown group", "freeze=backbone;unfreeze=epoch1:stage.5", "unknown group(s) ['stage.5']"),
    ("unfreeze a trainable group", "freeze=backbone;unfreeze=epoch1:head", "not frozen at that point"),
    ("unfreeze twice", "freeze=backbone;unfreeze=epoch1:stem,epoch2:stem", "not frozen at that point"),
    ("unfreeze with freeze none", "freeze=none;unfreeze=epoch1:1", "only 0 are still frozen"),
    ("mixed events, no order fits", "freeze=2;unfreeze=epoch1:2,step5:1", "in every order these step and epoch events"),
    ("mixed events, a group twice", "freeze=backbone;unfreeze=step2:stage.1,epoch1:stage.1", "in every order"),
    ("adapter on an unwrapped model", "freeze=backbone;adapter=lora", "wrap the model with hf_freeze.add_adapter"),
    ("adapter on the head", "adapter=lora,groups=head", "the head is trained whole"),
    ("adapter on a trained group", "freeze=1;adapter=lora,groups=stage.1", "not fully frozen by the policy"),
    ("adapter on too many groups", "adapter=lora,groups=5", "only 3 groups before the head"),
]


@pytest.mark.parametrize("what,build,words", BAD_FORM, ids=[b[0] for b in BAD_FORM])
def test_malformed_policy_is_refused_with_a_clear_error(what, build, words):
    with pytest.raises(FreezePolicyError) as err:
        build()
    assert words in str(err.value), str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.fixture
def model():
    return tiny_model("resnet")


def in_use(model):
    """A model mid-run under a policy: one group unfrozen by its event, BatchNorm locked, a parameter the user froze."""
    model.classifier[1].bias.requires_grad_(False)
    hf_freeze.apply_policy(model, "freeze=backbone;unfreeze=epoch1:1,epoch2:1")
    hf_freeze.unfreeze_groups(model, ["stage.1"], when="epoch 1")
    state = hf_freeze.get_state(model)
    state.events_done = 1
    return state


@pytest.mark.parametrize("what,text,words", BAD_FOR_MODEL, ids=[b[0] for b in BAD_FOR_MODEL])
def test_policy_that_does_not_fit_the_model_leaves_a_policy_in_use_untouched(what, text, words, model):
    policy = FreezePolicy.from_string(text)  # well-formed: it is the model that refuses it
    state = in_use(model)
    before, digests, unfrozen = model_state(model), dict(state.fingerprint.digests), dict(state.unfrozen)
    assert before["instance_train"] and not before["requires_grad"]["classifier.1.bias"]
    with pytest.raises(FreezePolicyError) as err:
        hf_freeze.apply_policy(model, policy)
    assert words in str(err.value), str(err.value)
    assert same_state(before, model_state(model))
    assert hf_freeze.get_state(model) is state and state.policy.to_string() == "freeze=backbone;unfreeze=epoch1:1,epoch2:1"
    assert (state.fingerprint.digests, state.unfrozen, state.events_done) == (digests, unfrozen, 1)
    hf_freeze.unfreeze_groups(model, ["stage.0"], when="epoch 2")  # the run goes on under its policy
    assert hf_freeze.changed_frozen_tensors(model) == []


def test_bad_policy_on_a_fresh_model_leaves_it_fresh(model):
    before = model_state(model)
    with pytest.raises(FreezePolicyError):
        hf_freeze.apply_policy(model, {"freeze": ["stem", "nope"]})
    assert same_state(before, model_state(model))


def test_mixed_events_resolve_in_firing_order():
    groups = hf_freeze.layer_groups(tiny_model("resnet"))
    policy = FreezePolicy.from_string("freeze=backbone;unfreeze=epoch3:1,step2:1")
    plan = hf_freeze.resolve(policy, groups)  # step 2 always comes before epoch 3 (an epoch has >= 1 step)
    assert not plan.provisional and [(e.when, e.groups) for e in plan.events] == [("step 2", ("stage.1",)),
                                                                                   ("epoch 3", ("stage.0",))]
    ambiguous = FreezePolicy.from_string("freeze=backbone;unfreeze=step3:1,epoch1:1")
    assert hf_freeze.resolve(ambiguous, groups).provisional
    for steps_per_epoch, first in ((2, "epoch 1"), (3, "step 3"), (4, "step 3")):  # a tie keeps the list order
        timing = Timing(steps_per_epoch, steps_per_epoch)
        plan = hf_freeze.resolve(ambiguous, groups, timing)
        assert not plan.provisional and [e.when for e in plan.events][0] == first
        assert [e.groups for e in plan.events] == [("stage.1",), ("stage.0",)]
    assert Timing(4, 4).fire_step(Unfreeze(at_epoch=1.5)) == 6 and Timing(4, 8, 2).fire_step(Unfreeze(at_epoch=0.3)) == 2


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
