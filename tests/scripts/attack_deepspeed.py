"""Run under torchrun --nproc_per_node 2 (gloo, DeepSpeed's CPU accelerator): DeepSpeed configurations that must be
honoured or refused before training (tests/test_attack_scaling.py). Writes OUT/rank<R>.pt.

A. ZeRO-2, no schedule, ``layer_lr_decay`` (per-group learning rates), with the DeepSpeed config's own
   ``optimizer`` section (as in tests/scripts/deepspeed_train.py): refused when FreezeTrainer is built? Then the same
   without that section: which learning rates does the engine use?
B. (not run by the tests; ``attack_deepspeed.py OUT b``) ZeRO-2 with DeepSpeed's bf16 mode spelled with its
   backward-compatible key ``"bfloat16"`` on a float32 model: the frozen weights stayed float32 (checked by hand).
C. ``FreezeTrainer.train(resume_from_checkpoint=True)`` after a ZeRO-2 run saved checkpoints.

On CPU accelerate sets up each process as if it were alone (``args.world_size`` 1, ``process_index`` 0 on both
ranks): A also records that ``FreezeTrainingArguments.should_save`` is True on rank 0 only, and that plain
``TrainingArguments`` (every process would write every checkpoint file) are refused.

Usage: attack_deepspeed.py OUT [a] [b] [c] (default: a c).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TinyImages, snapshot, tiny_model, training_args  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

import hf_freeze  # noqa: E402

out = Path(sys.argv[1])
DS = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
      "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
      "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}}
data = TinyImages(n=16, seed=3)
rec = {}


class Record(TrainerCallback):
    def __init__(self):
        self.lrs = None

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.lrs is None:
            opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer
            self.lrs = sorted({round(g["lr"], 8) for g in opt.param_groups})


def attempt(name, fn):
    try:
        rec[name] = ("ok", fn())
    except Exception as e:  # noqa: BLE001
        rec[name] = (type(e).__name__, str(e)[:500])


# A: per-group learning rates under DeepSpeed's own optimizer (refused up front), then without that section (the
# alternative the refusal names: the Trainer builds hf_freeze's optimizer and DeepSpeed wraps it)
def run_a():
    def build(ds, model, callbacks=None):
        return hf_freeze.FreezeTrainer(
            model=model, args=training_args(out / "a", max_steps=1, per_device_train_batch_size=4, deepspeed=ds,
                                            use_cpu=False, lr_scheduler_type="constant", learning_rate=0.05),
            train_dataset=data, freeze_policy="freeze=stem;layer_lr_decay=0.5", callbacks=callbacks)

    untouched = tiny_model("resnet", seed=1)
    before = snapshot(untouched)
    try:
        build(DS, untouched)
        refusal = None
    except hf_freeze.FreezePolicyError as e:
        refusal = str(e)
    refused_untouched = hf_freeze.get_state(untouched) is None and all(p.requires_grad for p in untouched.parameters()) \
        and all(torch.equal(t, before[n]) for n, t in snapshot(untouched).items())
    # plain TrainingArguments: every process would save (each counts as the main one): refused, model untouched
    plain_model = tiny_model("resnet", seed=1)
    plain_before = snapshot(plain_model)
    plain = TrainingArguments(output_dir=str(out / "a_plain"), max_steps=1, per_device_train_batch_size=4,
                              deepspeed={k: v for k, v in DS.items() if k != "optimizer"}, use_cpu=False, report_to=[],
                              save_strategy="no")
    try:
        hf_freeze.FreezeTrainer(model=plain_model, args=plain, train_dataset=data, freeze_policy="freeze=stem")
        plain_refusal = None
    except hf_freeze.FreezePolicyError as e:
        plain_refusal = str(e)
    plain_untouched = hf_freeze.get_state(plain_model) is None and all(p.requires_grad for p in plain_model.parameters()) \
        and all(torch.equal(t, plain_before[n]) for n, t in snapshot(plain_model).items())
    model = tiny_model("resnet", seed=1)
    base = snapshot(model)
    cb = Record()
    trainer = build({k: v for k, v in DS.items() if k != "optimizer"}, model, [cb])
    state = hf_freeze.get_state(model)
    expected = sorted({round(0.05 * state.group_lr_scale(g), 8) for g in state.groups.names if g != "stem"})
    trainer.train()
    now = snapshot(model)
    stem = [n for n in base if n.startswith("resnet.embedder.")]
    return {"refusal": refusal, "refused_untouched": refused_untouched, "expected": expected, "engine": cb.lrs,
            "plain_refusal": plain_refusal, "plain_untouched": plain_untouched,
            "alone": hf_freeze.distributed.every_process_runs_alone(trainer.args), "args_world": trainer.args.world_size,
            "should_save": trainer.args.should_save,
            "deepspeed": trainer.is_deepspeed_enabled,
            "stem_changed": [n for n in stem if not torch.equal(now[n], base[n])],
            "stage0_moved": any(n.startswith("resnet.encoder.stages.0.") and not torch.equal(now[n], base[n]) for n in base)}


# B: DeepSpeed's bf16 mode under its other key
def run_b():
    model = tiny_model("resnet", seed=1)
    base = snapshot(model)
    ds = {**DS, "bfloat16": {"enabled": True}}
    trainer = hf_freeze.FreezeTrainer(model=model, args=training_args(
        out / "b", max_steps=1, per_device_train_batch_size=4, deepspeed=ds, use_cpu=False),
        train_dataset=data, freeze_policy="backbone")
    rec["b_built"] = True
    try:
        trainer.train()
        outcome = None
    except Exception as e:  # noqa: BLE001
        outcome = f"{type(e).__name__}: {str(e)[:300]}"
    frozen = hf_freeze.get_state(model).frozen
    now = dict(model.named_parameters())
    return {"train": outcome, "frozen_dtypes": sorted({str(now[n].dtype) for n in frozen}),
            "base_dtype": str(base[sorted(frozen)[0]].dtype)}


# C: resume_from_checkpoint=True from the checkpoints a ZeRO-2 run wrote
def run_c():
    def trainer(steps):
        return hf_freeze.FreezeTrainer(
            model=tiny_model("resnet", seed=1), train_dataset=data, freeze_policy="backbone",
            args=training_args(out / "c", max_steps=steps, per_device_train_batch_size=4, deepspeed=DS, use_cpu=False,
                               save_strategy="steps", save_steps=1))
    trainer(2).train()
    dist.barrier()
    files = sorted(p.name for p in (out / "c" / "out" / "checkpoint-2").iterdir())
    resumed = trainer(3)
    try:
        resumed.train(resume_from_checkpoint=True)
        outcome = None
    except Exception as e:  # noqa: BLE001
        outcome = f"{type(e).__name__}: {str(e)[:400]}"
    return {"files": files, "resume": outcome, "global_step": resumed.state.global_step}


parts = sys.argv[2:] or ["a", "c"]
if "a" in parts:
    attempt("a", run_a)
if "b" in parts:
    attempt("b", run_b)
if "c" in parts:
    attempt("c", run_c)
torch.save(rec, out / f"rank{dist.get_rank()}.pt")
dist.barrier()
dist.destroy_process_group()
