"""What hf_freeze supports under each distributed backend, decided up front from the configuration that will run.

The backend is read from what is in effect, never from environment variables: accelerate's
``AcceleratorState`` (the Trainer creates its Accelerator before ``on_init_end``; accelerate turns FSDP and
DeepSpeed on only where they really run, e.g. ``fsdp=...`` on CPU falls back to DDP), else the processed
``TrainingArguments`` (``fsdp_plugin_args``, ``deepspeed_plugin``). The arguments DDP gets are the Trainer's
(``find_unused_parameters``, ``static_graph``), worked out by :func:`ddp_options` exactly as
``Trainer._build_accelerator_args`` does (``tests/test_distributed.py`` compares them with a real Trainer's).

* DDP: supported. Groups a schedule will unfreeze are trainable when DDP wraps the model (so the reducer
  registers them) and frozen right after, which needs ``find_unused_parameters=True``. Refused with a schedule
  (each fails mid-run): ``ddp_find_unused_parameters=False``; activation (gradient) checkpointing without an
  explicit ``ddp_find_unused_parameters=True`` (the Trainer would pass False) or with ``use_reentrant=True``;
  ``ddp_static_graph=True`` (each unfreeze changes which parameters get gradients). Checkpointing with
  ``ddp_find_unused_parameters=True`` and a schedule runs in 2 processes (``tests/test_distributed.py``).
* FSDP2 (the Trainer's default FSDP version): supported. It re-reads ``requires_grad`` on every forward; the
  fingerprint is split-independent, so frozen tensors are verified shard by shard (:mod:`hf_freeze.fingerprint`).
* FSDP1 (deprecated by transformers): refused with ``use_orig_params=False`` (accelerate's own default: a unit
  mixing frozen and trainable tensors fails to wrap, and toggling after the wrap misses the flat parameter), and
  with verification on (its parameters are flattened slices of each rank's shard: nothing to compare with the
  fingerprint; FSDP1 does not run on CPU, so this was never exercised). ``use_orig_params=True`` with
  ``verify=False`` is let through unverified.
* DeepSpeed ZeRO 0-2: supported without a schedule (2 CPU processes through the Trainer:
  ``tests/test_deepspeed.py``). Refused: an unfreeze schedule (tensors unfrozen after ``deepspeed.initialize``
  silently do not train), ZeRO-3 (parameters are partitioned outside torch's view: nothing to verify), and
  DeepSpeed's bf16/fp16 modes when the model is not already in that dtype (the engine casts every parameter,
  frozen ones included) or when its ``data_types`` (``buffer_dtype``, ``keep_in_fp32_modules``) would cast a
  buffer, and per-group learning rates (``layer_lr_decay``) with an ``optimizer`` or ``scheduler`` section in the
  DeepSpeed config (DeepSpeed's own optimizer has one learning rate, its schedulers give every group the same one;
  without those sections the Trainer builds hf_freeze's optimizer and scheduler and DeepSpeed wraps them).
  DeepSpeed on a machine without GPUs (its CPU accelerator): accelerate then sets up each of the N
  ``torch.distributed`` processes as if it were alone (``TrainingArguments.world_size`` 1, ``process_index`` 0 on
  every rank), while the DeepSpeed engine trains one model over all of them, so every process would write every
  checkpoint file into the same folder at once (a file read by one process while another rewrote it failed that
  process's save, and the other then waited forever in DeepSpeed's next barrier). ``FreezeTrainingArguments.should_save``
  lets only ``torch.distributed`` rank 0 (the node's local rank 0 with ``save_on_each_node``) write
  (:func:`every_process_runs_alone`); other ``TrainingArguments`` classes are refused in that set-up, and so are a
  plain ``Trainer`` + ``FreezeCallback`` that saves checkpoints (``rng_state.pth`` from every process; FreezeTrainer
  writes it from rank 0) and evaluation during training (accelerate gathers for one process: gloo fails). In 2
  processes: ``tests/test_attack_deepspeed_saving.py``.
* Tensors on the meta device (weights offloaded by ``device_map``) are refused when verification is on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState
from accelerate.utils import FullyShardedDataParallelPlugin
from transformers import PreTrainedModel

from .errors import FreezePolicyError
from .fingerprint import meta_tensors, refuse_meta
from .groups import layer_groups
from .names import named_base_parameters, unwrap_model
from .plan import resolve


@dataclass(frozen=True)
class Backend:
    """The distributed set-up that will run, as far as freezing is concerned."""

    kind: str = "none"  # "none", "ddp", "fsdp" or "deepspeed"
    world_size: int = 1
    fsdp_version: int | None = None
    use_orig_params: bool | None = None
    cpu_ram_efficient_loading: bool = False
    zero_stage: int | None = None
    deepspeed_dtype: str | None = None  # "bf16" / "fp16" when DeepSpeed casts the model
    deepspeed_cast_buffers: tuple[str, ...] = ()  # buffers DeepSpeed's bf16/fp16 mode casts (data_types settings)
    deepspeed_own: tuple[str, ...] = ()  # "optimizer" / "scheduler": sections of the DeepSpeed config (its own)
    find_unused_parameters: bool | None = None
    static_graph: bool = False
    activation_checkpointing: bool = False
    mixed_precision: str = "no"  # accelerate's: "no", "bf16", "fp16"
    every_process_alone: bool = False  # DeepSpeed over N processes that the Trainer each runs as if alone


def every_process_runs_alone(args) -> bool:
    """DeepSpeed trains one model over ``torch.distributed``'s N processes while the Trainer runs each as if it were
    alone (``args.world_size`` 1): what accelerate sets up where it finds no GPU (its ``_prepare_backend`` picks
    gloo only with ``cpu=True``, which turns DeepSpeed off). Every process then counts as the main one."""
    return (bool(getattr(args, "deepspeed", None)) and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > int(getattr(args, "world_size", 1) or 1))


def saves_on_this_process(args) -> bool:
    """Whether this process writes checkpoint files when :func:`every_process_runs_alone`: ``torch.distributed``
    rank 0, or each node's local rank 0 with ``save_on_each_node`` (what ``should_save`` gives where accelerate
    counts the processes)."""
    return local_rank() == 0 if getattr(args, "save_on_each_node", False) else dist.get_rank() == 0


def local_rank() -> int:
    """This process's rank on its node (torchrun's ``LOCAL_RANK``; the global rank without it)."""
    return int(os.environ.get("LOCAL_RANK", dist.get_rank()))


def _accelerator_state():
    """accelerate's AcceleratorState if an Accelerator exists in this process, else None (never creates one)."""
    return AcceleratorState() if AcceleratorState._shared_state else None


