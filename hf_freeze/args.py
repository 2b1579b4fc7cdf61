"""Freeze fields for ``HfArgumentParser``: a dataclass mixin and ``FreezeTrainingArguments``.

    parser = HfArgumentParser((ModelArguments, FreezeTrainingArguments))
    ... --freeze backbone --unfreeze epoch2:1@0.1,epoch4:2@0.01 --train_bn --layer_lr_decay 0.8
    trainer = FreezeTrainer(model=model, args=training_args, ...)   # picks the policy from the args
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

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
    freeze_policy_file: str | None = field(default=None, metadata={
        "help": "Read the whole policy from a freeze_policy.json (file or folder) instead of the flags above."})

    def freeze_policy(self) -> FreezePolicy | None:
        """The FreezePolicy these arguments describe, or None when no freeze flag was given."""
        if self.freeze_policy_file:
            return FreezePolicy.from_pretrained(self.freeze_policy_file)
        given = (self.freeze is not None or bool(self.unfreeze) or self.train_bn or self.layer_lr_decay is not None
                 or not self.verify_frozen)
        if not given:
            return None
        events = [Unfreeze.from_string(e) for e in (self.unfreeze or "").split(",") if e.strip()]
        return FreezePolicy(freeze=self.freeze or "backbone", unfreeze=events, train_bn=self.train_bn,
                            layer_lr_decay=self.layer_lr_decay, verify=self.verify_frozen)


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
