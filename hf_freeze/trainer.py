"""``FreezeTrainer``: a Trainer whose optimizer groups, LR schedule and saved files follow a freeze policy."""

from __future__ import annotations

import os
import shutil
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.modelcard import extract_hyperparameters_from_trainer
from transformers.trainer import TRAINING_ARGS_NAME

from . import feature_cache as fc
from ._compat import moved_names
from ._logging import get_logger
from .adapters import add_adapter
from .args import FreezeArguments, policy_from_fields
from .callback import FreezeCallback
from .checkpoints import check_resume_policy, last_complete_checkpoint, resume_fingerprint
from .checks import schedule_problems
from .delta import apply_delta_restoring_base, save_adapter_base, save_delta
from .distributed import check_model_data, every_process_runs_alone, local_rank, saves_on_this_process
from .errors import FreezePolicyError
from .folder import (
    ADAPTER_BASE,
    DELTA_MANIFEST,
    DELTA_WEIGHTS,
    FULL_WEIGHTS,
    TRAVELS,
    has_full_weights,
    is_delta,
    policy_in_config,
    record_in_config,
    remove_weights,
    write_policy,
)
from .groups import layer_groups
from .heads import check_head, install_head
from .hub import explain_push_failure
from .model_card import CardConfig, write_model_card
from .names import peft_wrappers, unwrap_model
from .param_groups import freeze_param_groups
from .plan import Timing, resolve
from .policy import FreezePolicy
from .prefix_cache import PrefixCacheTrainerMixin
from .state import get_state

logger = get_logger(__name__)


