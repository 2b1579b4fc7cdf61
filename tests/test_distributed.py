"""Backend rules (hf_freeze.distributed): every accepted and refused path, from the configuration that will run.

The FSDP/DeepSpeed plugins here are the real ones built from the Trainer's processed arguments; only the
accelerate state that carries them is spelled out (``state(...)``), because accelerate turns FSDP on only on GPUs.
What the Trainer hands DDP is compared with a real Trainer's. Two-process runs show the refusals where they
happen (``FreezeTrainer.__init__``) and checkpointing + an unfreeze schedule training under DDP.
"""

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from helpers import TinyImages, identical, model_state, same_state, snapshot, tiny_model, training_args
from torchrun import torchrun_script

import hf_freeze
from hf_freeze import FreezePolicyError, FreezeTrainer
from hf_freeze.distributed import check_backend, ddp_options, effective_backend

SCHEDULE = "freeze=backbone;unfreeze=step2:1"


def state(kind, world=2, mixed_precision="no", **plugins):
    """What accelerate's AcceleratorState exposes to hf_freeze (distributed type, processes, plugins)."""
    return SimpleNamespace(distributed_type=kind, num_processes=world, mixed_precision=mixed_precision,
                           fsdp_plugin=plugins.get("fsdp"), deepspeed_plugin=plugins.get("deepspeed"))


def check(args, policy, model=None, st=None):
    model = model if model is not None else tiny_model("vit")
    return check_backend(args, hf_freeze.FreezePolicy.coerce(policy), model,
                         backend=effective_backend(args, model, st))


# --------------------------------------------------------------------------- FSDP
def test_trainer_default_fsdp_config_is_fsdp2_and_accepts_a_schedule(tmp_path):
    args = training_args(tmp_path, fsdp="full_shard")
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)  # what Trainer.create_accelerator... builds
    backend = check(args, SCHEDULE, st=state(DistributedType.FSDP, fsdp=plugin))
    assert (backend.kind, backend.fsdp_version) == ("fsdp", 2)


def test_fsdp1_refused_unless_use_orig_params_and_no_verification(tmp_path):
    args = training_args(tmp_path, fsdp="full_shard", fsdp_config={"version": 1})
    assert args.fsdp_plugin_args["use_orig_params"] is True  # the Trainer's FSDP1 default
    # (sync_module_states needs an accelerator device to build the plugin; it does not matter here)
    plugin = FullyShardedDataParallelPlugin(**{**args.fsdp_plugin_args, "sync_module_states": False})
    with pytest.raises(FreezePolicyError, match="FSDP1 keeps each parameter as a flattened slice"):
        check(args, SCHEDULE, st=state(DistributedType.FSDP, fsdp=plugin))
    check(args, SCHEDULE + ";verify=false", st=state(DistributedType.FSDP, fsdp=plugin))
    accelerate_default = FullyShardedDataParallelPlugin()  # version 1, use_orig_params=False
    with pytest.raises(FreezePolicyError, match="use_orig_params=False cannot mix frozen and trainable"):
        check(args, "freeze=backbone;verify=false", st=state(DistributedType.FSDP, fsdp=accelerate_default))


def test_fsdp2_mixed_precision_refuses_a_schedule_over_low_precision_weights(tmp_path):
    args = training_args(tmp_path, fsdp="full_shard")
    st = state(DistributedType.FSDP, mixed_precision="bf16", fsdp=FullyShardedDataParallelPlugin(**args.fsdp_plugin_args))
    check(args, SCHEDULE, st=st)  # fp32 weights: nothing to upcast
    check(args, "backbone", tiny_model("vit").to(torch.bfloat16), st)  # no schedule: frozen ones are never upcast
    with pytest.raises(FreezePolicyError, match="upcasts every trainable parameter"):
        check(args, SCHEDULE, tiny_model("vit").to(torch.bfloat16), st)