def _activation_checkpointing(args, model) -> bool:
    on_model = bool(getattr(model, "is_activation_checkpointing", False)) if model is not None else False
    return on_model or bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))


def _reentrant(args) -> bool:
    kwargs = (getattr(args, "activation_checkpointing_kwargs", None) or getattr(args, "gradient_checkpointing_kwargs", None)
              or {})
    return bool(kwargs.get("use_reentrant", False))


def ddp_options(args, model) -> tuple[bool, bool]:
    """(find_unused_parameters, static_graph) the Trainer gives DDP (``Trainer._build_accelerator_args``)."""
    explicit = getattr(args, "ddp_find_unused_parameters", None)
    if explicit is not None:
        find_unused = bool(explicit)
    elif isinstance(unwrap_model(model) if model is not None else None, PreTrainedModel):
        find_unused = not _activation_checkpointing(args, unwrap_model(model))
    else:
        find_unused = True
    return find_unused, bool(getattr(args, "ddp_static_graph", None))


def _deepspeed_mode(config: dict) -> str | None:
    """DeepSpeed's "bf16" / "fp16" mode as its engine reads the config ("bf16", else the older key "bfloat16")."""
    bf16 = config["bf16"] if config.get("bf16") is not None else config.get("bfloat16")
    for mode, section in (("bf16", bf16), ("fp16", config.get("fp16"))):
        if str((section or {}).get("enabled", False)).lower() == "true":
            return mode
    return None


def _deepspeed_dtype(plugin, model) -> str | None:
    mode = _deepspeed_mode(getattr(plugin, "deepspeed_config", None) or {})
    if mode is None:
        return None
    dtype = "bfloat16" if mode == "bf16" else "float16"
    params = list(model.parameters()) if model is not None else []
    return None if params and all(str(p.dtype) == f"torch.{dtype}" for p in params) else mode