class FreezeTrainerMixin(PrefixCacheTrainerMixin):
    """Mix into any ``Trainer`` subclass: ``class MyTrainer(FreezeTrainerMixin, Trainer)``.

    ``freeze_policy``: a FreezePolicy, dict or policy string; default: the one carried by
    ``FreezeTrainingArguments``, else the one recorded in the model's config, else ``backbone``.
    A policy with an adapter wraps a plain model with :func:`hf_freeze.add_adapter` first; the Trainer
    then trains and saves the ``peft.PeftModel`` (adapter files + ``freeze_policy.json``).
    """

    def __init__(self, *args, freeze_policy: FreezePolicy | dict | str | None = None, feature_cache: str | None = None,
                 **kwargs):
        training_args = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
        model = kwargs.get("model") if "model" in kwargs else (args[0] if args else None)
        cache_mode = fc.resolve_mode(feature_cache, training_args)
        policy = _pick_policy(freeze_policy, training_args, model)
        _check_before_init(policy, model, training_args)
        check_model_data(model, policy, training_args)  # before the Trainer moves the model: meta tensors
        if model is not None and not peft_wrappers(unwrap_model(model)):
            install_head(unwrap_model(model), policy.head)  # before the Trainer moves the model and builds the optimizer
        if model is not None and policy.adapter is not None and not peft_wrappers(unwrap_model(model)):
            model = add_adapter(model, policy)
            if "model" in kwargs or not args:
                kwargs["model"] = model
            else:
                args = (model, *args[1:])
        self.freeze_callback = FreezeCallback(policy, _param_groups=True)
        kwargs["callbacks"] = [self.freeze_callback, *(kwargs.get("callbacks") or [])]
        output_dir = getattr(training_args, "output_dir", None)
        existed = output_dir is None or os.path.exists(output_dir)
        try:
            super().__init__(*args, **kwargs)
        except FreezePolicyError:  # the policy did not fit (on_init_end): leave no new, empty output_dir behind
            if not existed and os.path.isdir(output_dir) and not os.listdir(output_dir):
                os.rmdir(output_dir)
            raise
        # first in line, so TensorBoard/W&B/printer callbacks see the freeze metrics it adds to the logs
        handler = self.callback_handler.callbacks
        handler.remove(self._freeze_callback)
        handler.insert(0, self._freeze_callback)
        # image classifiers return a mean loss; don't let the Trainer rescale it by the world size
        self.model_accepts_loss_kwargs = False
        self._init_feature_cache(cache_mode)

    @property
    def freeze_callback(self) -> FreezeCallback:
        """This trainer's :class:`FreezeCallback`: the one in its callback handler, which
        ``restore_callback_states_from_checkpoint`` replaces with one rebuilt from the checkpoint's
        ``trainer_state.json`` (:meth:`FreezeCallback.state`)."""
        handler = getattr(self, "callback_handler", None)
        found = [c for c in handler.callbacks if isinstance(c, FreezeCallback)] if handler is not None else []
        return found[0] if found else self._freeze_callback

    @freeze_callback.setter
    def freeze_callback(self, callback: FreezeCallback) -> None:
        self._freeze_callback = callback

    @property
    def freeze_policy(self) -> FreezePolicy:
        return self.freeze_callback.policy

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = unwrap_model(self.model if model is None else model)
            state = get_state(opt_model)
            if state is None:
                self.freeze_callback.setup(opt_model, self.args)
                state = get_state(opt_model)
            cls, kwargs = (self.optimizer_cls_and_kwargs if self.optimizer_cls_and_kwargs is not None
                           else self.get_optimizer_cls_and_kwargs(self.args, opt_model))
            kwargs = dict(kwargs)
            groups = freeze_param_groups(opt_model, state, kwargs.pop("lr", self.args.learning_rate), self.args.weight_decay,
                                         decay=set(self.get_decay_parameter_names(opt_model)))  # as the Trainer decays
            self.optimizer = cls(groups, lr=self.args.learning_rate, **kwargs)
        return super().create_optimizer(model)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        """``Trainer.train``; ``resume_from_checkpoint=True`` resumes from the newest *complete* checkpoint
        (:func:`hf_freeze.checkpoints.last_complete_checkpoint`: a folder left half-written by a crash is skipped,
        with a warning naming it and why).

        Each call starts from the policy (:meth:`FreezeCallback.start_run`), and when resuming from the checkpoint
        only: a second ``train()`` of this trainer, or one after another trainer was built on the same model, runs
        this trainer's policy from its first event. A checkpoint saved with another policy is refused before
        anything changes (:func:`hf_freeze.checkpoints.check_resume_policy`), and so is one whose frozen tensors differ
        from the fingerprint it recorded (:func:`hf_freeze.checkpoints.resume_fingerprint`); once loaded, that record
        is the reference the run verifies against, whatever this model object held before.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = str(last_complete_checkpoint(self.args.output_dir,
                                                                  needs_optimizer=not self.args.save_only_model))
        recorded = None
        if resume_from_checkpoint:
            check_resume_policy(resume_from_checkpoint, self.freeze_policy)
            recorded = resume_fingerprint(resume_from_checkpoint) if self.freeze_policy.verify else None
        self.freeze_callback.resume_record = (str(resume_from_checkpoint), recorded) if recorded is not None else None
        if self.model_init is None:  # with model_init, call_model_init starts the run on the new model
            self.freeze_callback.start_run(self.model, self.args, resumed=bool(resume_from_checkpoint))
        else:
            self.freeze_callback.start_run(None, self.args, resumed=False)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval)

    def set_initial_training_values(self, args, dataloader):
        """``Trainer``'s step counting; the freeze plan learns it here, before the optimizer is built."""
        values = super().set_initial_training_values(args, dataloader)
        _, steps_per_epoch, _, _, _, batches_per_epoch, _ = values
        self.freeze_callback.set_timing(self.model, Timing(steps_per_epoch, batches_per_epoch,
                                                           max(args.gradient_accumulation_steps, 1)))
        return values

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        policy = self._trial_policy(trial)
        if policy is not None:
            self.freeze_callback.policy = policy
        if self.freeze_policy.adapter is not None and not peft_wrappers(unwrap_model(model)):
            model = add_adapter(model, self.freeze_policy)
        # built in train() (is_in_train): open the future groups before the optimizer and the DDP wrap see the model
        self.freeze_callback.setup(model, self.args, open_future=getattr(self, "is_in_train", False))
        return model

    def _trial_policy(self, trial) -> FreezePolicy | None:
        """The policy a hyperparameter-search trial asks for, read from the trial itself.

        ``Trainer.train`` builds the trial's model (``call_model_init(trial)``) *before* ``_hp_search_setup(trial)``
        copies the trial's fields onto the args, so the args still hold the previous trial's values here.
        """
        backend = getattr(self, "hp_search_backend", None)
        if trial is None or backend is None:
            return None
        params = self.hp_space(trial) if str(getattr(backend, "value", backend)) == "optuna" else dict(trial)
        policy = policy_from_fields(self.args, params)
        if policy is not None:
            # _hp_search_setup casts each trial value to the type of the args' current one (the previous trial's):
            # a trial without layer_lr_decay (None) after one with 0.8 would fail. Set this trial's fields now.
            for f in fields(FreezeArguments):
                if f.name in params:
                    setattr(self.args, f.name, params[f.name])
        return policy

    # ------------------------------------------------------------------ saving: full or delta
    @property
    def saves_delta(self) -> bool:
        return bool(getattr(self.args, "save_delta", False))

    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        model = unwrap_model(self.model)
        config = getattr(model, "config", None)
        record_in_config(config, self.freeze_policy)
        state = get_state(model)
        adapter = state is not None and state.adapter is not None
        base = dict(base_model=getattr(self.args, "delta_base_model", None),
                    base_revision=getattr(self.args, "delta_base_revision", None))
        if self.saves_delta and not adapter:
            if self.args.should_save:
                save_delta(model, output_dir, state_dict=state_dict, **base)
                self._save_extras(output_dir)
            return
        super()._save(output_dir, state_dict)  # with an adapter: the adapter files, the delta of an adapter run
        if self.args.should_save:
            stale = (DELTA_MANIFEST, DELTA_WEIGHTS) + (() if self.saves_delta else (ADAPTER_BASE,))
            remove_weights(Path(output_dir), stale)  # a stale delta must not shadow these
            write_policy(output_dir, self.freeze_policy)
            if adapter:
                if config is not None:  # PEFT saves no config: keep the fine-tuned one (labels, freeze_policy)
                    config.save_pretrained(output_dir)
                if self.saves_delta:
                    save_adapter_base(self.model, output_dir, **base)

    def _save_extras(self, output_dir: str) -> None:
        """What ``Trainer._save`` writes beside the weights: the processing class and the training arguments."""
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if is_delta(resume_from_checkpoint) and not has_full_weights(resume_from_checkpoint):
            # groups unfrozen after it (the interrupted run of this same trainer): back to the base's tensors first
            apply_delta_restoring_base(self.model if model is None else model, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def is_world_process_zero(self) -> bool:
        # where every process counts as alone (DeepSpeed without GPUs): torch.distributed rank 0 (model card, push, logs)
        return super().is_world_process_zero() and (not every_process_runs_alone(self.args) or dist.get_rank() == 0)

    def is_local_process_zero(self) -> bool:
        return super().is_local_process_zero() and (not every_process_runs_alone(self.args) or local_rank() == 0)

    def _save_rng_state(self, output_dir):
        # where every process counts as alone (DeepSpeed without GPUs) each would write the same rng_state.pth
        if every_process_runs_alone(self.args) and not saves_on_this_process(self.args):
            return
        super()._save_rng_state(output_dir)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if best and is_delta(best) and not has_full_weights(best):
            apply_delta_restoring_base(self.model, best)  # groups unfrozen after it: back to the base's tensors
            return
        super()._load_best_model()

    # ------------------------------------------------------------------ Hub: card, push
    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, **card_kwargs):
        """Write the hf_freeze card (README.md + training_curves.png) into ``args.output_dir``.

        Same arguments as ``Trainer.create_model_card`` (``finetuned_from`` is the base model, ``dataset`` a Hub
        dataset id); ``card_kwargs`` go to :class:`hf_freeze.model_card.CardConfig` (``dataset_name``, ``summary``,
        ``template``, ``plot``...).
        """
        if not self.is_world_process_zero():
            return
        dataset = dataset if dataset is not None else dataset_tags
        config = CardConfig(
            model_name=model_name, repo_id=getattr(self, "hub_model_id", None) or self.args.hub_model_id,
            base_model=finetuned_from, license=license,
            dataset=(dataset[0] if isinstance(dataset, list) else dataset) or None,
            tags=["generated_from_trainer", *([tags] if isinstance(tags, str) else tags or [])], **card_kwargs)
        if config.base_model is None and self.saves_delta:
            config.base_model, config.base_revision = (getattr(self.args, "delta_base_model", None),
                                                       getattr(self.args, "delta_base_revision", None))
        write_model_card(self.model, self.args.output_dir, config, log_history=self.state.log_history,
                         events_log=self.freeze_callback.events_log, after_saved=self.freeze_callback.after_saved,
                         hyperparameters=extract_hyperparameters_from_trainer(self))

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None, private=None,
                    **kwargs):
        """``Trainer.push_to_hub`` with the hf_freeze card, ``freeze_policy.json`` and (``save_delta``) the delta.

        A failed upload raises :class:`hf_freeze.PushFailed`; the output folder stays complete, call again to retry.
        """
        def repo() -> str:  # known once init_hf_repo ran (inside the push)
            return getattr(self, "hub_model_id", None) or self.args.hub_model_id or Path(self.args.output_dir).name

        with explain_push_failure(repo, self.args.output_dir):
            return super().push_to_hub(commit_message=commit_message, blocking=blocking, token=token,
                                       revision=revision, private=private, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder):
        """Pushes during training (``args.push_to_hub``): also carry the policy, the delta and the card."""
        busy = (not self.args.hub_always_push and getattr(self, "push_in_progress", None) is not None
                and not self.push_in_progress.is_done())  # the Trainer skips this push: don't touch files in flight
        if self.is_world_process_zero() and self.args.hub_strategy != "end" and not busy:
            out = Path(self.args.output_dir)
            for name in TRAVELS:
                if (Path(checkpoint_folder) / name).is_file():
                    shutil.copy(Path(checkpoint_folder) / name, out / name)
            if self.saves_delta:
                remove_weights(out, FULL_WEIGHTS)
            self.create_model_card()
        super()._push_from_checkpoint(checkpoint_folder)


