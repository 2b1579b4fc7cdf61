"""Run under torchrun --nproc_per_node 2 (gloo, DeepSpeed's CPU accelerator): who writes checkpoint files, and are
they complete, loadable and resumable, when accelerate sets up each DeepSpeed process as if it were alone
(tests/test_attack_deepspeed_saving.py). Writes OUT/<mode>_rank<R>.pt.

Modes (argv[2]):
  main   several attempts in one launch (A..F below); every file operation of rank 1 under OUT is recorded
         (audit hook + torch.save / safetensors wrappers), per attempt.
  crash  a 3-step run saving every step; at the step-2 save rank 1 writes half of its ZeRO optimizer states and dies
         (os._exit): torchrun then ends rank 0.
  resume after ``crash``: train(resume_from_checkpoint=True) in the crashed folder, and the same run uninterrupted.
"""

import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TinyImages, snapshot, tiny_model, training_args  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import hf_freeze  # noqa: E402

out = Path(sys.argv[1])
mode = sys.argv[2]
if not dist.is_initialized():
    dist.init_process_group("gloo")
rank = dist.get_rank()
DS = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
      "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
data = TinyImages(n=16, seed=3)
evaldata = TinyImages(n=8, seed=4)
rec = {"writes": {}}
PART = ["setup"]

# ------------------------------------------------------------------ rank 1's file operations under OUT
OUT_S = str(out.resolve())


def _note(kind, path):
    p = os.path.abspath(os.fsdecode(path)) if isinstance(path, (str, bytes, os.PathLike)) else None
    if p and p.startswith(OUT_S) and not p.endswith((f"{mode}_rank1.pt",)):
        rec["writes"].setdefault(PART[0], []).append((kind, os.path.relpath(p, OUT_S)))


