"""``FreezeTrainer``: a Trainer whose optimizer groups, LR schedule and saved files follow a freeze policy."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from . import feature_cache as fc
from .adapters import add_adapter
from .apply import get_state
from .callback import CONFIG_KEY, FreezeCallback
from .delta import DELTA_MANIFEST, DELTA_WEIGHTS, FULL_WEIGHTS, apply_delta, is_delta, remove_weights, save_delta
from .groups import peft_wrappers, unwrap_model
from .hub import explain_push_failure
from .model_card import CardConfig, write_model_card
from .param_groups import freeze_param_groups
from .policy import FreezePolicy

logger = logging.getLogger(__name__)


class FreezeTrainerMixin(fc.FeatureCacheTrainerMixin):
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
        if model is not None and policy.adapter is not None and not peft_wrappers(unwrap_model(model)):
            model = add_adapter(model, policy)
            if "model" in kwargs or not args:
                kwargs["model"] = model
            else:
                args = (model, *args[1:])
        self.freeze_callback = FreezeCallback(policy, _param_groups=True)
        kwargs["callbacks"] = [self.freeze_callback, *(kwargs.get("callbacks") or [])]
        super().__init__(*args, **kwargs)
        # first in line, so TensorBoard/W&B/printer callbacks see the freeze metrics it adds to the logs
        handler = self.callback_handler.callbacks
        handler.remove(self.freeze_callback)
        handler.insert(0, self.freeze_callback)
        # image classifiers return a mean loss; don't let the Trainer rescale it by the world size
        self.model_accepts_loss_kwargs = False
        self._init_feature_cache(cache_mode)

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
            groups = freeze_param_groups(opt_model, state, kwargs.pop("lr", self.args.learning_rate), self.args.weight_decay)
            self.optimizer = cls(groups, lr=self.args.learning_rate, **kwargs)
        return super().create_optimizer(model)

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        from_args = getattr(self.args, "freeze_policy", None)
        if trial is not None and callable(from_args) and from_args() is not None:
            self.freeze_callback.policy = from_args()  # a search trial set the freeze fields on the args
        if self.freeze_policy.adapter is not None and not peft_wrappers(unwrap_model(model)):
            model = add_adapter(model, self.freeze_policy)
        self.freeze_callback.setup(model, self.args)
        return model

    # ------------------------------------------------------------------ saving: full or delta
    @property
    def saves_delta(self) -> bool:
        return bool(getattr(self.args, "save_delta", False))

    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        model = unwrap_model(self.model)
        config = getattr(model, "config", None)
        if config is not None:
            setattr(config, CONFIG_KEY, self.freeze_policy.to_dict())
        if self.saves_delta:
            if self.args.should_save:
                save_delta(model, output_dir, base_model=getattr(self.args, "delta_base_model", None),
                           base_revision=getattr(self.args, "delta_base_revision", None), state_dict=state_dict)
                self._save_extras(output_dir)
            return
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            remove_weights(Path(output_dir), (DELTA_MANIFEST, DELTA_WEIGHTS))  # a stale delta must not shadow these
            self.freeze_policy.save_pretrained(output_dir)

    def _save_extras(self, output_dir: str) -> None:
        """What ``Trainer._save`` writes beside the weights: the processing class and the training arguments."""
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if is_delta(resume_from_checkpoint) and not _has_full_weights(resume_from_checkpoint):
            apply_delta(self.model if model is None else model, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if best and is_delta(best) and not _has_full_weights(best):
            apply_delta(self.model, best)
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
        from transformers.modelcard import extract_hyperparameters_from_trainer

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
                         events_log=self.freeze_callback.events_log,
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
            for name in ("freeze_policy.json", DELTA_MANIFEST, DELTA_WEIGHTS):
                if (Path(checkpoint_folder) / name).is_file():
                    shutil.copy(Path(checkpoint_folder) / name, out / name)
            if self.saves_delta:
                remove_weights(out, FULL_WEIGHTS)
            self.create_model_card()
        super()._push_from_checkpoint(checkpoint_folder)


class FreezeTrainer(FreezeTrainerMixin, Trainer):
    """``transformers.Trainer`` + a freeze policy: ``FreezeTrainer(model, args, ..., freeze_policy="backbone")``."""


def _has_full_weights(folder) -> bool:
    return any((Path(folder) / name).is_file() for name in FULL_WEIGHTS)


def _pick_policy(explicit, training_args, model) -> FreezePolicy:
    if explicit is not None:
        return FreezePolicy.coerce(explicit)
    from_args = getattr(training_args, "freeze_policy", None)
    policy = from_args() if callable(from_args) else None
    if policy is not None:
        return policy
    recorded = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if isinstance(recorded, dict):
        return FreezePolicy.from_dict(recorded)
    return FreezePolicy()


def policy_from_pretrained(path: str | os.PathLike) -> FreezePolicy:
    """The policy saved with a model folder (``freeze_policy.json``, else ``config.json``'s ``freeze_policy``)."""
    import json
    from pathlib import Path

    p = Path(path)
    if (p / "freeze_policy.json").is_file():
        return FreezePolicy.from_pretrained(p)
    config = json.loads((p / "config.json").read_text())
    if CONFIG_KEY not in config:
        raise FileNotFoundError(f"{path} has no freeze_policy.json and no '{CONFIG_KEY}' in config.json")
    return FreezePolicy.from_dict(config[CONFIG_KEY])