def test_environment_variables_are_not_the_configuration(tmp_path, monkeypatch):
    """The old rules re-parsed ACCELERATE_USE_FSDP/FSDP_VERSION and refused this run, which uses no FSDP at all."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("FSDP_USE_ORIG_PARAMS", "false")
    trainer = FreezeTrainer(model=tiny_model("resnet"), args=training_args(tmp_path), train_dataset=TinyImages(8),
                            freeze_policy=SCHEDULE)
    assert not trainer.is_fsdp_enabled and hf_freeze.get_state(trainer.model).policy.unfreeze


# --------------------------------------------------------------------------- DeepSpeed (plugin from the Trainer's args)
@pytest.fixture
def ds_args(tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'hf_freeze[deepspeed]')")

    def make(stage, **kw):
        args = training_args(tmp_path, deepspeed={"zero_optimization": {"stage": stage}, "bf16": {"enabled": "auto"}}, **kw)
        return args, state(DistributedType.DEEPSPEED, deepspeed=args.deepspeed_plugin)
    return make


def test_deepspeed_zero2_accepted_without_a_schedule_refused_with_one(ds_args):
    args, st = ds_args(2)
    assert check(args, "backbone", st=st).zero_stage == 2
    with pytest.raises(FreezePolicyError, match="DeepSpeed ignores tensors unfrozen after deepspeed.initialize"):
        check(args, SCHEDULE, st=st)


def test_deepspeed_zero3_refused(ds_args):
    args, st = ds_args(3)
    with pytest.raises(FreezePolicyError, match="ZeRO-3 partitions parameters"):
        check(args, "backbone", st=st)


def test_deepspeed_bf16_refused_unless_the_model_already_is_bf16(ds_args):
    args, st = ds_args(2, bf16=True)
    with pytest.raises(FreezePolicyError, match="bf16 mode casts every parameter"):
        check(args, "backbone", st=st)
    check(args, "backbone", tiny_model("vit").to(torch.bfloat16), st)


# --------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("overrides", [
    {}, {"ddp_find_unused_parameters": False}, {"ddp_find_unused_parameters": True}, {"gradient_checkpointing": True},
    {"gradient_checkpointing": True, "ddp_find_unused_parameters": True}, {"ddp_static_graph": True},
    "model_checkpointing"])
def test_ddp_options_are_what_the_trainer_gives_ddp(tmp_path, overrides):
    model = tiny_model("vit")
    if overrides == "model_checkpointing":
        model.gradient_checkpointing_enable()
        overrides = {}
    args = training_args(tmp_path, **overrides)
    handler = hf_freeze.FreezeTrainer(model=model, args=args, train_dataset=TinyImages(8),
                                      freeze_policy="backbone").accelerator.ddp_handler
    assert ddp_options(args, model) == (handler.find_unused_parameters, handler.static_graph)


@pytest.mark.parametrize(("overrides", "refusal"), [
    ({}, None),
    ({"ddp_find_unused_parameters": False}, "ddp_find_unused_parameters=False with the unfreeze schedule"),
    ({"gradient_checkpointing": True}, "activation \\(gradient\\) checkpointing is on, so the Trainer passes"),
    ({"gradient_checkpointing": True, "ddp_find_unused_parameters": True}, None),
    ({"gradient_checkpointing": True, "ddp_find_unused_parameters": True,
      "gradient_checkpointing_kwargs": {"use_reentrant": True}}, "reentrant activation checkpointing"),
    ({"ddp_static_graph": True}, "ddp_static_graph=True with the unfreeze schedule"),
])
def test_ddp_rules_with_a_schedule(tmp_path, overrides, refusal):
    args = training_args(tmp_path, **overrides)
    st = state(DistributedType.MULTI_CPU)
    check(args, "backbone", st=st)  # without a schedule every DDP set-up is fine
    if refusal is None:
        assert check(args, SCHEDULE, st=st).kind == "ddp"
    else:
        with pytest.raises(FreezePolicyError, match=refusal):
            check(args, SCHEDULE, st=st)


@pytest.mark.slow
def test_two_processes_refuse_ddp_traps_before_training_and_train_checkpointing_with_a_schedule(tmp_path):
    torchrun_script("ddp_checks.py", tmp_path, expect=["rank0.pt", "rank1.pt"])
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["refusals"] == r1["refusals"]
    refusals = r0["refusals"]
    assert "activation (gradient) checkpointing is on" in refusals["checkpointing"]
    assert "ddp_static_graph=True" in refusals["static_graph"]
    assert "ddp_find_unused_parameters=False" in refusals["find_unused_false"]
    assert refusals["checkpointing_find_unused"] is None and refusals["fsdp_env_on_cpu"] is None
    # gradient checkpointing + ddp_find_unused_parameters=True + a mid-run unfreeze: it trains, correctly
    assert r0["checkpointing"] and r0["unfrozen"] == {"neck": ("step 2", 1.0), "stage.1": ("step 4", 1.0)}
    assert [n for n in r0["final"] if not identical(r0["final"][n], r1["final"][n])] == []
    moved = {n.split(".")[1] for n in r0["final"] if not identical(r0["final"][n], r0["base"][n])}
    assert {"layers", "layernorm", "weight", "bias"} <= moved  # stage.1 (vit.layers.1), neck, head
    assert [n for n in r0["frozen"] if not identical(r0["final"][n], r0["base"][n])] == []
    assert not any(n.startswith("vit.layers.0.") for n in r0["final"] if not identical(r0["final"][n], r0["base"][n]))


# --------------------------------------------------------------------------- meta / offloaded tensors (issue 10, item 8)
def offloaded_vit():
    from accelerate import cpu_offload

    model = tiny_model("vit")
    cpu_offload(model, execution_device=torch.device("cpu"))  # weights go to accelerate's hooks, params to meta
    return model


def test_meta_tensors_are_reported_but_never_verified():
    model = offloaded_vit()
    assert all(p.is_meta for p in model.parameters())
    report = hf_freeze.apply_policy(model, "backbone")  # inspect-style use still works
    assert report.fingerprinted > 0
    with pytest.raises(FreezePolicyError, match="cannot verify frozen tensors on the meta device"):
        hf_freeze.verify_frozen(model)
    with pytest.raises(FreezePolicyError, match="meta device"):
        hf_freeze.changed_frozen_tensors(model)


def test_trainer_refuses_an_offloaded_model_before_touching_it(tmp_path):
    model = offloaded_vit()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(FreezePolicyError, match="cannot train with verification of frozen tensors on the meta device"):
        FreezeTrainer(model=model, args=training_args(tmp_path), train_dataset=TinyImages(8), freeze_policy="backbone")
    assert hf_freeze.get_state(model) is None and {n: p.requires_grad for n, p in model.named_parameters()} == before


# --------------------------------------------------------------------------- quantized parameters (issue 10, item 8)
class Int8Conv(torch.nn.Module):
    """A weight-only int8 convolution (what bitsandbytes-style quantized layers hold): int8 codes + a float scale."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        scale = conv.weight.detach().abs().amax() / 127
        self.weight = torch.nn.Parameter(torch.round(conv.weight.detach() / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        self.stride, self.padding = conv.stride, conv.padding

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight.float() * self.scale, None, self.stride, self.padding)


def quantized_resnet():
    model = tiny_model("resnet")
    layer = model.resnet.encoder.stages[1].layers[0].layer[1]
    layer.convolution = Int8Conv(layer.convolution)
    return model, "resnet.encoder.stages.1.layers.0.layer.1.convolution.weight"


def test_frozen_quantized_weights_train_the_head_and_stay_bit_identical(tmp_path):
    model, q = quantized_resnet()
    before = snapshot(model)
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path, max_steps=3), train_dataset=TinyImages(24),
                            freeze_policy="backbone")
    trainer.train()  # verification runs at the end of training
    now = snapshot(model)
    assert identical(now[q], before[q]) and now[q].dtype == torch.int8
    assert q in hf_freeze.get_state(model).fingerprint.digests
    assert not identical(now["classifier.1.weight"], before["classifier.1.weight"])


