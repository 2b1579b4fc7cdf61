"""Features in combination: every cell either equals the plain path or is refused up front with a reason.

The matrix crosses the features that decide *what* is trained (precision, schedule, train_bn, adapter,
load_best_model_at_end) with the features that must only change *how* it is trained or stored (feature cache,
resume after an interruption, delta checkpoints). Each cell runs twice on a tiny ResNet (BatchNorm included):
once with its path features, once as the reference (cache off, no interruption, full checkpoints), and asserts

* the trained weights of both runs are equal, bit for bit (CPU; stated tolerance: exact, fp32 and bf16 alike);
* every tensor the policy still claims frozen (its fingerprint), and the never-unfrozen stem always, is
  bit-identical to the pretrained base, BatchNorm buffers included;
* the saved folder (full, delta or adapter) reloads to the trained weights exactly.

``CELLS`` covers every pair of factor values (``test_cells_cover_every_pair`` checks the table itself);
``REFUSED`` lists the combinations that are refused, each with the reason it must give; ``EXTRAS`` adds
torch.compile, gradient checkpointing, a model loaded in bfloat16 and a timm model with drop-path, once each.
Where ``cache='auto'`` could serve (a head-only phase left to train, no train_bn, no adapter), the test also
checks that it did, so the equality is not vacuous; likewise the frozen-prefix cache after an unfreeze event. Figures: 11 + 4 cells, all equal to their reference; 3
combinations refused (an adapter with an epoch, step or mixed unfreeze schedule).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import StopAt, TinyImages, head_phase_served, identical, snapshot, tiny_model, training_args

import hf_freeze
from hf_freeze import FreezePolicyError, FreezeTrainer
from hf_freeze.names import named_base_tensors, unwrap_model

FACTORS = {
    "precision": ["fp32", "bf16"],
    "cache": ["off", "auto"],
    "schedule": ["none", "epoch", "step", "mixed"],
    "train_bn": [False, True],
    "adapter": [False, True],
    "save_delta": [False, True],
    "resume": [False, True],
    "load_best": [False, True],
}
#: 32 images, batch 8: 4 optimizer steps per epoch, 3 epochs
SCHEDULES = {"none": "", "epoch": "epoch1:1", "step": "step6:1", "mixed": "epoch2:1,step3:1"}
PATH_FEATURES = {"cache": "off", "save_delta": False, "resume": False}


def _cell(precision, cache, schedule, train_bn, adapter, save_delta, resume, load_best):
    return dict(precision=precision, cache=cache, schedule=schedule, train_bn=train_bn, adapter=adapter,
                save_delta=save_delta, resume=resume, load_best=load_best)


#: a pairwise covering table (an adapter takes no schedule: that pair is in REFUSED)
CELLS = [
    _cell("fp32", "off", "none", True, False, True, False, False),
    _cell("bf16", "auto", "epoch", False, False, False, True, True),
    _cell("fp32", "auto", "none", False, True, True, True, False),
    _cell("bf16", "off", "none", True, True, False, False, True),
    _cell("fp32", "auto", "mixed", True, False, False, True, False),
    _cell("fp32", "auto", "step", False, False, True, False, True),
    _cell("bf16", "off", "step", True, False, False, True, False),
    _cell("bf16", "off", "mixed", False, False, True, False, True),
    _cell("fp32", "off", "epoch", True, False, True, False, False),
    # beyond pairs: the cache with everything that can meet it at once
    _cell("bf16", "auto", "mixed", False, False, True, True, True),
    _cell("fp32", "auto", "none", False, False, False, False, False),
]

REFUSED = [
    (dict(adapter=True, schedule="epoch"), "takes no unfreeze schedule"),
    (dict(adapter=True, schedule="step"), "takes no unfreeze schedule"),
    (dict(adapter=True, schedule="mixed"), "takes no unfreeze schedule"),
]


def cell_id(cell: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in cell.items() if v not in (False, "off", "none", "fp32")) or "plain"


def policy_for(cell: dict) -> str:
    parts = ["freeze=backbone"]
    if SCHEDULES[cell["schedule"]]:
        parts.append("unfreeze=" + SCHEDULES[cell["schedule"]])
    if cell["train_bn"]:
        parts.append("train_bn=true")
    if cell["adapter"]:
        parts.append("adapter=lora,r=4,alpha=8,groups=2")
    return ";".join(parts)


def test_cells_cover_every_pair():
    allowed = {frozenset(c.items()) for c, _ in REFUSED}
    missing = []
    for a, b in itertools.combinations(FACTORS, 2):
        for va, vb in itertools.product(FACTORS[a], FACTORS[b]):
            if any(frozenset({(a, va), (b, vb)}) >= r for r in allowed):
                continue
            if not any(c[a] == va and c[b] == vb for c in CELLS):
                missing.append(f"{a}={va} x {b}={vb}")
    assert missing == []


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "resnet"
    tiny_model("resnet", seed=3).save_pretrained(folder)
    return folder


def load_base(base_dir):
    return type(tiny_model("resnet")).from_pretrained(base_dir)


def run(cell: dict, base_dir, out, **extra):
    """Train ``cell`` (interrupted after step 6 and resumed, if it says so); returns (trainer, saved final folder)."""
    evaluating = cell["load_best"] or cell["resume"]
    kw = dict(num_train_epochs=3, bf16=cell["precision"] == "bf16", save_delta=cell["save_delta"],
              feature_cache=cell["cache"], logging_steps=100)
    if evaluating or cell["save_delta"]:
        kw.update(save_strategy="steps", save_steps=4)
    if evaluating:
        kw.update(eval_strategy="steps", eval_steps=4, load_best_model_at_end=cell["load_best"])
    kw.update(extra)

    def trainer(callbacks=()):
        return FreezeTrainer(model=load_base(base_dir), args=training_args(out, **kw), train_dataset=TinyImages(n=32),
                             eval_dataset=TinyImages(n=16, seed=7) if evaluating else None,
                             freeze_policy=policy_for(cell), callbacks=list(callbacks))

    if cell["resume"]:
        trainer([StopAt(6)]).train()  # killed after step 6; checkpoint-4 is the newest
        t = trainer()
        t.train(resume_from_checkpoint=True)
    else:
        t = trainer()
        t.train()
    folder = out / "final"
    t.save_model(str(folder))
    return t, folder


def trained_tensors(trainer) -> dict[str, torch.Tensor]:
    model = unwrap_model(trainer.model)
    return {n: t.detach().clone() for n, t in (*model.named_parameters(), *model.named_buffers())}


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_cell_equals_the_plain_path(cell, base_dir, tmp_path):
    pretrained = snapshot(load_base(base_dir))
    t, folder = run(cell, base_dir, tmp_path / "cell")
    reference_cell = {**cell, **PATH_FEATURES}
    ref, _ = run(reference_cell, base_dir, tmp_path / "ref")

    if cell["cache"] == "auto":  # the cache really served wherever a head-only phase was left to train
        first_unfreeze = {"none": 12, "epoch": 4, "step": 6, "mixed": 3}[cell["schedule"]]
        start = 4 if cell["resume"] else 0
        could = first_unfreeze > start and not cell["train_bn"] and not cell["adapter"]
        # by the linear-probe cache, or (auto, a schedule that reaches a frozen prefix later) by the prefix cache at
        # the deepest frozen module, whose pass computes the later boundaries too (tests/test_prefix_cache.py)
        assert (head_phase_served(t) > 0) == could, (t.feature_cache_refusal, t.feature_cache_info, t.prefix_cache_info)
        # after an unfreeze the frozen prefix (stem and stage.0) is cached instead, unless train_bn/an adapter rule it out
        prefix = cell["schedule"] != "none" and not cell["train_bn"] and not cell["adapter"]
        assert any(i["served_steps"] > 0 for i in t.prefix_cache_info) == prefix, t.prefix_cache_refusal
        if cell["train_bn"]:
            assert "train_bn=True" in t.prefix_cache_refusal

    got, want = trained_tensors(t), trained_tensors(ref)
    assert sorted(got) == sorted(want)
    assert [n for n in want if not identical(got[n], want[n])] == [], "differs from the plain path"

    # what is claimed frozen is bit-identical to the base; the stem never unfreezes in any schedule
    state = hf_freeze.get_state(t.model)
    base = named_base_tensors(t.model)
    claimed = set(state.fingerprint.digests)
    stem = hf_freeze.layer_groups(t.model)["stem"]
    assert set(stem.param_names) <= claimed
    if not cell["train_bn"]:
        assert set(stem.buffer_names) <= claimed
    assert [n for n in claimed if not identical(base[n], pretrained[n])] == []
    hf_freeze.verify_frozen(t.model)

    # the saved folder reloads to the trained model exactly
    reloaded = unwrap_model(hf_freeze.from_pretrained(folder))
    now = {n: x for n, x in (*reloaded.named_parameters(), *reloaded.named_buffers())}
    model = unwrap_model(t.model)
    if cell["adapter"]:
        pixels = TinyImages(n=4, seed=11).pixels
        model.eval(), reloaded.eval()
        with torch.no_grad():
            assert torch.equal(reloaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)
    else:
        mine = {n: x for n, x in (*model.named_parameters(), *model.named_buffers())}
        assert [n for n in mine if not identical(mine[n], now[n])] == []


@pytest.mark.parametrize("overrides,reason", REFUSED, ids=[str(c) for c, _ in REFUSED])
def test_refused_cells_say_why_before_anything_changes(overrides, reason, base_dir, tmp_path):
    cell = {**{k: v[0] for k, v in FACTORS.items()}, **overrides}
    model = load_base(base_dir)
    before = snapshot(model)
    with pytest.raises(FreezePolicyError, match=reason):
        FreezeTrainer(model=model, args=training_args(tmp_path), train_dataset=TinyImages(n=8),
                      freeze_policy=policy_for(cell))
    assert [n for n, x in snapshot(model).items() if not identical(x, before[n])] == []
    assert hf_freeze.get_state(model) is None and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- at least once each
def vit(seed=4, **config):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                               intermediate_size=37, image_size=32, patch_size=8, num_labels=3,
                                               **config))


def timm_with_drop_path(seed=4):
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    torch.manual_seed(seed)
    return TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_resnet", num_labels=3,
                                                               model_args={"drop_path_rate": 0.2}))


def bf16_loaded(tmp_path):
    folder = tmp_path / "vit-base"
    vit().save_pretrained(folder)
    return type(vit()).from_pretrained(folder, dtype=torch.bfloat16)


def compiled(model):
    return torch.compile(model, backend="aot_eager")


#: (id, model builder, what the cell adds, the reference's settings, a policy); cache 'auto' in every cell
EXTRAS = [
    # the Trainer reads a compiled model's signature as (*args, **kwargs): keep the columns, in both runs
    ("torch.compile+unfreeze", lambda tmp: tiny_model("resnet", seed=5), dict(wrap=compiled, remove_unused_columns=False),
     dict(wrap=None, remove_unused_columns=False),
     "freeze=backbone;unfreeze=step5:1"),
    ("gradient_checkpointing+unfreeze", lambda tmp: vit(), dict(gradient_checkpointing=True),
     dict(gradient_checkpointing=False), "freeze=backbone;unfreeze=step5:1"),
    ("bf16-loaded+bf16", bf16_loaded, dict(bf16=True), dict(bf16=True, feature_cache="off"), "freeze=backbone"),
    ("timm drop-path+unfreeze", lambda tmp: timm_with_drop_path(), dict(), dict(feature_cache="off"),
     "freeze=backbone;unfreeze=step5:1"),
]


@pytest.mark.parametrize("name,build,cell,reference,policy", EXTRAS, ids=[e[0] for e in EXTRAS])
def test_extra_cell_equals_the_plain_path(name, build, cell, reference, policy, tmp_path):
    size = 32

    def train(settings, out):
        settings = dict(settings)
        wrap = settings.pop("wrap", None)
        model = build(tmp_path)
        pretrained = snapshot(model)
        trainer = FreezeTrainer(model=wrap(model) if wrap else model,
                                args=training_args(out, num_train_epochs=2, logging_steps=100,
                                                   **{"feature_cache": "auto", **settings}),
                                train_dataset=TinyImages(n=32, size=size), freeze_policy=policy)
        trainer.train()
        return trainer, model, pretrained

    t, model, pretrained = train(cell, tmp_path / "cell")
    r, ref_model, _ = train(reference, tmp_path / "ref")
    got, want = snapshot(model), snapshot(ref_model)
    assert [n for n in want if not identical(got[n], want[n])] == [], "differs from the plain path"
    claimed = hf_freeze.get_state(model).fingerprint.digests
    assert claimed and [n for n in claimed if not identical(got[n], pretrained[n])] == []
    hf_freeze.verify_frozen(model)
    if "unfreeze" in policy:  # the schedule really ran: the group it unfroze trained
        group = hf_freeze.freeze_report(model).rows[-2]
        assert group.unfrozen_at == "step 5"
        assert any(not identical(got[n], pretrained[n]) for n in hf_freeze.layer_groups(model)[group.name].param_names)
    if name.startswith(("timm", "torch.compile")):
        assert t.feature_cache_refusal  # auto trained without the cache, and said why
    else:
        assert head_phase_served(t) > 0
