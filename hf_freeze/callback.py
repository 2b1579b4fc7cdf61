"""``FreezeCallback``: a freeze policy through the whole ``transformers.Trainer`` lifecycle.

Lifecycle (transformers 5.x ``Trainer.train``): ``__init__`` -> on_init_end -> create_optimizer ->
accelerator.prepare (DDP wrap) -> create_scheduler -> (load optimizer state when resuming) ->
on_train_begin -> steps ...

* on_init_end: apply the policy; groups a schedule will unfreeze are made trainable *for now*, so the
  optimizer and the DDP reducer register them.
* on_train_begin: fire the events already due (a resumed run), then freeze what is still frozen: no
  gradient, no backward pass through the frozen prefix. Log the trainable parameter count.
* on_step_begin: fire events at their epoch/step boundary (the very next update trains them).
* on_save / on_train_end: verify the still-frozen tensors bit for bit (``FrozenWeightsChanged``).
"""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback

from .apply import apply_policy, get_state, set_frozen, unfreeze_groups, verify_frozen
from .distributed import check_backend
from .errors import FreezePolicyError
from .groups import unwrap_model
from .param_groups import ever_trainable
from .policy import FreezePolicy

logger = logging.getLogger(__name__)
CONFIG_KEY = "freeze_policy"


class FreezeCallback(TrainerCallback):
    """Apply ``policy`` to the Trainer's model and run its unfreeze schedule.

    Per-group learning rates (``Unfreeze(lr_scale=...)``, ``layer_lr_decay``) need the optimizer's
    parameter groups: use :class:`hf_freeze.FreezeTrainer` for those.
    """

    def __init__(self, policy: FreezePolicy | dict | str | None = None, *, _param_groups: bool = False):
        self.policy = FreezePolicy.coerce(policy)
        if self.policy.needs_param_groups and not _param_groups:
            raise FreezePolicyError(
                f"policy {self.policy.to_string()!r} sets per-group learning rates (lr_scale / layer_lr_decay), "
                "which the plain Trainer's optimizer ignores. Use hf_freeze.FreezeTrainer(freeze_policy=...) "
                "(or FreezeTrainerMixin on your Trainer subclass) instead of FreezeCallback.")
        self.pending_logs: dict[str, float] = {}
        self.events_log: list[dict] = []

    # ------------------------------------------------------------------ set-up
    def setup(self, model, args) -> None:
        """Apply the policy (idempotent) and open the future groups for optimizer/DDP registration."""
        check_backend(args, self.policy, model)
        model = unwrap_model(model)
        state = get_state(model)
        if state is None or state.policy != self.policy or state.events_done:
            report = apply_policy(model, self.policy)
            logger.info("hf_freeze policy applied:\n%s", report)
            if report.input_issue:
                logger.warning("hf_freeze: %s: %s", type(model).__name__, report.input_issue)
            state = get_state(model)
        if getattr(args, "world_size", 1) > 1 and getattr(args, "average_tokens_across_devices", False):
            # image classifiers return a mean loss; the Trainer would multiply it by the world size
            logger.warning("hf_freeze: setting average_tokens_across_devices=False (image classifiers return a mean loss)")
            args.average_tokens_across_devices = False
        config = getattr(model, "config", None)
        if config is not None:
            setattr(config, CONFIG_KEY, self.policy.to_dict())
        future = ever_trainable(state) & state.frozen
        for n, p in model.named_parameters():
            if n in future:
                p.requires_grad_(True)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.setup(model, args)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = unwrap_model(model)
        fstate = get_state(model)
        if fstate is None:  # model_init replaced the model, or setup was never run
            self.setup(model, args)
            fstate = get_state(model)
        self._fire_due(model, state, resumed=state.global_step > 0)
        set_frozen(model, fstate.frozen, refingerprint=False)  # close what is still frozen: no grads from now on
        self.pending_logs["freeze/trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        fstate = get_state(model)
        if fstate is not None and fstate.events_done < len(fstate.plan.events):
            if self._fire_due(unwrap_model(model), state):
                control.should_log = True

    def _fire_due(self, model, state, resumed: bool = False) -> int:
        fstate = get_state(model)
        fired = 0
        epoch = state.epoch or 0.0
        while fstate.events_done < len(fstate.plan.events):
            event = fstate.plan.events[fstate.events_done]
            if not event.due(epoch, state.global_step):
                break
            names = unfreeze_groups(model, event.groups, when=event.when, lr_scale=event.lr_scale)
            fstate.events_done += 1
            fired += 1
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            record = {"step": state.global_step, "epoch": epoch, "groups": list(event.groups), "when": event.when,
                      "lr_scale": event.lr_scale, "params_unfrozen": len(names), "trainable_params": trainable,
                      "resumed": resumed}
            self.events_log.append(record)
            self.pending_logs.update({"freeze/trainable_params": trainable,
                                      "freeze/unfrozen_groups": float(len(fstate.unfrozen)),
                                      "freeze/events_done": float(fstate.events_done)})
            logger.info("hf_freeze: unfroze %s at %s (%s%s)", ", ".join(event.groups), event.when,
                        f"lr x{event.lr_scale:g}", ", restored on resume" if resumed else "")
        return fired

    # ------------------------------------------------------------------ logging
    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pending_logs and logs is not None:
            logs.update(self.pending_logs)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self.pending_logs)
            self.pending_logs = {}

    # ------------------------------------------------------------------ verification and saving
    def on_save(self, args, state, control, model=None, **kwargs):
        fstate = get_state(model)
        if fstate is None:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(checkpoint) and state.is_world_process_zero:
            self.policy.save_pretrained(checkpoint)
        if self.policy.verify:
            verify_frozen(model, f"when saving checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if get_state(model) is not None and self.policy.verify:
            verify_frozen(model, "at the end of training")
