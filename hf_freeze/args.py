"""Freeze fields for ``HfArgumentParser``: a dataclass mixin and ``FreezeTrainingArguments``.

    parser = HfArgumentParser((ModelArguments, FreezeTrainingArguments))
    ... --freeze backbone --unfreeze epoch2:1@0.1,epoch4:2@0.01 --train_bn --layer_lr_decay 0.8
    ... --adapter lora --lora_r 8 --lora_alpha 16 --lora_dropout 0.0 --adapter_groups stage.2+stage.3
    trainer = FreezeTrainer(model=model, args=training_args, ...)   # picks the policy from the args
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .adapters import AdapterConfig
from .checks import policy_problems, schedule_problems, unknown_choice
from .errors import FreezePolicyError
from .policy import FreezePolicy, Unfreeze


@dataclass
class FreezeArguments:
    """The freeze policy as command-line flags (see ``hf_freeze.policy`` for the value syntax)."""

    freeze: str | None = field(default=None, metadata={
        "help": "What to freeze: 'backbone' (all but the head), 'none', N (the first N groups), or comma-separated "
                "group names, ranges ('stem:stage.2') and parameter globs ('*.bn*'). See `hf-freeze inspect MODEL`. "
                "Default: the policy recorded in the model's config, else 'backbone'."})
    unfreeze: str | None = field(default=None, metadata={
        "help": "Unfreeze schedule: comma-separated 'epochE:GROUPS[@LR_SCALE]' or 'stepS:GROUPS[@LR_SCALE]'; GROUPS "
                "is N (next N frozen groups nearest the head) or names joined by '+'. Example: epoch2:1@0.1,epoch4:2@0.01"})
    train_bn: bool = field(default=False, metadata={
        "help": "Let BatchNorm layers in frozen groups update their statistics (default: they stay in inference mode)."})
    unfreeze_bn: bool = field(default=False, metadata={
        "help": "Let BatchNorm layers of groups unfrozen by the schedule use batch statistics again (default: they stay "
                "in inference mode and keep their pretrained statistics; their weights still train)."})
    layer_lr_decay: float | None = field(default=None, metadata={
        "help": "Layer-wise LR decay in (0, 1]: each group nearer the input gets this factor once more (head at the base LR)."})
    verify_frozen: bool = field(default=True, metadata={
        "help": "Check on every save and at the end that frozen tensors are bit-identical (FrozenWeightsChanged if not)."})
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
    adapter: str | None = field(default=None, metadata={
        "help": "Train a PEFT adapter on the frozen groups instead of unfreezing them: 'lora', 'loha' or 'lokr', "
                "optionally with options ('lora,use_dora=true'). The head trains whole and is saved with the adapter."})
    lora_r: int | None = field(default=None, metadata={"help": "Adapter rank (default 8)."})
    lora_alpha: float | None = field(default=None, metadata={"help": "Adapter alpha (default 16)."})
    lora_dropout: float | None = field(default=None, metadata={
        "help": "Adapter dropout (default 0.0; LoRA's lora_dropout, LoHa/LoKr's rank_dropout)."})
    adapter_groups: str | None = field(default=None, metadata={
        "help": "Groups that get adapters: 'backbone' (default: all but the head), N (the last N before the head), "
                "or names/ranges joined by '+' or ',' (stage.2+stage.3, stage.1:neck)."})

    def __post_init__(self):
        self.check_freeze_arguments()

    def check_freeze_arguments(self, num_train_epochs: float | None = None, max_steps: int | None = None) -> None:
        """Check every freeze flag that needs no model (raised by ``HfArgumentParser`` while parsing, before any
        model, data or folder is touched): values, group-name shapes, adapter method, feature-cache mode, and
        unfreeze events that would never fire within ``num_train_epochs``/``max_steps``. FreezePolicyError names
        each problem; what needs the model (does it have a ``stage.9``?) is checked by FreezeTrainer."""
        from .feature_cache import MODES

        problems = []
        if self.feature_cache not in MODES:
            problems.append(unknown_choice("--feature_cache", self.feature_cache, MODES))
        try:
            from .prefix_cache import parse_size

            parse_size(self.feature_cache_max_memory)
        except FreezePolicyError as e:
            problems.append(str(e))
        if self.freeze_policy_file:
            given = [f"--{name}" for name, default in _POLICY_FLAG_DEFAULTS.items() if getattr(self, name) != default]
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

    def freeze_policy(self) -> FreezePolicy | None:
        """The FreezePolicy these arguments describe, or None when no freeze flag was given."""
        if self.freeze_policy_file:
            return FreezePolicy.from_pretrained(self.freeze_policy_file)
        given = (self.freeze is not None or bool(self.unfreeze) or self.train_bn or self.layer_lr_decay is not None
                 or not self.verify_frozen or self.unfreeze_bn
                 or self.adapter_config() is not None)
        if not given:
            return None
        events = [Unfreeze.from_string(e) for e in (self.unfreeze or "").split(",") if e.strip()]
        return FreezePolicy(freeze=self.freeze or "backbone", unfreeze=events, train_bn=self.train_bn,
                            layer_lr_decay=self.layer_lr_decay, verify=self.verify_frozen, unfreeze_bn=self.unfreeze_bn,
                            adapter=self.adapter_config())

    def adapter_config(self) -> AdapterConfig | None:
        """The adapter the flags describe (``--adapter`` plus the ``--lora_*``/``--adapter_groups`` flags), or None."""
        flags = {"r": self.lora_r, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                 "groups": self.adapter_groups.replace(",", "+") if self.adapter_groups else None}
        flags = {k: v for k, v in flags.items() if v is not None}
        if not self.adapter:
            if flags:
                names = {"r": "--lora_r", "alpha": "--lora_alpha", "dropout": "--lora_dropout", "groups": "--adapter_groups"}
                raise FreezePolicyError(f"{', '.join(names[k] for k in flags)} given without --adapter "
                                        "(e.g. --adapter lora)")
            return None
        config = AdapterConfig.from_string(self.adapter)
        base = AdapterConfig.from_string(config.method)
        clash = [k for k in flags if getattr(config, k) != getattr(base, k)]
        if clash:
            raise FreezePolicyError(f"--adapter {self.adapter!r} already sets {clash}; give each value once")
        return AdapterConfig.from_dict({**config.to_dict(), **flags})


#: the flags that make up a policy, with their defaults (``--freeze_policy_file`` replaces them all)
_POLICY_FLAG_DEFAULTS = {"freeze": None, "unfreeze": None, "train_bn": False, "unfreeze_bn": False,
                         "layer_lr_decay": None, "verify_frozen": True, "adapter": None, "lora_r": None,
                         "lora_alpha": None, "lora_dropout": None, "adapter_groups": None}


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


@dataclass
class FreezeTrainingArguments(TrainingArguments, FreezeArguments, DeltaArguments):
    """``TrainingArguments`` plus the freeze flags; ``average_tokens_across_devices`` defaults to False
    because image classifiers return a mean loss (the Trainer would otherwise scale it by the world size)."""

    average_tokens_across_devices: bool = field(default=False, metadata={
        "help": "Kept False for image classification: the model's loss is already a per-batch mean."})

    def __post_init__(self):
        # the freeze flags first: a bad one fails while parsing, before TrainingArguments sets anything up
        self.check_freeze_arguments(self.num_train_epochs, self.max_steps)
        super().__post_init__()