def _audit(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        m, flags = args[1], args[2]
        writing = (isinstance(m, str) and any(c in m for c in "wax+")) or (
            m is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
        if writing:
            _note("open-w", args[0])
    elif event in ("os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.move"):
        _note(event, args[0])


if rank == 1 and mode == "main":
    sys.addaudithook(_audit)
    _tsave = torch.save

    def _save(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)):
            _note("torch.save", f)
        return _tsave(obj, f, *a, **k)

    torch.save = _save
    import safetensors.torch
    import transformers.modeling_utils as mu

    import hf_freeze.delta as hd

    def wrap(fn):
        def inner(tensors, filename, *a, **k):
            _note("safetensors", filename)
            return fn(tensors, filename, *a, **k)
        return inner

    mu.safe_save_file = wrap(mu.safe_save_file)
    hd.save_file = wrap(hd.save_file)
    safetensors.torch.save_file = wrap(safetensors.torch.save_file)


def attempt(name, fn):
    PART[0] = name
    try:
        rec[name] = ("ok", fn())
    except Exception as e:  # noqa: BLE001
        import traceback
        rec[name] = (type(e).__name__, str(e)[:600] + "\n" + traceback.format_exc()[-1500:])
    PART[0] = "between"
    torch.save(rec, out / f"{mode}_rank{rank}.pt")  # kept if a later part hangs
    dist.barrier()


def args(folder, **kw):
    kw.setdefault("per_device_train_batch_size", 4)
    return training_args(folder, deepspeed=DS, use_cpu=False, **kw)


def listing(folder):
    folder = Path(folder)
    if not folder.is_dir():
        return None
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def frozen_changed(model, base):
    state = hf_freeze.get_state(model)
    now = snapshot(model)
    return [n for n in state.frozen if n in base and not torch.equal(now[n].view(-1), base[n].view(-1))]


def base_folder():
    folder = out / "base"
    if rank == 0 and not folder.is_dir():
        tiny_model("resnet", seed=1).save_pretrained(folder)
    dist.barrier()
    return str(folder)


# A: FreezeTrainer, task head, save_delta, save_total_limit=1, then save_model() (delta) and save_model() again full;
#    reload both folders and the last checkpoint
def run_a():
    base_dir = base_folder()
    model = tiny_model("resnet", seed=1)
    base = snapshot(model)
    trainer = hf_freeze.FreezeTrainer(
        model=model, train_dataset=data, freeze_policy="freeze=backbone;head=mlp:8,relu",
        args=args(out / "a", max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=1, save_delta=True,
                  delta_base_model=base_dir))
    trainer.train()
    trainer.save_model()
    dist.barrier()
    final = snapshot(model)
    trainer.args.save_delta = False
    trainer.save_model(str(out / "a" / "full"))
    dist.barrier()
    res = {"checkpoints": sorted(p.name for p in (out / "a" / "out").iterdir() if p.name.startswith("checkpoint-")),
           "out_files": listing(out / "a" / "out"), "full_files": listing(out / "a" / "full"),
           "frozen_changed": frozen_changed(model, base), "final": final,
           "is_world_process_zero": trainer.is_world_process_zero(), "should_save": trainer.args.should_save}
    for key, folder in (("delta", out / "a" / "out"), ("full", out / "a" / "full"),
                        ("last_checkpoint", out / "a" / "out" / "checkpoint-3")):
        try:
            now = snapshot(hf_freeze.from_pretrained(str(folder)))
            res[key] = [n for n in final if n not in now or not torch.equal(now[n], final[n])]
        except Exception as e:  # noqa: BLE001
            res[key] = f"{type(e).__name__}: {str(e)[:400]}"
    return res


# G: evaluation (trainer.evaluate(), and eval during training, which load_best_model_at_end needs)
def run_g():
    def trainer(**kw):
        return hf_freeze.FreezeTrainer(model=tiny_model("resnet", seed=1), train_dataset=data, eval_dataset=evaldata,
                                       freeze_policy="backbone", args=args(out / "g", max_steps=2, **kw))
    res = {}
    try:
        res["evaluate"] = ("ok", trainer().evaluate())
    except Exception as e:  # noqa: BLE001
        res["evaluate"] = (type(e).__name__, str(e)[:300])
    t = None
    try:
        t = trainer(save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
                    load_best_model_at_end=True, save_total_limit=1)
        t.train()
        res["train"] = ("ok", t.state.best_model_checkpoint)
    except Exception as e:  # noqa: BLE001
        res["train"] = (type(e).__name__, str(e)[:300])
    res["step_reached"] = None if t is None else t.state.global_step
    return res


# B: plain Trainer + FreezeCallback + FreezeTrainingArguments, checkpoints every step
def run_b():
    model = tiny_model("resnet", seed=1)
    base = snapshot(model)
    try:
        trainer = Trainer(model=model, train_dataset=data, callbacks=[hf_freeze.FreezeCallback("backbone")],
                          args=args(out / "b", max_steps=2, save_strategy="steps", save_steps=1, save_total_limit=1))
    except hf_freeze.FreezePolicyError as e:  # refused up front (the Trainer would write rng_state.pth everywhere)
        return {"refusal": str(e), "frozen_changed": [n for n, t in snapshot(model).items() if not torch.equal(t, base[n])],
                "untouched": hf_freeze.get_state(model) is None and all(p.requires_grad for p in model.parameters()),
                "files": listing(out / "b" / "out") if (out / "b" / "out").exists() else []}
    trainer.train()
    dist.barrier()
    return {"files": listing(out / "b" / "out"), "frozen_changed": frozen_changed(model, base)}


# C: plain Trainer + FreezeCallback + plain TrainingArguments: refused like FreezeTrainer + plain TrainingArguments?
def run_c():
    model = tiny_model("resnet", seed=1)
    before = snapshot(model)
    plain = TrainingArguments(output_dir=str(out / "c" / "out"), max_steps=2, per_device_train_batch_size=4,
                              deepspeed=DS, use_cpu=False, report_to=[], save_strategy="steps", save_steps=1,
                              disable_tqdm=True)
    try:
        trainer = Trainer(model=model, args=plain, train_dataset=data, callbacks=[hf_freeze.FreezeCallback("backbone")])
    except hf_freeze.FreezePolicyError as e:
        return {"refusal": str(e), "untouched": hf_freeze.get_state(model) is None and all(
            torch.equal(t, before[n]) for n, t in snapshot(model).items())}
    # not refused: train (2 steps), which the README says every process would then save
    trainer.train()
    dist.barrier()
    return {"refusal": None, "files": listing(out / "c" / "out")}


# D: save_on_each_node (one node): rank 0 alone saves
def run_d():
    model = tiny_model("resnet", seed=1)
    trainer = hf_freeze.FreezeTrainer(model=model, train_dataset=data, freeze_policy="backbone",
                                      args=args(out / "d", max_steps=1, save_strategy="steps", save_steps=1,
                                                save_on_each_node=True))
    trainer.train()
    dist.barrier()
    return {"should_save": trainer.args.should_save, "files": listing(out / "d" / "out")}


# E: resume equals the uninterrupted run: full checkpoint by path (into another output dir), delta checkpoint by True
def run_e():
    def trainer(folder, steps=3, **kw):
        return hf_freeze.FreezeTrainer(model=tiny_model("resnet", seed=1), train_dataset=data, freeze_policy="backbone",
                                       args=args(folder, max_steps=steps, save_strategy="steps", save_steps=1, **kw))
    base = snapshot(tiny_model("resnet", seed=1))
    u = trainer(out / "eu")
    u.train()
    uninterrupted = snapshot(u.model)
    dist.barrier()
    res = {"uninterrupted": uninterrupted, "frozen_changed": frozen_changed(u.model, base),
           "files": listing(out / "eu" / "out" / "checkpoint-2")}
    r = trainer(out / "ep")
    r.train(resume_from_checkpoint=str(out / "eu" / "out" / "checkpoint-2"))
    res["path_diff"] = [n for n, t in snapshot(r.model).items() if not torch.equal(t, uninterrupted[n])]
    res["path_step"] = r.state.global_step
    dist.barrier()
    # delta checkpoints, resume_from_checkpoint=True after the last checkpoint was lost
    d = trainer(out / "ed", save_delta=True, delta_base_model=base_folder())
    d.train()
    res["delta_uninterrupted_diff"] = [n for n, t in snapshot(d.model).items() if not torch.equal(t, uninterrupted[n])]
    dist.barrier()
    if rank == 0:
        shutil.rmtree(out / "ed" / "out" / "checkpoint-3")
    dist.barrier()
    r = trainer(out / "ed", save_delta=True, delta_base_model=base_folder())
    r.train(resume_from_checkpoint=True)
    res["delta_true_diff"] = [n for n, t in snapshot(r.model).items() if not torch.equal(t, uninterrupted[n])]
    return res


# F: a checkpoint lacking the last rank's ZeRO optimizer states (lost file): resume_from_checkpoint=True must skip it
def run_f():
    src = out / "eu" / "out"
    dst = out / "f" / "out"
    if rank == 0:
        shutil.copytree(src, dst)
        shutil.rmtree(dst / "checkpoint-3")
        (dst / "checkpoint-2" / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    dist.barrier()
    from hf_freeze.checkpoints import checkpoint_problem
    problem = checkpoint_problem(dst / "checkpoint-2")
    e = torch.load(out / f"main_rank{rank}.pt", weights_only=False)["e"]
    uninterrupted = e[1]["uninterrupted"] if e[0] == "ok" else None
    r = hf_freeze.FreezeTrainer(model=tiny_model("resnet", seed=1), train_dataset=data, freeze_policy="backbone",
                                args=args(out / "f", max_steps=3, save_strategy="no"))
    r.train(resume_from_checkpoint=True)
    return {"problem": problem, "diff": None if uninterrupted is None else
            [n for n, t in snapshot(r.model).items() if not torch.equal(t, uninterrupted[n])]}


# H: the model card after training ("written on rank 0")
def run_h():
    t = hf_freeze.FreezeTrainer(model=tiny_model("resnet", seed=1), train_dataset=data, freeze_policy="backbone",
                                args=args(out / "h", max_steps=1, save_strategy="no"))
    t.train()
    t.create_model_card(plot=False)
    dist.barrier()
    return {"files": listing(out / "h" / "out")}


# ------------------------------------------------------------------ crash / resume
def crash_trainer(folder, steps=3):
    return hf_freeze.FreezeTrainer(model=tiny_model("resnet", seed=1), train_dataset=data, freeze_policy="backbone",
                                   args=args(folder, max_steps=steps, save_strategy="steps", save_steps=1))


def run_crash():
    t = crash_trainer(out / "crash")
    orig = t._save_optimizer_and_scheduler

    def save_opt(output_dir):
        if rank == 1 and output_dir.endswith("checkpoint-2"):
            import deepspeed.runtime.engine as eng
            real = eng.DeepSpeedEngine._save_zero_checkpoint

            def half(self, save_path, tag):
                real(self, save_path, tag)
                f = Path(save_path) / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
                b = f.read_bytes()
                f.write_bytes(b[:len(b) // 2])
                os._exit(9)
            eng.DeepSpeedEngine._save_zero_checkpoint = half
        return orig(output_dir)

    t._save_optimizer_and_scheduler = save_opt
    t.train()
    return {"finished": True}


def run_resume():
    u = crash_trainer(out / "uninterrupted")
    u.train()
    uninterrupted = snapshot(u.model)
    dist.barrier()
    before = listing(out / "crash" / "out")
    r = crash_trainer(out / "crash")
    import logging
    msgs = []

    class H(logging.Handler):
        def emit(self, record):
            msgs.append(record.getMessage())
    logging.getLogger("hf_freeze").addHandler(H())
    r.train(resume_from_checkpoint=True)
    return {"before": before, "diff": [n for n, t in snapshot(r.model).items() if not torch.equal(t, uninterrupted[n])],
            "step": r.state.global_step, "warnings": [m for m in msgs if "checkpoint-" in m]}


if mode == "main":
    parts = sys.argv[3:] or list("abcdegh")
    for p in parts:
        attempt(p, globals()[f"run_{p}"])
elif mode == "lost":  # rank 1 may fail alone here: it then exits, and torchrun ends rank 0
    try:
        rec["f"] = ("ok", run_f())
    except Exception as e:  # noqa: BLE001
        rec["f"] = (type(e).__name__, str(e)[:1500])
        torch.save(rec, out / f"{mode}_rank{rank}.pt")
        sys.stdout.flush()
        os._exit(3)
elif mode == "crash":
    attempt("crash", run_crash)
elif mode == "resume":
    attempt("resume", run_resume)
PART[0] = "end"
torch.save(rec, out / f"{mode}_rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
