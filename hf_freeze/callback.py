"""``FreezeCallback``: a freeze policy through the whole ``transformers.Trainer`` lifecycle.

Lifecycle (transformers 5.x ``Trainer.train``): ``__init__`` -> on_init_end -> create_optimizer ->
accelerator.prepare (DDP wrap) -> create_scheduler -> (load optimizer state when resuming) ->
on_train_begin -> steps ...

* on_init_end: apply the policy; with a plain Trainer, groups a schedule will unfreeze are made trainable
  *for now*, so the optimizer and the DDP reducer register them (``FreezeTrainer`` builds its optimizer from the
  policy and opens them only when ``train()`` starts: after construction the model is as its report says).
* train() start (``FreezeTrainer``, :meth:`FreezeCallback.start_run`): per-run state from the policy, and when
  resuming from the checkpoint only; nothing of an earlier ``train()`` of the same trainer or model survives.
* on_train_begin: forget an earlier run's events log (a plain Trainer's second ``train()``), fire the events
  already due (a resumed run), then freeze what is still frozen: no gradient, no backward pass through the
  frozen prefix. Log the trainable parameter count.
* on_step_begin: fire events at their epoch/step boundary (the very next update trains them).
* on_save / on_train_end: verify the still-frozen tensors bit for bit (``FrozenWeightsChanged``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ._compat import moved_names
from ._logging import get_logger
from .apply import (
    adopt_fingerprint,
    apply_policy,
    restart_policy,
    rewind_events,
    set_frozen,
    unfreeze_groups,
    verify_frozen,
)
from .checkpoints import check_resumed_state_policy
from .distributed import check_backend
from .errors import FreezePolicyError
from .fingerprint import Fingerprint
from .folder import checkpoint_kind, record_in_config, write_fingerprint, write_policy
from .groups import layer_groups
from .names import unwrap_model
from .param_groups import ever_trainable
from .plan import Timing, resolve
from .policy import FreezePolicy
from .report import freeze_report
from .state import get_state, save_policy_with

logger = get_logger(__name__)


class FreezeCallback(TrainerCallback, ExportableState):
    """Apply ``policy`` to the Trainer's model and run its unfreeze schedule.

    Per-group learning rates (``Unfreeze(lr_scale=...)``, ``layer_lr_decay``) need the optimizer's
    parameter groups: use :class:`hf_freeze.FreezeTrainer` for those.

    Each checkpoint's ``trainer_state.json`` records the policy (transformers' ``ExportableState``, :meth:`state`): a
    run resumed with another policy is refused at ``on_train_begin``, before any step.
    """

    def __init__(self, policy: FreezePolicy | dict | str | None = None, *, model=None, _param_groups: bool = False):
        """``model``: check the policy against it now (a bad group name fails here, before the Trainer exists);
        without it the check runs when the Trainer is built, and an output folder it just created is removed."""
        self.policy = FreezePolicy.coerce(policy)
        if self.policy.needs_param_groups and not _param_groups:
            raise FreezePolicyError(
                f"policy {self.policy.to_string()!r} sets per-group learning rates (lr_scale / layer_lr_decay), "
                "which the plain Trainer's optimizer ignores. Use hf_freeze.FreezeTrainer(freeze_policy=...) "
                "(or FreezeTrainerMixin on your Trainer subclass) instead of FreezeCallback.")
        if model is not None:
            resolve(self.policy, layer_groups(model))
        self._standalone = not _param_groups  # FreezeTrainer cleans up after a failed __init__ itself
        self._created_at = time.time()
        self._log_level = logging.INFO
        self.pending_logs: dict[str, float] = {}
        self.events_log: list[dict] = []
        #: steps per epoch of the run (known once the training dataloader exists); see :meth:`set_timing`
        self.timing: Timing | None = None
        #: with load_best_model_at_end: (step of the loaded checkpoint, events_log entries that fired after it)
        self.after_saved: tuple[int, list[dict]] | None = None
        #: the checkpoint this run resumes from and the fingerprint it recorded, checked and adopted at on_train_begin
        #: (set by ``FreezeTrainer.train``; see :func:`hf_freeze.checkpoints.resume_fingerprint`)
        self.resume_record: tuple[str, Fingerprint] | None = None

    def state(self) -> dict:
        """What ``trainer_state.json`` records of this callback: the policy (checked when a run resumes, see
        :func:`hf_freeze.checkpoints.check_resumed_state_policy`), as arguments that rebuild the callback
        (``restore_callback_states_from_checkpoint``)."""
        return {"args": {"policy": self.policy.to_dict(), "_param_groups": not self._standalone}, "attributes": {}}

    # ------------------------------------------------------------------ set-up
    def setup(self, model, args, *, open_future: bool = True) -> None:
        """Apply the policy (idempotent: again only when the model carries another policy or fired events) and, with
        ``open_future``, open the future groups for optimizer/DDP registration."""
        check_backend(args, self.policy, model, plain_trainer=self._standalone)
        outer, model = model, unwrap_model(model)
        state = get_state(model)
        if state is None or state.policy != self.policy or state.events_done:
            report = apply_policy(model, self.policy)
            logger.debug("hf_freeze policy applied:\n%s", report)
            if report.input_issue:
                logger.warning("hf_freeze: %s: %s", type(model).__name__, report.input_issue)
            state = get_state(model)
        if getattr(args, "world_size", 1) > 1 and getattr(args, "average_tokens_across_devices", False):
            # image classifiers return a mean loss; the Trainer would multiply it by the world size
            logger.warning("hf_freeze: setting average_tokens_across_devices=False (image classifiers return a mean loss)")
            args.average_tokens_across_devices = False
        record_in_config(getattr(model, "config", None), self.policy)
        for m in {id(outer): outer, id(model): model}.values():
            save_policy_with(m)
        if not open_future:
            return
        future = ever_trainable(state) & state.frozen
        for n, p in model.named_parameters():
            if n in future:
                p.requires_grad_(True)

    def start_run(self, model, args, *, resumed: bool, open_future: bool = True) -> None:
        """Begin a ``train()``: per-run state comes from the policy, and when resuming from the checkpoint only.

        The events log, the unfreeze count, a load-best rewind and the step counting of an earlier ``train()`` of
        this callback are dropped. On ``model``: resuming with the policy it already carries puts that policy's state
        back as applied (:func:`hf_freeze.apply.restart_policy`; the checkpoint the Trainer loads next brings the
        weights, its due events fire again at on_train_begin, as in a fresh process); otherwise the policy is applied
        again, to the current weights, when the model carries another policy (a second trainer built on it) or
        events an earlier run fired.
        """
        self._reset_run_log()
        self.timing = None
        if model is None:  # model_init: the run's model is built later (and set up then)
            return
        model = unwrap_model(model)
        state = get_state(model)
        if resumed and state is not None and state.policy == self.policy and state.events_done:
            restart_policy(model)
        self.setup(model, args, open_future=open_future)

    def _reset_run_log(self) -> None:
        self.events_log, self.after_saved, self.pending_logs = [], None, {}

    def set_timing(self, model, timing: Timing | None) -> None:
        """Record how the run counts steps; a plan whose mixed step/epoch events depend on it is resolved again.

        ``FreezeTrainer`` calls this before it builds the optimizer (per-group LR scales follow the resolved events);
        a plain Trainer reaches it at ``on_train_begin``.
        """
        if timing is not None:
            self.timing = timing
        fstate = get_state(model)
        if fstate is None or not fstate.plan.provisional or fstate.events_done:
            return
        if self.timing is None:
            raise FreezePolicyError(
                f"policy {fstate.policy.to_string()!r} mixes step and epoch unfreeze events whose order depends on the "
                "number of steps per epoch, which this run does not tell (a training dataloader without a length and "
                "no max_steps); use one unit, or name the groups of each event")
        fstate.plan = resolve(fstate.policy, fstate.groups, self.timing)
        logger.info("hf_freeze: unfreeze events in firing order for %d steps per epoch: %s",
                    self.timing.steps_per_epoch, ", ".join(f"{'+'.join(e.groups)} at {e.when}" for e in fstate.plan.events))

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        try:
            self.setup(model, args, open_future=self._standalone)  # FreezeTrainer opens them when train() starts
        except FreezePolicyError:
            if self._standalone and getattr(args, "should_save", False):
                _remove_if_new_and_empty(args.output_dir, self._created_at)
            raise

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._log_level = logging.INFO if getattr(args, "should_log", True) else logging.DEBUG  # main process only
        model = unwrap_model(model)
        self._reset_run_log()
        fstate = get_state(model)
        if fstate is None:  # model_init replaced the model, or setup was never run
            self.setup(model, args)
        elif fstate.events_done:  # left by an earlier train() (a plain Trainer's; FreezeTrainer starts each run clean)
            self.start_run(model, args, resumed=state.global_step > 0, open_future=False)
        fstate = get_state(model)
        if state.global_step > 0:  # resumed: the checkpoint's trainer_state.json records the policy it trained
            check_resumed_state_policy(state, fstate.policy)
        self.set_timing(model, self.timing or timing_of(args, kwargs.get("train_dataloader")))
        self._fire_due(model, state, resumed=state.global_step > 0)
        set_frozen(model, fstate.frozen, refingerprint=False)  # close what is still frozen: no grads from now on
        if self.resume_record is not None:  # the checkpoint is loaded, its due events fired: verify it, adopt its record
            checkpoint, recorded = self.resume_record
            self.resume_record = None
            adopt_fingerprint(model, recorded, f"in {checkpoint} (loaded for resuming) against the fingerprint it "
                              "recorded when it was saved; nothing trained")
        self.pending_logs["freeze/trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if logger.isEnabledFor(self._log_level):
            logger.log(self._log_level, "hf_freeze: freeze policy at the start of training:\n%s", freeze_report(model))

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
            logger.log(self._log_level,
                       "hf_freeze: unfroze %s at %s (step %d, lr x%s%s): %s trainable parameters",
                       ", ".join(event.groups), event.when, state.global_step, f"{event.lr_scale:g}",
                       ", restored on resume" if resumed else "", f"{trainable:,}")
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
        if os.path.isdir(checkpoint) and args.should_save:  # the process(es) that wrote the checkpoint
            write_policy(checkpoint, self.policy)
        if self.policy.verify:
            verify_frozen(model, f"when saving checkpoint-{state.global_step}")
            if os.path.isdir(checkpoint) and args.should_save:  # what a resume verifies the checkpoint by
                write_fingerprint(checkpoint, fstate.fingerprint.digests, fstate.fingerprint.scheme)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if get_state(model) is None:
            return
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best and _has_weights(best):  # the Trainer has just loaded it
            self.rewind_to_checkpoint(model, best)
        if self.policy.verify:
            verify_frozen(model, "at the end of training" + (f" (after loading {best})" if self.after_saved else ""))

    def rewind_to_checkpoint(self, model, checkpoint) -> None:
        """``model`` holds the weights of ``checkpoint`` (the best one, loaded at the end): unfreeze events that fired
        after it was saved are undone in the policy state (their groups frozen again, with their fingerprints), so the
        report, the card and the verification describe the saved weights."""
        step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
        fstate = get_state(model)
        if self.timing is not None:  # an event found due at global step s trains from update s + 1 on
            fired = sum(1 for e in fstate.plan.events[:fstate.events_done] if self.timing.fire_step(e) < step)
        else:
            fired = sum(1 for r in self.events_log if r["step"] < step)
        fired = min(fired, fstate.events_done)
        if fired < fstate.events_done:
            later = self.events_log[len(self.events_log) - (fstate.events_done - fired):]
            groups = rewind_events(model, fired)
            self.after_saved = (step, later)
            logger.info("hf_freeze: %s (step %d) was saved before %s was unfrozen: shown and verified as frozen",
                        checkpoint, step, ", ".join(groups))


def _has_weights(folder) -> bool:
    try:
        checkpoint_kind(folder)
    except FileNotFoundError:
        return False
    return True


def timing_of(args, dataloader) -> Timing | None:
    """A run's :class:`Timing` from its training dataloader, counted as ``Trainer.set_initial_training_values`` does."""
    accumulation = max(int(getattr(args, "gradient_accumulation_steps", 1) or 1), 1)
    try:
        batches = len(dataloader)
    except TypeError:  # no dataloader, or one without a length: the Trainer counts max_steps as one epoch
        max_steps = getattr(args, "max_steps", -1)
        return Timing(max_steps, max_steps * accumulation, accumulation) if max_steps and max_steps > 0 else None
    steps = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return Timing(steps, batches, accumulation)


def _remove_if_new_and_empty(folder, since: float) -> None:
    """Remove ``folder`` if it is empty and was created after ``since`` (by the Trainer whose set-up failed).

    The Trainer creates ``output_dir`` before ``on_init_end``; a folder that existed earlier is left alone
    (its change time predates ``since``; 0.05 s allow for the file system's coarser clock).
    """
    try:
        if not os.listdir(folder) and os.stat(folder).st_ctime >= since - 0.05:
            os.rmdir(folder)
    except OSError:
        pass


__getattr__ = moved_names(__name__, {"saves_policy": "state", "CONFIG_KEY": "folder"})
