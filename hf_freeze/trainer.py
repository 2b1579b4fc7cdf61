"""``FreezeTrainer``: a Trainer whose optimizer groups, LR schedule and saved files follow a freeze policy."""

from __future__ import annotations

import os

from transformers import Trainer

from .adapters import add_adapter
from .apply import get_state
from .callback import CONFIG_KEY, FreezeCallback
from .groups import peft_wrappers, unwrap_model
from .param_groups import freeze_param_groups
from .policy import FreezePolicy


class FreezeTrainerMixin:
    """Mix into any ``Trainer`` subclass: ``class MyTrainer(FreezeTrainerMixin, Trainer)``.

    ``freeze_policy``: a FreezePolicy, dict or policy string; default: the one carried by
    ``FreezeTrainingArguments``, else the one recorded in the model's config, else ``backbone``.
    A policy with an adapter wraps a plain model with :func:`hf_freeze.add_adapter` first; the Trainer
    then trains and saves the ``peft.PeftModel`` (adapter files + ``freeze_policy.json``).
    """

    def __init__(self, *args, freeze_policy: FreezePolicy | dict | str | None = None, **kwargs):
        training_args = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
        model = kwargs.get("model") if "model" in kwargs else (args[0] if args else None)
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
        if self.freeze_policy.adapter is not None and not peft_wrappers(unwrap_model(model)):
            model = add_adapter(model, self.freeze_policy)
        self.freeze_callback.setup(model, self.args)
        return model

    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        config = getattr(unwrap_model(self.model), "config", None)
        if config is not None:
            setattr(config, CONFIG_KEY, self.freeze_policy.to_dict())
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            self.freeze_policy.save_pretrained(output_dir)


class FreezeTrainer(FreezeTrainerMixin, Trainer):
    """``transformers.Trainer`` + a freeze policy: ``FreezeTrainer(model, args, ..., freeze_policy="backbone")``."""


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