def _deepspeed_cast_buffers(plugin, model) -> tuple[str, ...]:
    """Buffers the DeepSpeed engine's bf16/fp16 mode would cast when it wraps ``model``: every floating buffer not of
    ``data_types.buffer_dtype`` when that is set, and the lower-precision buffers ``data_types.keep_in_fp32_modules``
    selects (upcast to fp32). Read with DeepSpeed's own helpers (``DeepSpeedEngine._cast_module_mixed_precision``)."""
    config = getattr(plugin, "deepspeed_config", None) or {}
    mode = _deepspeed_mode(config)
    if mode is None or model is None:
        return ()
    # optional package (the deepspeed extra): installed wherever its plugin is in effect
    from deepspeed.runtime.config import DtypeEnum
    from deepspeed.runtime.engine import CASTABLE_DTYPES
    from deepspeed.runtime.keep_in_fp32 import buffers_to_keep_in_fp32, keep_in_fp32_pattern

    model = unwrap_model(model)
    data_types = config.get("data_types") or {}
    pattern = keep_in_fp32_pattern(model, data_types.get("keep_in_fp32_modules", "auto"),
                                   torch.bfloat16 if mode == "bf16" else torch.float16)
    kept = {id(b) for b in buffers_to_keep_in_fp32(model, pattern)} if pattern is not None else set()
    target = DtypeEnum(data_types["buffer_dtype"]).value if data_types.get("buffer_dtype") is not None else None
    cast = []
    for name, b in model.named_buffers():
        if id(b) in kept:
            if b.dtype != torch.float32:
                cast.append(name)
        elif target is not None and b.dtype in CASTABLE_DTYPES and b.dtype != target:
            cast.append(name)
    return tuple(cast)


def effective_backend(args=None, model=None, state=None) -> Backend:
    """The backend that will run: from ``state`` (an ``AcceleratorState``; default: the live one), else ``args``."""
    state = state if state is not None else _accelerator_state()
    ckpt = _activation_checkpointing(args, model)
    if state is not None:
        kind = str(getattr(state.distributed_type, "value", state.distributed_type)).upper()
        world = int(getattr(state, "num_processes", 1) or 1)
        fsdp = getattr(state, "fsdp_plugin", None) if kind == "FSDP" else None
        ds = getattr(state, "deepspeed_plugin", None) if kind == "DEEPSPEED" else None
        precision = str(getattr(state, "mixed_precision", "no"))
    else:
        world = int(getattr(args, "world_size", 1) or 1)
        plugin_args = getattr(args, "fsdp_plugin_args", None)
        if plugin_args is not None and world > 1:
            fsdp = FullyShardedDataParallelPlugin(**plugin_args)
        else:
            fsdp = None
        ds = getattr(args, "deepspeed_plugin", None)
        kind = "FSDP" if fsdp is not None else "DEEPSPEED" if ds is not None else "MULTI" if world > 1 else "NO"
        precision = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "no"
    if fsdp is not None:
        return Backend("fsdp", world, fsdp_version=int(getattr(fsdp, "fsdp_version", 1) or 1),
                       use_orig_params=getattr(fsdp, "use_orig_params", None),
                       cpu_ram_efficient_loading=bool(getattr(fsdp, "cpu_ram_efficient_loading", False)),
                       activation_checkpointing=ckpt, mixed_precision=precision)
    if ds is not None:
        return Backend("deepspeed", world, every_process_alone=every_process_runs_alone(args),
                       zero_stage=int(getattr(ds, "zero_stage", 0) or 0),
                       deepspeed_dtype=_deepspeed_dtype(ds, model),
                       deepspeed_cast_buffers=_deepspeed_cast_buffers(ds, model),
                       deepspeed_own=tuple(k for k in ("optimizer", "scheduler")
                                           if k in (getattr(ds, "deepspeed_config", None) or {})),
                       activation_checkpointing=ckpt)
    if world > 1:
        find_unused, static = ddp_options(args, model)
        return Backend("ddp", world, find_unused_parameters=find_unused, static_graph=static,
                       activation_checkpointing=ckpt)
    return Backend("none", world, activation_checkpointing=ckpt)


