"""Freeze fields for ``HfArgumentParser``: a dataclass mixin and ``FreezeTrainingArguments``.

    parser = HfArgumentParser((ModelArguments, FreezeTrainingArguments))
    ... --freeze backbone --unfreeze epoch2:1@0.1,epoch4:2@0.01 --train_bn --layer_lr_decay 0.8
    ... --adapter lora --lora_r 8 --lora_alpha 16 --lora_dropout 0.0 --adapter_groups stage.2+stage.3
    trainer = FreezeTrainer(model=model, args=training_args, ...)   # picks the policy from the args
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from . import _fields
from .adapter_config import AdapterConfig
from .cache_safety import cache_dir_problem
from .checks import model_source_problem, policy_problems, schedule_problems, unknown_choice
from .distributed import every_process_runs_alone, saves_on_this_process
from .errors import FreezePolicyError
from .feature_cache import MODES
from .policy import FreezePolicy
from .prefix_cache import parse_size


def with_flags(*configs):
    """Class decorator (under ``@dataclass``): add a flag for every flag-carrying field of ``configs``, declared
    there once (:func:`hf_freeze._fields.declare`): its name, help and type come from the declaration."""

    def add(cls):
        flags = [flag for config in configs for flag in _fields.flag_fields(config)]
        own = dict(cls.__dict__.get("__annotations__", {}))
        cls.__annotations__ = {**{name: kind for name, kind, _ in flags}, **own}
        for name, _, spec in flags:
            setattr(cls, name, spec)
        return cls

    return add


#: flag name -> (config class, the field it sets)
POLICY_FLAGS = {flag: (FreezePolicy, name) for flag, name in _fields.flag_source(FreezePolicy).items()}
ADAPTER_FLAGS = {flag: (AdapterConfig, name) for flag, name in _fields.flag_source(AdapterConfig).items()}


def _given(value) -> bool:
    """A flag counts as given unless it holds its default (None, False for a switch, True for verify) or ''."""
    return value is not None and value != ""


@dataclass
@with_flags(FreezePolicy, AdapterConfig)
class FreezeArguments:
    """The freeze policy as command-line flags: one per field of :class:`~hf_freeze.FreezePolicy` and of its
    :class:`~hf_freeze.AdapterConfig` (``--lora_r`` etc.), named, typed and explained where the field is declared,
    plus the feature cache and ``--freeze_policy_file``."""

    feature_cache: str = field(default="auto", metadata={
        "help": "Linear-probe feature cache while everything below the head is frozen: 'auto' (use it where it "
                "provably gives the same training, in memory), 'memory' or 'disk' (force it; refuse with the reason "
                "where unsafe), 'off'."})
    feature_cache_dir: str | None = field(default=None, metadata={
        "help": "Folder of the on-disk feature cache (default: $HF_FREEZE_CACHE/features or ~/.cache/hf_freeze/features)."})
    feature_cache_max_memory: str | None = field(default=None, metadata={
        "help": "Most memory a frozen-prefix cache may take ('4GB', '512MiB', bytes; default: half the memory "
                "available when it is planned). Above it, 'auto' writes the cache to a memory-mapped file under "
                "--feature_cache_dir (deleted when dropped), 'memory' refuses it, 'disk' writes it anyway."})
    freeze_policy_file: str | None = field(default=None, metadata={
        "help": "Read the whole policy from a freeze_policy.json (file or folder) instead of the flags above."})

    def __post_init__(self):
        self.check_freeze_arguments()

    def check_freeze_arguments(self, num_train_epochs: float | None = None, max_steps: int | None = None) -> None:
        """Check every freeze flag that needs no model (raised by ``HfArgumentParser`` while parsing, before any
        model, data or folder is touched): values, group-name shapes, adapter method, feature-cache mode, and
        unfreeze events that would never fire within ``num_train_epochs``/``max_steps``. FreezePolicyError names
        each problem; what needs the model (does it have a ``stage.9``?) is checked by FreezeTrainer."""
        problems = []
        if self.feature_cache not in MODES:
            problems.append(unknown_choice("--feature_cache", self.feature_cache, MODES))
        elif self.feature_cache != "off" and cache_dir_problem(self.feature_cache_dir, "--feature_cache_dir"):
            problems.append(cache_dir_problem(self.feature_cache_dir, "--feature_cache_dir"))
        try:
            parse_size(self.feature_cache_max_memory)
        except FreezePolicyError as e:
            problems.append(str(e))
        if self.freeze_policy_file:
            given = [f"--{flag}" for flag in self.given_flags()]
            if given:
                problems.append(f"--freeze_policy_file sets the whole policy, so {', '.join(given)} would be ignored; "
                                "give either the file or the flags")
        try:
            policy = self.freeze_policy()
        except (FreezePolicyError, OSError, json.JSONDecodeError) as e:
            where = f"--freeze_policy_file {self.freeze_policy_file}: " if self.freeze_policy_file else ""
            problems.append(where + str(e))
        else:
            if policy is not None:
                problems += policy_problems(policy)
                problems += schedule_problems(policy, num_train_epochs, max_steps)
        if problems:
            raise FreezePolicyError("; ".join(problems))

    def given_flags(self) -> list[str]:
        """The policy and adapter flags given (not at their default)."""
        defaults = {f.name: f.default for f in fields(FreezeArguments)}
        return [flag for flag in (*POLICY_FLAGS, *ADAPTER_FLAGS)
                if _given(getattr(self, flag)) and getattr(self, flag) != defaults[flag]]

    def freeze_policy(self) -> FreezePolicy | None:
        """The FreezePolicy these arguments describe, or None when no freeze flag was given."""
        if self.freeze_policy_file:
            return FreezePolicy.from_pretrained(self.freeze_policy_file)
        adapter = self.adapter_config()
        given = [flag for flag in self.given_flags() if flag in POLICY_FLAGS]
        if not given and adapter is None:
            return None
        values = {name: _fields.parse_value(FreezePolicy, name, getattr(self, flag))
                  for flag, (_, name) in POLICY_FLAGS.items() if flag in given and name != "adapter"}
        return FreezePolicy(**values, adapter=adapter)

    def adapter_config(self) -> AdapterConfig | None:
        """The adapter the flags describe (``--adapter`` plus the ``--lora_*``/``--adapter_groups`` flags), or None."""
        flags = {name: getattr(self, flag) for flag, (_, name) in ADAPTER_FLAGS.items() if _given(getattr(self, flag))}
        if "groups" in flags:
            flags["groups"] = flags["groups"].replace(",", "+")  # on the command line ',' joins groups too
        if not self.adapter:
            if flags:
                names = {name: flag for flag, (_, name) in ADAPTER_FLAGS.items()}
                raise FreezePolicyError(f"{', '.join('--' + names[k] for k in flags)} given without --adapter "
                                        "(e.g. --adapter lora)")
            return None
        config = AdapterConfig.from_string(self.adapter)
        base = AdapterConfig.from_string(config.method)
        clash = [k for k in flags if getattr(config, k) != getattr(base, k)]
        if clash:
            raise FreezePolicyError(f"--adapter {self.adapter!r} already sets {clash}; give each value once")
        return AdapterConfig.from_dict({**config.to_dict(), **flags})


def policy_from_fields(args, params: dict) -> FreezePolicy | None:
    """The policy of ``args``' freeze fields with ``params`` (a trial's FreezeArguments values) put over them."""
    if not isinstance(args, FreezeArguments):
        return None
    values = {f.name: params.get(f.name, getattr(args, f.name)) for f in fields(FreezeArguments)}
    return FreezeArguments(**values).freeze_policy()


@dataclass
class DeltaArguments:
    """Save (and push) only the trained tensors plus a reference to the base model (see ``hf_freeze.delta``)."""

    save_delta: bool = field(default=False, metadata={
        "help": "Save checkpoints and the final model as a delta: only the tensors that were trained, the base model's "
                "id/revision and the fingerprint of the frozen tensors (reload with hf_freeze.from_pretrained)."})
    delta_base_model: str | None = field(default=None, metadata={
        "help": "Hub id (or folder) of the base model a delta refers to. Default: where the model was loaded from."})
    delta_base_revision: str | None = field(default=None, metadata={
        "help": "Revision (commit) of the base model. Default: the cached commit the model was loaded from, if known."})

    def check_delta_arguments(self) -> None:
        """``--delta_base_model`` must name something a delta can be applied to later: a saved model's folder or a
        Hub id (checked while parsing, before anything is trained: a delta pointing nowhere cannot be reloaded)."""
        problems = [f"--{flag} is empty: give a value or leave the flag out"
                    for flag in ("delta_base_model", "delta_base_revision") if getattr(self, flag) == ""]
        problem = model_source_problem(self.delta_base_model, tiny=False) if self.delta_base_model else None
        if problem:
            problems.append(f"--delta_base_model: {problem}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class FreezeTrainingArguments(TrainingArguments, FreezeArguments, DeltaArguments):
    """``TrainingArguments`` plus the freeze flags; ``average_tokens_across_devices`` defaults to False
    because image classifiers return a mean loss (the Trainer would otherwise scale it by the world size)."""

    average_tokens_across_devices: bool = field(default=False, metadata={
        "help": "Kept False for image classification: the model's loss is already a per-batch mean."})

    #: :func:`hf_freeze.distributed.check_backend` accepts DeepSpeed's every-process-alone set-up with these args
    saves_from_one_process = True

    def __post_init__(self):
        # the freeze flags first: a bad one fails while parsing, before TrainingArguments sets anything up
        self.check_freeze_arguments(self.num_train_epochs, self.max_steps)
        self.check_delta_arguments()
        super().__post_init__()

    @property
    def should_save(self) -> bool:
        """``TrainingArguments.should_save``; where DeepSpeed trains over processes the Trainer each runs as if
        alone (:func:`hf_freeze.distributed.every_process_runs_alone`: DeepSpeed without GPUs), only
        ``torch.distributed`` rank 0 (each node's local rank 0 with ``save_on_each_node``): else every process would
        write every checkpoint file into the same folder at once."""
        if not super().should_save:
            return False
        return not every_process_runs_alone(self) or saves_on_this_process(self)
