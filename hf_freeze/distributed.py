"""What hf_freeze supports under each distributed backend, checked up front (never silently wrong).

* DDP (accelerate MULTI_CPU/MULTI_GPU): supported. Tensors that a schedule will unfreeze are trainable
  when DDP wraps the model (so the reducer registers them) and frozen right after; this needs
  ``find_unused_parameters=True`` (the Trainer's default for PreTrainedModel).
* FSDP2: supported (it re-reads ``requires_grad`` on every forward).
* FSDP1 with ``use_orig_params=False`` (accelerate's default): refused — a unit mixing frozen and
  trainable tensors fails to wrap, and toggling after the wrap misses the flat parameter.
* DeepSpeed: refused with an unfreeze schedule (unfreezing after ``deepspeed.initialize`` silently
  does nothing) and under ZeRO-3 (partitioned parameters cannot be fingerprinted); ZeRO 0-2 without a
  schedule is allowed.
"""

from __future__ import annotations

import json
import os

from .errors import FreezePolicyError


def _truthy(value) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def _fsdp_options(args) -> tuple[bool, int, bool]:
    """(enabled, version, use_orig_params) from TrainingArguments or accelerate launch's environment."""
    fsdp = getattr(args, "fsdp", None)
    config = getattr(args, "fsdp_config", None) or {}
    if isinstance(config, str):
        config = json.loads(open(config).read()) if os.path.isfile(config) else {}
    enabled = bool(fsdp) or _truthy(os.environ.get("ACCELERATE_USE_FSDP", "false"))
    version = int(config.get("version", config.get("fsdp_version", os.environ.get("FSDP_VERSION", 1))))
    orig = config.get("use_orig_params", config.get("fsdp_use_orig_params", os.environ.get("FSDP_USE_ORIG_PARAMS", "false")))
    return enabled, version, _truthy(orig)


def _deepspeed_stage(args) -> int | None:
    ds = getattr(args, "deepspeed", None)
    if ds is None and not _truthy(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")):
        return None
    config = ds
    if isinstance(ds, str) and os.path.isfile(ds):
        config = json.loads(open(ds).read())
    if isinstance(config, dict):
        return int(config.get("zero_optimization", {}).get("stage", 0))
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 0))


def check_backend(args, policy) -> None:
    """Raise FreezePolicyError if ``policy`` cannot be honoured under the configured backend."""
    enabled, version, orig = _fsdp_options(args)
    if enabled and version == 1 and not orig:
        raise FreezePolicyError(
            "FSDP1 with use_orig_params=False cannot mix frozen and trainable tensors in one unit (it fails to "
            "wrap, or misses later unfreezing). Use FSDP2 (fsdp_config={'version': 2}) or set "
            "fsdp_config={'use_orig_params': True}.")
    stage = _deepspeed_stage(args)
    if stage is not None:
        if policy.unfreeze:
            raise FreezePolicyError(
                "DeepSpeed ignores tensors unfrozen after deepspeed.initialize, so the unfreeze schedule "
                f"{[u.to_string() for u in policy.unfreeze]} would silently train nothing. Use DDP or FSDP2 for "
                "gradual unfreezing, or drop the schedule.")
        if stage >= 3:
            raise FreezePolicyError("DeepSpeed ZeRO-3 partitions parameters, so frozen tensors cannot be verified "
                                    "bit-for-bit; use ZeRO-2 (or DDP/FSDP2) with hf_freeze.")
    if policy.unfreeze and getattr(args, "world_size", 1) > 1 and getattr(args, "ddp_find_unused_parameters", None) is False:
        raise FreezePolicyError(
            "ddp_find_unused_parameters=False with an unfreeze schedule: DDP would wait forever for gradients of "
            "the still-frozen groups. Leave it unset (the Trainer then uses True) or set it to True.")