def check_backend(args, policy, model=None, *, backend: Backend | None = None, plain_trainer: bool = False) -> Backend:
    """Raise FreezePolicyError if ``policy`` cannot be honoured under the backend that will run; return it.
    ``plain_trainer``: a ``transformers.Trainer`` with :class:`~hf_freeze.FreezeCallback` (not FreezeTrainer)."""
    backend = backend or effective_backend(args, model)
    if backend.every_process_alone:
        _check_every_process_alone(args, plain_trainer)
    schedule = [u.to_string() for u in policy.unfreeze]
    if backend.kind == "fsdp" and backend.fsdp_version == 1 and not backend.use_orig_params:
        raise FreezePolicyError(
            "FSDP1 with use_orig_params=False cannot mix frozen and trainable tensors in one unit (it fails to wrap, "
            "or silently misses later unfreezing). Use FSDP2 (fsdp_config={'version': 2}, the Trainer's default).")
    if backend.kind == "fsdp" and backend.fsdp_version == 1 and getattr(policy, "verify", True):
        raise FreezePolicyError(
            "FSDP1 keeps each parameter as a flattened slice of its rank's shard, which hf_freeze cannot verify "
            "against the fingerprint (and transformers removes FSDP1 in v5.20). Use FSDP2 (fsdp_config={'version': 2}, "
            "the Trainer's default), or turn verification off (verify_frozen=False) to keep FSDP1 with "
            "use_orig_params=True.")
    if backend.kind == "fsdp" and backend.fsdp_version == 2 and backend.mixed_precision != "no" and schedule:
        low = _low_precision_later(model, policy)
        if low:
            raise FreezePolicyError(
                f"accelerate's FSDP2 with mixed_precision={backend.mixed_precision!r} upcasts every trainable parameter "
                f"that is not float32 to float32 when it shards the model, and the groups the schedule {schedule} will "
                f"unfreeze are trainable at that moment: their frozen weights ({', '.join(low[:3])}, ...) would change "
                "dtype. Load the model in float32 (mixed precision still computes in "
                f"{backend.mixed_precision}), or drop the schedule.")
    if backend.kind == "deepspeed":
        if schedule:
            raise FreezePolicyError(
                f"DeepSpeed ignores tensors unfrozen after deepspeed.initialize, so the unfreeze schedule {schedule} "
                "would silently train nothing. Use DDP or FSDP2 for gradual unfreezing, or drop the schedule.")
        if backend.zero_stage >= 3:
            raise FreezePolicyError("DeepSpeed ZeRO-3 partitions parameters outside torch's view, so frozen tensors "
                                    "cannot be verified bit-for-bit; use ZeRO-2 (or DDP/FSDP2) with hf_freeze.")
        if backend.deepspeed_dtype:
            raise FreezePolicyError(
                f"DeepSpeed's {backend.deepspeed_dtype} mode casts every parameter of the model, frozen ones included, "
                f"so the frozen weights would not stay bit-identical. Load the model in that dtype (dtype=torch."
                f"{'bfloat16' if backend.deepspeed_dtype == 'bf16' else 'float16'}) before training, or run DeepSpeed in "
                "fp32, or use DDP/FSDP2 with bf16 autocast.")
        if backend.deepspeed_cast_buffers:
            cast = backend.deepspeed_cast_buffers
            raise FreezePolicyError(
                f"DeepSpeed's bf16/fp16 mode would cast {len(cast)} buffer(s) of the model ({', '.join(cast[:3])}"
                f"{', ...' if len(cast) > 3 else ''}) to another dtype because of the config's data_types "
                "(buffer_dtype / keep_in_fp32_modules), frozen BatchNorm statistics included, so they would not stay "
                "bit-identical. Remove data_types.buffer_dtype (buffers then keep their dtype) and set "
                "data_types.keep_in_fp32_modules=[] or load those buffers in float32, or run DeepSpeed in fp32.")
        if backend.deepspeed_own and policy.needs_param_groups:
            own = " and ".join(f"'{k}'" for k in backend.deepspeed_own)
            raise FreezePolicyError(
                f"the DeepSpeed config has its own {own} section(s): DeepSpeed's optimizer is built over all trainable "
                "parameters at one learning rate, and its scheduler gives every parameter group the same one, so the "
                f"per-group learning rates of policy {policy.to_string()!r} (layer_lr_decay / lr_scale) would be "
                f"silently dropped. Remove the {own} section(s) from the DeepSpeed config (the Trainer then builds the "
                "optimizer with hf_freeze's per-group learning rates and its scheduler, and DeepSpeed wraps them), or "
                "drop layer_lr_decay.")
    if backend.kind == "ddp" and schedule:
        if backend.static_graph:
            raise FreezePolicyError(
                f"ddp_static_graph=True with the unfreeze schedule {schedule}: a static graph assumes the same "
                "parameters get gradients every step, and each unfreeze changes that (DDP fails mid-run). Leave "
                "ddp_static_graph unset, or drop the schedule.")
        if not backend.find_unused_parameters:
            if backend.activation_checkpointing and getattr(args, "ddp_find_unused_parameters", None) is None:
                raise FreezePolicyError(
                    "activation (gradient) checkpointing is on, so the Trainer passes find_unused_parameters=False to "
                    f"DDP, and with the unfreeze schedule {schedule} DDP would wait for gradients of the still-frozen "
                    "groups and fail mid-run. Set ddp_find_unused_parameters=True (checkpointing and the schedule then "
                    "work together), or drop the schedule.")
            raise FreezePolicyError(
                f"ddp_find_unused_parameters=False with the unfreeze schedule {schedule}: DDP would wait for gradients "
                "of the still-frozen groups and fail mid-run. Leave it unset (the Trainer then uses True) or set it "
                "to True, or drop the schedule.")
        if backend.activation_checkpointing and _reentrant(args):
            raise FreezePolicyError(
                f"reentrant activation checkpointing (use_reentrant=True) with the unfreeze schedule {schedule} under "
                "DDP: reentrant checkpointing does not support DDP's find_unused_parameters=True, which the schedule "
                "needs. Use the default non-reentrant checkpointing (drop use_reentrant), or drop the schedule.")
    if model is not None and getattr(policy, "verify", True):
        _check_verifiable(model, backend)
    return backend