@pytest.mark.parametrize(("policy", "match"), [
    ("none", "group\\(s\\) \\['stage.1'\\] hold quantized / integer parameters .* but the policy trains them"),
    ("freeze=backbone;unfreeze=step2:stage.1", "but the policy unfreezes them \\(step 2\\)"),
    ("freeze=stem;unfreeze=epoch1:1", "but the policy trains them"),
])
def test_training_or_unfreezing_a_quantized_group_is_refused_at_resolve_time(policy, match):
    model, _ = quantized_resnet()
    before = model_state(model)
    with pytest.raises(FreezePolicyError, match=match):
        hf_freeze.apply_policy(model, policy)
    assert same_state(model_state(model), before)


def test_manual_unfreeze_of_a_quantized_group_is_refused_untouched():
    model, _ = quantized_resnet()
    hf_freeze.apply_policy(model, "backbone")
    before = model_state(model)
    with pytest.raises(FreezePolicyError, match="cannot unfreeze \\['stage.1'\\]: they hold quantized"):
        hf_freeze.unfreeze_groups(model, ["stage.1"])
    assert same_state(model_state(model), before)
    hf_freeze.unfreeze_groups(model, ["stage.0"])  # a float group still unfreezes


def test_bitsandbytes_int8_backbone_freezes_verifies_and_refuses_to_train(tmp_path):
    """A real bitsandbytes LLM.int8 model on CPU (transformers' quantizer; the head kept in float)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'hf_freeze[quantization]'; not in the tests extra: importing it adds seconds to every process that imports peft)")
    from transformers import AutoModelForImageClassification, BitsAndBytesConfig

    tiny_model("vit").save_pretrained(tmp_path / "vit")
    model = AutoModelForImageClassification.from_pretrained(
        tmp_path / "vit", device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["classifier"]))
    int8 = [n for n, p in model.named_parameters() if type(p).__name__ == "Int8Params"]
    assert int8 and all(n.startswith("vit.layers.") for n in int8)
    before = model_state(model)
    with pytest.raises(FreezePolicyError, match="\\['stage.1'\\] hold quantized .* unfreezes them"):
        hf_freeze.apply_policy(model, "freeze=backbone;unfreeze=step1:2")  # neck + stage.1
    assert same_state(model_state(model), before)
    hf_freeze.apply_policy(model, "backbone")
    assert set(int8) <= set(hf_freeze.get_state(model).fingerprint.digests)
    head = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(head, lr=0.1)
    data = TinyImages(8)
    for i in range(2):
        model(pixel_values=data.pixels[4 * i:4 * i + 4], labels=data.labels[4 * i:4 * i + 4]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    hf_freeze.verify_frozen(model)
    after = snapshot(model)
    assert all(identical(after[n], before["tensors"][n]) for n in int8)
    assert not identical(after["classifier.weight"], before["tensors"]["classifier.weight"])


def test_the_readme_accelerate_fsdp2_config_gives_fsdp2_and_accepts_a_schedule(tmp_path, monkeypatch):
    """examples/accelerate_fsdp2.yaml through accelerate's own launcher: the environment it sets, the plugin."""
    from pathlib import Path

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = Path(__file__).resolve().parents[1] / "examples" / "accelerate_fsdp2.yaml"
    launch, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config), "x.py"]))
    env = prepare_multi_gpu_env(launch)
    for k, v in env.items():
        if k.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()  # what the Accelerator builds from that environment
    assert (plugin.fsdp_version, plugin.reshard_after_forward, str(plugin.state_dict_type)) == (
        2, True, "StateDictType.FULL_STATE_DICT")
    st = state(DistributedType.FSDP, world=int(launch.num_processes), mixed_precision="bf16", fsdp=plugin)
    assert check(training_args(tmp_path), SCHEDULE, st=st).kind == "fsdp"