class FreezeTrainer(FreezeTrainerMixin, Trainer):
    """``transformers.Trainer`` + a freeze policy: ``FreezeTrainer(model, args, ..., freeze_policy="backbone")``."""


def _check_before_init(policy: FreezePolicy, model, training_args=None) -> None:
    """What can be checked before the Trainer exists (and creates ``output_dir``): unfreeze events that can never fire
    within the arguments' ``num_train_epochs``/``max_steps`` (the check ``FreezeTrainingArguments`` runs on its flags,
    whatever the policy came from) and the policy against the model's groups (FreezePolicyError, with "did you mean"
    where it helps); the feature-cache mode is checked just before."""
    if training_args is not None:
        problems = schedule_problems(policy, getattr(training_args, "num_train_epochs", None),
                                     getattr(training_args, "max_steps", None))
        if problems:
            raise FreezePolicyError("; ".join(problems))
    if model is not None:
        check_head(unwrap_model(model), policy.head)
        resolve(policy, layer_groups(model))


def _pick_policy(explicit, training_args, model) -> FreezePolicy:
    from_args = getattr(training_args, "freeze_policy", None)
    policy = from_args() if callable(from_args) else None
    if explicit is not None:
        explicit = FreezePolicy.coerce(explicit)
        if policy is not None and policy != explicit:
            raise FreezePolicyError(
                f"two different freeze policies: freeze_policy={explicit.to_string()!r} and {policy.to_string()!r} from "
                f"the training arguments ({_policy_source(training_args)}); give the policy once: drop "
                "freeze_policy= to use the arguments', or leave the freeze flags of the arguments at their defaults")
        return explicit
    if policy is not None:
        return policy
    recorded = policy_in_config(getattr(model, "config", None))
    return FreezePolicy() if recorded is None else FreezePolicy.from_dict(recorded)


def _policy_source(training_args) -> str:
    """How the arguments set their policy, in the words of their flags."""
    if getattr(training_args, "freeze_policy_file", None):
        return f"--freeze_policy_file {training_args.freeze_policy_file}"
    given = getattr(training_args, "given_flags", None)
    flags = given() if callable(given) else []
    return ", ".join(f"--{flag} {getattr(training_args, flag)}" for flag in flags) or "freeze flags"


__getattr__ = moved_names(__name__, {"policy_from_pretrained": "policy"})