def _check_every_process_alone(args, plain_trainer: bool) -> None:
    """DeepSpeed over N processes the Trainer each runs as if alone (:func:`every_process_runs_alone`): what works
    is saving from rank 0 (FreezeTrainingArguments + FreezeTrainer); refused up front, each with the reason: every
    process writing every checkpoint file, and evaluation during training."""
    where = (f"DeepSpeed runs over {dist.get_world_size()} torch.distributed processes, but accelerate found no GPU "
             f"and set up each of them as if it were alone ({type(args).__name__}.world_size is "
             f"{getattr(args, 'world_size', 1)}, process_index 0 on every rank)")
    if not getattr(type(args), "saves_from_one_process", False):
        raise FreezePolicyError(
            f"{where}, so every process would write every checkpoint file into the same folder at once (a read of one "
            "while another rewrites it fails one process and leaves the others waiting in DeepSpeed's next barrier). "
            "Use hf_freeze.FreezeTrainingArguments (or a subclass): its should_save lets only torch.distributed rank 0 "
            "write. Or run DeepSpeed on GPUs, or drop DeepSpeed (use_cpu=True runs DDP over gloo).")
    if plain_trainer and _strategy(args, "save_strategy") != "no":
        raise FreezePolicyError(
            f"{where}, so a plain transformers.Trainer writes each checkpoint's rng_state.pth from every process at "
            "once. Use hf_freeze.FreezeTrainer (it writes it from torch.distributed rank 0), or save_strategy='no'.")
    if _strategy(args, "eval_strategy") != "no":
        raise FreezePolicyError(
            f"{where}: evaluation during training (eval_strategy={_strategy(args, 'eval_strategy')!r}, which "
            "load_best_model_at_end needs) gathers predictions for 1 process while gloo has "
            f"{dist.get_world_size()}, and fails at the first evaluation. Set eval_strategy='no' and evaluate in one "
            "process after training, or run DeepSpeed on GPUs, or drop DeepSpeed (use_cpu=True runs DDP over gloo).")


def _strategy(args, name: str) -> str:
    value = getattr(args, name, "no")
    return str(getattr(value, "value", value) or "no")


def _low_precision_later(model, policy) -> list[str]:
    """Parameters of groups the schedule unfreezes that are not float32."""
    if model is None:
        return []
    groups = layer_groups(model)
    later = {n for e in resolve(policy, groups).events for g in e.groups for n in groups[g].param_names}
    return sorted(n for n, p in named_base_parameters(model) if n in later and p.is_floating_point()
                  and str(p.dtype) != "torch.float32")


def check_model_data(model, policy, args=None) -> None:
    """Before a Trainer touches the model: refuse frozen tensors without data (meta / offloaded) when verifying."""
    plugin_args = getattr(args, "fsdp_plugin_args", None) or {}
    if model is not None and getattr(policy, "verify", True) and not plugin_args.get("cpu_ram_efficient_loading"):
        _check_verifiable(model, Backend())


def _check_verifiable(model, backend: Backend) -> None:
    """Frozen tensors on the meta device cannot be verified (offloaded by device_map, or never loaded)."""
    if backend.kind == "fsdp" and backend.cpu_ram_efficient_loading:
        return  # ranks > 0 hold meta weights until accelerate loads rank 0's; verification compares with rank 0's
    refuse_meta(meta_tensors(model), "train with verification of")
