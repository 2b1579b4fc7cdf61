"""Which checkpoint to resume from: the newest *complete* one.

A run killed while the Trainer writes ``checkpoint-N`` leaves a folder with an empty or missing
``trainer_state.json``, a truncated weights file or no optimizer state. ``transformers``' ``get_last_checkpoint``
picks it anyway and the resume fails (``JSONDecodeError`` naming no file) or, without ``optimizer.pt``, silently
restarts the optimizer. :func:`last_complete_checkpoint` skips such folders, saying which and why.

A DeepSpeed checkpoint has no ``optimizer.pt`` (nor, with DeepSpeed's scheduler wrapper, ``scheduler.pt``): the engine
writes its states to the folder named by ``latest`` (``global_stepN/``: model states, and one ZeRO optimizer-state file
per rank), and writes ``latest`` last.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import FreezePolicyError, FrozenWeightsChanged
from .fingerprint import Fingerprint, digests
from .folder import ADAPTER_FILES, CONFIG_FILE, CONFIG_KEY, DELTA_MANIFEST, DELTA_WEIGHTS, FINGERPRINT_FILE, POLICY_FILE
from .policy import FreezePolicy

logger = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def _safetensors_problem(path: Path) -> str | None:
    try:
        with safe_open(str(path), "pt"):
            return None
    except Exception as e:  # SafetensorError: header too small, file not fully covered, ...
        return f"{path.name} is unreadable ({e})"


def _torch_file_problem(path: Path) -> str | None:
    """A ``torch.save`` file is a zip archive: a truncated one has no end-of-archive record."""
    return None if zipfile.is_zipfile(path) else f"{path.name} is truncated or not a torch.save file"


def _json_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"no {path.name}"
    text = path.read_text(errors="replace")
    if not text.strip():
        return f"{path.name} is empty"
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return f"{path.name} is not valid JSON ({e})"
    return None


_ZERO_STATES = re.compile(r"^(?:\w+_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
DEEPSPEED_LATEST = "latest"


def _deepspeed_problem(folder: Path) -> str | None:
    """A DeepSpeed engine checkpoint: ``latest`` names the folder with the model states and the optimizer states
    (ZeRO: one file per rank, ranks 0..N-1; without ZeRO they are in the model-states file); all must be readable."""
    tag = (folder / DEEPSPEED_LATEST).read_text(errors="replace").strip()
    states = folder / tag
    if not tag or not states.is_dir():
        return f"{DEEPSPEED_LATEST} names {tag!r}, which is not a folder of DeepSpeed states"
    files = sorted(p for p in states.iterdir() if p.name.endswith("_states.pt"))
    if not any(p.name.endswith("model_states.pt") for p in files):
        return f"no DeepSpeed model states in {tag}/"
    problem = next((f"{tag}/{problem}" for problem in map(_torch_file_problem, files) if problem), None)
    ranks = sorted({int(m.group(1)) for p in files if (m := _ZERO_STATES.match(p.name))})
    if problem or not ranks:
        return problem
    world = _zero_world_size(next(p for p in files if p.name.endswith("model_states.pt"))) or ranks[-1] + 1
    missing = sorted(set(range(max(world, ranks[-1] + 1))) - set(ranks))
    return f"{tag}/ lacks the ZeRO optimizer states of rank(s) {missing}" if missing else None


def _zero_world_size(model_states: Path) -> int | None:
    """The data-parallel world size a DeepSpeed model-states file records (how many ZeRO optimizer-state files its
    checkpoint has), read without executing pickled code; None when it cannot be read that way."""
    try:
        saved = torch.load(model_states, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an older DeepSpeed's pickled classes: the rank numbering check alone
        return None
    world = saved.get("dp_world_size") if isinstance(saved, dict) else None
    return world if isinstance(world, int) and world > 0 else None


def _weights_problem(folder: Path) -> str | None:
    """The model weights: full (single file or index + every shard), an hf_freeze delta or a PEFT adapter."""
    if (folder / DELTA_MANIFEST).is_file():
        return _json_problem(folder / DELTA_MANIFEST) or (
            _safetensors_problem(folder / DELTA_WEIGHTS) if (folder / DELTA_WEIGHTS).is_file() else f"no {DELTA_WEIGHTS}")
    if (folder / ADAPTER_FILES[0]).is_file():
        weights = folder / ADAPTER_FILES[1]
        return _json_problem(folder / ADAPTER_FILES[0]) or (
            _safetensors_problem(weights) if weights.is_file() else f"no {weights.name}")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            problem = _json_problem(folder / index)
            if problem:
                return problem
            shards = sorted(set(json.loads((folder / index).read_text()).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                return f"{index} lists missing shard(s) {missing[:3]}"
            check = _safetensors_problem if index.startswith("model.safetensors") else _torch_file_problem
            return next((p for p in (check(folder / s) for s in shards) if p), None)
    if (folder / "model.safetensors").is_file():
        return _safetensors_problem(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return _torch_file_problem(folder / "pytorch_model.bin")
    return "no model weights (model.safetensors, an hf_freeze delta or a PEFT adapter)"


def checkpoint_problem(folder: str | os.PathLike, needs_optimizer: bool = True) -> str | None:
    """Why ``folder`` cannot be resumed from (None: it is complete).

    Complete: ``trainer_state.json`` is valid JSON with a ``global_step``, the weights are readable, and (unless
    ``needs_optimizer`` is False, as with ``save_only_model``) ``optimizer.pt`` and ``scheduler.pt`` are readable, or,
    for DeepSpeed, the engine's states named by ``latest``.
    """
    folder = Path(folder)
    state = folder / TRAINER_STATE
    problem = _json_problem(state)
    if problem:
        return problem
    if not isinstance(json.loads(state.read_text()).get("global_step"), int):
        return f"{TRAINER_STATE} has no global_step"
    problem = _weights_problem(folder)
    for name in (POLICY_FILE, FINGERPRINT_FILE):  # written after trainer_state.json (on_save)
        if problem is None and (folder / name).exists():
            problem = _json_problem(folder / name)
    if problem or not needs_optimizer:
        return problem
    if (folder / DEEPSPEED_LATEST).is_file():  # the engine keeps the optimizer (and its scheduler) in its own folder
        problem = _deepspeed_problem(folder)
        scheduler = folder / "scheduler.pt"
        return problem or (_torch_file_problem(scheduler) if scheduler.is_file() else None)
    if any(p.is_dir() and p.name.startswith("global_step") for p in folder.iterdir()):
        return f"DeepSpeed states without {DEEPSPEED_LATEST!r} (the engine writes it last: the save did not finish)"
    for name in ("optimizer.pt", "scheduler.pt"):
        path = folder / name
        if path.is_file():
            problem = _torch_file_problem(path)
        elif name == "optimizer.pt" and any(p.name.startswith("optimizer") for p in folder.iterdir()):
            problem = None  # sharded optimizer state (FSDP, DeepSpeed): written by its own engine
        else:
            problem = f"no {name}"
        if problem:
            return problem
    return None


def check_resume_policy(checkpoint: str | os.PathLike, policy: FreezePolicy) -> None:
    """Refuse (FreezePolicyError naming both) to resume from ``checkpoint`` with another ``policy`` than it was saved
    with (its ``freeze_policy.json``, else ``config.json``'s ``freeze_policy``; a folder that records none passes).

    Another frozen set or schedule gives the optimizer another parameter layout, another LR scale trains silently
    otherwise: a resumed run continues the checkpoint's run, so it takes the checkpoint's policy.
    """
    recorded = _recorded_policy(Path(checkpoint))
    if recorded is not None and recorded != policy:
        raise FreezePolicyError(_another_policy(str(checkpoint), policy, recorded) + (
            f"Resume with the checkpoint's policy (freeze_policy=hf_freeze.FreezePolicy.from_pretrained("
            f"{str(checkpoint)!r})), or start a new run with the new policy (from the checkpoint's weights, without "
            "resume_from_checkpoint)."))


def check_resumed_state_policy(trainer_state, policy: FreezePolicy) -> None:
    """Refuse (FreezePolicyError naming both) a run resumed with another ``policy`` than the one the checkpoint's
    ``trainer_state.json`` records for its ``FreezeCallback`` (:meth:`hf_freeze.FreezeCallback.state`; none recorded:
    a checkpoint of an older hf_freeze, nothing to check).

    For a plain ``Trainer`` + ``FreezeCallback``: no callback event comes between ``train(resume_from_checkpoint=...)``
    and the loading of the checkpoint, so this runs at ``on_train_begin``: the weights are loaded, nothing trained.
    """
    saved = trainer_state.stateful_callbacks.get("FreezeCallback") if trainer_state.stateful_callbacks else None
    saved = saved if isinstance(saved, list) else [saved]
    recorded = [FreezePolicy.from_dict(s["args"]["policy"]) for s in saved
                if isinstance(s, dict) and isinstance(s.get("args", {}).get("policy"), dict)]
    if recorded and policy not in recorded:
        raise FreezePolicyError(_another_policy(f"the checkpoint of global step {trainer_state.global_step}", policy,
                                                recorded[0]) + (
            "Its weights are loaded into the model; nothing trained. Resume with the checkpoint's policy "
            "(FreezeCallback(hf_freeze.FreezePolicy.from_pretrained(CHECKPOINT))), or start a new run with the new "
            "policy (from the checkpoint's weights, without resume_from_checkpoint)."))


def _another_policy(checkpoint: str, policy: FreezePolicy, recorded: FreezePolicy) -> str:
    return (f"cannot resume from {checkpoint} with freeze policy {policy.to_string()!r}: the checkpoint was trained "
            f"with freeze policy {recorded.to_string()!r}, and a resumed run continues that run. ")


def _recorded_policy(folder: Path) -> FreezePolicy | None:
    """The policy ``folder`` was saved with: its ``freeze_policy.json``, else (missing, or left empty/invalid by a crash
    while it was rewritten) ``config.json``'s ``freeze_policy``; None when neither records one."""
    for path, key in ((folder / POLICY_FILE, None), (folder / CONFIG_FILE, CONFIG_KEY)):
        try:
            data = json.loads(path.read_text())
            data = data if key is None else data[key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(data, dict):
            return FreezePolicy.from_dict(data)
    return None


def resume_fingerprint(checkpoint: str | os.PathLike) -> Fingerprint | None:
    """The fingerprint of the frozen tensors ``checkpoint`` recorded when it was saved (its ``freeze_fingerprint.json``),
    checked against the frozen tensors its safetensors weights hold; None for a checkpoint without one (written by an
    older hf_freeze, or with ``verify=False``): the run then verifies against the fingerprint in memory, as before.

    Raises, before anything is loaded: FreezePolicyError when the record is unreadable, :class:`FrozenWeightsChanged`
    naming the tensors whose saved bytes differ from it (an edited or corrupted checkpoint). Tensors the weights
    files do not hold (a delta, an adapter, DeepSpeed or FSDP states) are checked once loaded
    (:func:`hf_freeze.apply.adopt_fingerprint`).
    """
    folder = Path(checkpoint)
    path = folder / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        recorded = Fingerprint({str(n): str(d) for n, d in data["digests"].items()}, int(data["scheme"]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FreezePolicyError(f"cannot resume from {checkpoint}: its {FINGERPRINT_FILE} is unreadable ({e}); resume "
                                "from another checkpoint, or delete the file to verify against the weights in memory "
                                "instead") from None
    saved = _saved_digests(folder, recorded)
    changed = sorted(n for n, d in saved.items() if d != recorded.digests[n])
    if changed:
        raise FrozenWeightsChanged(changed, f"in {checkpoint} since it was saved (its weights differ from the fingerprint "
                                   f"in its {FINGERPRINT_FILE}: the checkpoint was edited or corrupted); nothing was "
                                   "loaded. Resume from another checkpoint")
    return recorded


def _saved_digests(folder: Path, recorded: Fingerprint) -> dict[str, str]:
    """Digests of the recorded tensors that ``folder``'s safetensors weights hold, read one tensor at a time."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text()).get("weight_map", {})
    elif (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            where = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        return {}
    out = {}
    for file in sorted({where[n] for n in recorded.digests if n in where}):
        with safe_open(str(folder / file), "pt") as f:
            for n in sorted(n for n in recorded.digests if where.get(n) == file):
                out[n] = digests({n: f.get_tensor(n)}, recorded.scheme)[n]
    return out


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` folders in ``output_dir``, newest (highest N) first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: str | os.PathLike, needs_optimizer: bool = True) -> Path:
    """The newest complete ``checkpoint-N`` in ``output_dir``; each newer incomplete one is skipped with a warning.

    Raises ValueError naming every broken folder and what is wrong with it when none is complete (or when there
    is no checkpoint at all).
    """
    skipped = []
    for folder in checkpoints(output_dir):
        problem = checkpoint_problem(folder, needs_optimizer)
        if problem is None:
            for name, why in skipped:
                logger.warning("hf_freeze: not resuming from %s, which is incomplete (%s); resuming from %s",
                               name, why, folder)
            return folder
        skipped.append((str(folder), problem))
    if not skipped:
        raise ValueError(f"resume_from_checkpoint=True: no checkpoint-N folder in {output_dir}")
    raise ValueError(f"resume_from_checkpoint=True: no complete checkpoint in {output_dir}: "
                     + "; ".join(f"{name}: {why}" for name, why in skipped)
                     + ". Resume from another folder (resume_from_checkpoint=PATH) or start again.")
