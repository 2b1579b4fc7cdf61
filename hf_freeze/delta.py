"""Delta checkpoints: save only the tensors that were trained, rebuild the full model from its base.

A delta folder holds ``config.json`` (the fine-tuned config, policy included), ``freeze_delta.safetensors``
(every tensor of the state dict that is *not* a still-frozen, fingerprinted tensor of the base: the head,
unfrozen groups, BatchNorm statistics that kept updating, frozen tensors the base checkpoint does not hold) and
``freeze_delta.json`` (:class:`DeltaManifest`: the base model's repo id or folder, its revision, and the
fingerprint of the frozen tensors).

    hf_freeze.save_delta(model, "out")                 # after training with a policy applied
    model = hf_freeze.from_pretrained("user/my-model")  # loads the base, checks the fingerprint, applies the delta

The fingerprint (BLAKE2b per tensor, see :mod:`hf_freeze.fingerprint`) makes the rebuild exact or loud: if the
base checkpoint no longer holds bit-identical frozen tensors, :class:`BaseModelChanged` names them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from huggingface_hub import snapshot_download, try_to_load_from_cache
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig

from .adapters import load_adapter, save_adapter
from .apply import verify_frozen
from .fingerprint import Fingerprint, is_sharded, named_tensors
from .folder import (
    ADAPTER_BASE,
    ADAPTER_FILES,
    CONFIG_FILE,
    DELTA_MANIFEST,
    DELTA_WEIGHTS,
    FULL_WEIGHTS,
    HEAD_CONFIG_CODE,
    HEAD_MODELING_CODE,
    POLICY_FILE,
    has_full_weights,
    is_adapter,
    is_delta,
    record_in_config,
    staged,
    write_policy,
)
from .heads import install_head, installed_head, with_head
from .loading import classifier_class, folder_config
from .names import unwrap_model
from .state import require_state

DELTA_FORMAT = "hf_freeze.delta"
DELTA_VERSION = 2  # the manifest version is the fingerprint scheme of its digests (1 and 2 both load)
_SNAPSHOT = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\](?P<sha>[0-9a-f]{40})")


class BaseModelChanged(RuntimeError):
    """The base model a delta refers to no longer holds the frozen tensors the delta was trained on."""

    def __init__(self, base: str, revision: str | None, changed: list[str], total: int):
        self.base, self.revision, self.changed = base, revision, list(changed)
        shown = ", ".join(self.changed[:5]) + (f", ... ({len(self.changed) - 5} more)" if len(self.changed) > 5 else "")
        at = f" at revision {revision}" if revision else " (no revision recorded: its latest version was used)"
        super().__init__(
            f"base model {base!r}{at} does not match the delta's fingerprint: {len(self.changed)} of {total} frozen "
            f"tensors differ or are missing ({shown}). The delta was trained on other weights; load it with the "
            f"original base (from_pretrained(..., base_model=PATH_OR_ID, base_revision=SHA)) or use a full checkpoint.")


@dataclass
class DeltaManifest:
    """What a delta needs besides its tensors: where the base is, and what its frozen tensors must hash to."""

    base_model: str
    base_revision: str | None
    frozen_digests: dict[str, str]
    trained_tensors: list[str]
    dtype: str = "float32"
    format: str = DELTA_FORMAT
    #: 2: digests of :mod:`hf_freeze.fingerprint` scheme 2 (split-independent); 1: scheme 1 (hf_freeze <= 0.1)
    version: int = DELTA_VERSION
    fingerprint: str = field(default="")

    def __post_init__(self):
        self.fingerprint = self.frozen_fingerprint().combined()

    def frozen_fingerprint(self) -> Fingerprint:
        """The frozen tensors' digests, under the fingerprint scheme this manifest version uses."""
        return Fingerprint(dict(self.frozen_digests), scheme=self.version)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["frozen_digests"] = dict(sorted(d["frozen_digests"].items()))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DeltaManifest:
        if d.get("format") != DELTA_FORMAT:
            raise ValueError(f"not a hf_freeze delta manifest (format={d.get('format')!r}, expected {DELTA_FORMAT!r})")
        if d.get("version", 1) not in (1, DELTA_VERSION):
            raise ValueError(f"delta manifest version {d['version']!r} is not one this hf_freeze understands "
                             f"(1..{DELTA_VERSION}); upgrade hf_freeze")
        d.setdefault("version", 1)
        recorded = d.pop("fingerprint", "")
        manifest = cls(**d)
        if recorded and recorded != manifest.fingerprint:
            raise ValueError("delta manifest is corrupt: its combined fingerprint does not match its digests")
        return manifest

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / DELTA_MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> DeltaManifest:
        return cls.from_dict(json.loads((Path(folder) / DELTA_MANIFEST).read_text()))


# --------------------------------------------------------------------------- what goes into a delta
def delta_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state-dict tensors that are not frozen tensors of the base (contiguous CPU copies): what a delta holds.

    ``state_dict``: one already gathered (the Trainer passes it for sharded models); default ``model.state_dict()``.
    """
    model = unwrap_model(model)
    from_base = frozen_from_base(model)
    source = model.state_dict() if state_dict is None else state_dict
    return {n: t.detach().cpu().contiguous() for n, t in source.items() if n not in from_base}


#: set on the tensors :func:`apply_delta` writes: their values are the delta's, not the base checkpoint's
FROM_DELTA = "_hf_freeze_from_delta"


def not_from_checkpoint(model: nn.Module) -> set[str]:
    """State-dict names whose values the base checkpoint does not hold: tensors ``from_pretrained`` initialised anew
    (missing from the checkpoint, or resized by ``ignore_mismatched_sizes``: transformers marks the tensors it read
    with ``_is_hf_initialized``), tensors added after loading and tensors a delta wrote (:func:`apply_delta`).

    Empty when no tensor carries the mark (a model built from its config, or sharded after loading): then every
    frozen tensor is taken to be the base's, and :func:`apply_delta` checks that against the fingerprint.
    """
    tensors = unwrap_model(model).state_dict(keep_vars=True)
    read = {n for n, t in tensors.items() if getattr(t, "_is_hf_initialized", False) and not getattr(t, FROM_DELTA, False)}
    return set(tensors) - read if read else set()


def frozen_from_base(model: nn.Module) -> set[str]:
    """The frozen, fingerprinted tensors a delta leaves out: those the base checkpoint holds. A frozen tensor it
    does not hold (a new head the user froze, a weight missing from the base checkpoint) goes into the delta."""
    return set(require_state(model).fingerprint.digests) - not_from_checkpoint(model)


def base_reference(model: nn.Module, base_model: str | None = None, base_revision: str | None = None) -> tuple[str, str | None]:
    """(repo id or folder, revision) of the checkpoint ``model`` was loaded from.

    Default: ``config._name_or_path``. A Hugging Face cache snapshot folder becomes its repo id and commit; a repo
    id gets the commit its cached ``main`` points to (the one ``from_pretrained`` just used), when known.
    """
    name = base_model or getattr(getattr(unwrap_model(model), "config", None), "_name_or_path", "") or ""
    if not name:
        raise ValueError("cannot tell which base model this model was loaded from (config._name_or_path is empty); "
                         "pass base_model='org/name' (a Hub repo id) or a local folder")
    snap = _SNAPSHOT.search(str(Path(name).resolve())) if os.path.isdir(name) else None
    if snap:
        return f"{snap['org']}/{snap['name']}", base_revision or snap["sha"]
    if os.path.isdir(name):
        return str(Path(name).resolve()), base_revision
    return name, base_revision or _cached_commit(name)


def _cached_commit(repo_id: str) -> str | None:
    try:
        path = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repo id: nothing cached
        return None
    snap = _SNAPSHOT.search(str(path)) if isinstance(path, str) else None
    return snap["sha"] if snap else None


# --------------------------------------------------------------------------- saving
def save_delta(model: nn.Module, output_dir: str | os.PathLike, *, base_model: str | None = None,
               base_revision: str | None = None, save_config: bool = True,
               state_dict: dict[str, torch.Tensor] | None = None) -> DeltaManifest:
    """Write the delta of ``model`` (which must carry a freeze policy) to ``output_dir``.

    Checks first that every frozen tensor is still bit-identical to its fingerprint (``FrozenWeightsChanged``
    otherwise: the delta would silently drop a change). Full-weight files left in the folder by an earlier save
    are removed, so the folder holds exactly one kind of checkpoint. With an adapter policy the delta is the adapter
    folder (``model`` must be the ``peft.PeftModel``): adapter files, ``freeze_policy.json``, the fine-tuned config
    and :func:`save_adapter_base`'s record of the base; the returned manifest lists no tensors.
    """
    state = require_state(model)
    if state.adapter is not None:
        if not hasattr(model, "peft_config"):
            raise ValueError("this model trains a PEFT adapter: pass the peft.PeftModel to save_delta (its delta is "
                             "the adapter folder)")
        verify_frozen(model, "before saving a delta checkpoint")
        save_adapter(model, output_dir)
        config = getattr(unwrap_model(model), "config", None)
        if save_config and config is not None:
            record_in_config(config, state.policy)
            config.save_pretrained(output_dir)
        return save_adapter_base(model, output_dir, base_model=base_model, base_revision=base_revision)
    model = unwrap_model(model)
    if state_dict is None and any(is_sharded(t) for t in named_tensors(model).values()):
        raise ValueError("the model is sharded (FSDP2): pass the full state dict gathered to this rank, e.g. "
                         "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
                         "full_state_dict=True, cpu_offload=True)) (Trainer.save_model does this)")
    # a gathered state dict (sharded model, rank 0 alone): check the frozen tensors in it, no collective
    verify_frozen(model, "before saving a delta checkpoint", state_dict=state_dict)
    base, revision = base_reference(model, base_model, base_revision)
    tensors = delta_state_dict(model, state_dict)
    frozen = {n: d for n, d in state.fingerprint.digests.items() if n not in tensors}
    dtypes = {str(t.dtype).removeprefix("torch.") for n, t in named_tensors(model).items() if n in frozen and t.is_floating_point()}
    manifest = DeltaManifest(base, revision, frozen, sorted(tensors), dtype=",".join(sorted(dtypes)) or "float32")
    config = getattr(model, "config", None)
    # a failed write leaves the folder as it was; a delta folder carries no head code (plain transformers cannot load it)
    with staged(Path(output_dir), replaces=(*FULL_WEIGHTS, HEAD_CONFIG_CODE, HEAD_MODELING_CODE)) as tmp:
        save_file(tensors, tmp / DELTA_WEIGHTS, metadata={"format": "pt", "hf_freeze": DELTA_FORMAT,
                                                         "base_model": base, "fingerprint": manifest.fingerprint})
        manifest.save(tmp)
        write_policy(tmp, state.policy)
        if save_config and config is not None:
            record_in_config(config, state.policy)
            config.save_pretrained(tmp)
    return manifest


def save_adapter_base(model: nn.Module, output_dir: str | os.PathLike, *, base_model: str | None = None,
                      base_revision: str | None = None) -> DeltaManifest:
    """Make an adapter folder the delta of its run: record the base it applies to and what the base must hold.

    An adapter run trains only the adapter and whole copies of some modules (``modules_to_save``); the folder
    ``PeftModel.save_pretrained`` writes is already "only what was trained". This adds ``freeze_adapter_base.json``
    (a :class:`DeltaManifest` without tensors: base repo id or folder, revision, fingerprints of every base tensor
    the adapter relies on, i.e. all but the originals of the modules saved whole) and points ``adapter_config.json``
    at the same base. :func:`from_pretrained` loads the base, checks the fingerprints, then the adapter.
    """
    state = require_state(model)
    if state.adapter is None:
        raise ValueError("save_adapter_base needs a model trained with an adapter policy; use save_delta")
    verify_frozen(model, "before saving an adapter delta")
    base, revision = base_reference(model, base_model, base_revision)
    saved = state.adapter.modules_to_save
    frozen = {n: d for n, d in state.fingerprint.digests.items()
              if not any(n == m or n.startswith(f"{m}.") for m in saved)}
    dtypes = {str(t.dtype).removeprefix("torch.") for n, t in named_tensors(model).items() if n in frozen and t.is_floating_point()}
    manifest = DeltaManifest(base, revision, frozen, [], dtype=",".join(sorted(dtypes)) or "float32")
    out = Path(output_dir)
    (out / ADAPTER_BASE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    config_path = out / ADAPTER_FILES[0]
    peft_config = json.loads(config_path.read_text())
    peft_config.update(base_model_name_or_path=base, revision=revision)
    config_path.write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    return manifest


# --------------------------------------------------------------------------- loading
def apply_delta(model: nn.Module, folder: str | os.PathLike, manifest: DeltaManifest | None = None,
                *, loaded_from: tuple[str, str | None] | None = None) -> nn.Module:
    """Check ``model``'s frozen tensors against the delta's fingerprint, then load the delta tensors into it.

    ``loaded_from``: (base, revision) ``model`` was read from, for the error message (default: the manifest's).
    """
    model = unwrap_model(model)
    manifest = manifest or DeltaManifest.load(folder)
    changed = manifest.frozen_fingerprint().changed(model)  # a collective on a sharded model: every rank calls
    if changed:
        base, revision = loaded_from or (manifest.base_model, manifest.base_revision)
        raise BaseModelChanged(base, revision, changed, len(manifest.frozen_digests))
    tensors = load_file(Path(folder) / DELTA_WEIGHTS)
    if sorted(tensors) != manifest.trained_tensors:
        raise ValueError(f"{folder}: {DELTA_WEIGHTS} does not hold the tensors its manifest lists")
    if any(is_sharded(t) for t in model.state_dict().values()):
        # FSDP2: every rank read the full delta; torch scatters it into the local shards
        # only a sharded model gets here: torch.distributed.checkpoint takes seconds to import
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        result = set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        result = model.load_state_dict(tensors, strict=False)
    live = model.state_dict(keep_vars=True)
    for name in tensors:  # their values are no longer the base's: a later delta must carry them
        if name in live:
            setattr(live[name], FROM_DELTA, True)
    uncovered = set(model.state_dict()) - set(tensors) - set(manifest.frozen_digests)
    if result.unexpected_keys or uncovered:
        raise ValueError(f"delta in {folder} does not fit {type(model).__name__}: unexpected "
                         f"{sorted(result.unexpected_keys)[:5]}, neither frozen nor in the delta {sorted(uncovered)[:5]}")
    return model


def from_pretrained(repo_or_dir: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None,
                    base_model: str | None = None, base_revision: str | None = None, **kwargs) -> nn.Module:
    """Load a model saved by hf_freeze: a delta (rebuilt on its base), a PEFT adapter folder, or a full checkpoint.

    ``repo_or_dir``: a local folder or a Hub repo id (downloaded at ``revision``). For a delta (or an adapter saved
    with ``save_delta``), ``base_model`` / ``base_revision`` override where the base is read from (e.g. a local
    copy); the fingerprint check still applies.
    Extra ``kwargs`` go to the ``from_pretrained`` that loads the weights.
    """
    folder = _local_folder(repo_or_dir, revision, token)
    if is_delta(folder):
        return _load_delta(folder, token, base_model, base_revision, **kwargs)
    if is_adapter(folder):
        return _load_adapter(folder, token, base_model, base_revision, **kwargs)
    if not has_full_weights(folder):
        raise FileNotFoundError(f"{repo_or_dir} holds no model: expected {DELTA_MANIFEST} (hf_freeze delta), "
                                f"{ADAPTER_FILES[0]} (PEFT adapter) or model.safetensors (full checkpoint)")
    # config attributes among kwargs (num_labels=..., id2label=...) go to the config, as transformers does when it
    # reads the config itself; the rest (dtype, ignore_mismatched_sizes, ...) to the loading
    config = folder_config(folder)
    config, kwargs = type(config).from_dict(config.to_dict(), return_unused_kwargs=True, **kwargs)
    cls = classifier_class(config)
    if installed_head(config) is not None:  # a task-specific head: built in __init__, then loaded with the rest
        cls = with_head(cls)
    return cls.from_pretrained(folder, config=config, **kwargs)


def _local_folder(repo_or_dir, revision, token) -> Path:
    if os.path.isdir(repo_or_dir):
        return Path(repo_or_dir)
    return Path(snapshot_download(str(repo_or_dir), revision=revision, token=token,
                                  ignore_patterns=["checkpoint-*", "last-checkpoint/*", "*.png", "training_args.bin"]))


def _load_base(folder: Path, manifest: DeltaManifest, token=None, base_model=None, base_revision=None, **kwargs):
    """(the base model a delta refers to, with the delta's config; where it was read from)."""
    base = base_model or manifest.base_model
    revision = base_revision if base_model or base_revision else manifest.base_revision
    config = folder_config(folder)
    kwargs.setdefault("dtype", getattr(torch, manifest.dtype.split(",")[0], None))
    model = classifier_class(config).from_pretrained(base, config=config, revision=revision, token=token,
                                                     ignore_mismatched_sizes=True, **kwargs)
    install_head(model, installed_head(config))  # its tensors come with the delta
    return model, (base, revision)


def _load_delta(folder: Path, token, base_model, base_revision, **kwargs) -> nn.Module:
    manifest = DeltaManifest.load(folder)
    model, loaded_from = _load_base(folder, manifest, token, base_model, base_revision, **kwargs)
    return apply_delta(model, folder, manifest, loaded_from=loaded_from)


def apply_delta_restoring_base(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """:func:`apply_delta` to a model that trained on after the delta was saved (``load_best_model_at_end``).

    Tensors the delta records as frozen but that ``model`` no longer holds (groups unfrozen after this checkpoint)
    are read back from the base model first; the fingerprint check of :func:`apply_delta` then still applies.
    """
    model = unwrap_model(model)
    manifest = DeltaManifest.load(folder)
    changed = manifest.frozen_fingerprint().changed(model)
    if changed:
        base, _ = _load_base(Path(folder), manifest)
        source, target = named_tensors(base), named_tensors(model)
        with torch.no_grad():
            for name in changed:
                if name in source and name in target:
                    target[name].copy_(source[name])
    return apply_delta(model, folder, manifest)


def _load_adapter(folder: Path, token, base_model=None, base_revision=None, **kwargs) -> nn.Module:
    """A PEFT adapter folder: its base with the fine-tuned config when present, then the adapter.

    With ``freeze_adapter_base.json`` (an adapter saved with ``save_delta``) the base comes from there and its
    tensors are checked against the recorded fingerprints (:class:`BaseModelChanged` otherwise). With
    ``freeze_policy.json`` the adapter is loaded by :func:`hf_freeze.load_adapter` (policy applied again).
    """
    try:
        from peft import PeftConfig, PeftModel  # optional dependency: only adapter folders need it
    except ImportError as e:  # pragma: no cover - peft is an optional dependency
        raise ImportError(f"{folder} holds a PEFT adapter: pip install 'hf_freeze[peft]' to load it") from e
    peft_config = PeftConfig.from_pretrained(folder)
    manifest = DeltaManifest.from_dict(json.loads((folder / ADAPTER_BASE).read_text())) \
        if (folder / ADAPTER_BASE).is_file() else None
    base = base_model or (manifest.base_model if manifest else peft_config.base_model_name_or_path)
    revision = base_revision if base_model or base_revision else \
        (manifest.base_revision if manifest else peft_config.revision)
    if manifest is not None:
        kwargs.setdefault("dtype", getattr(torch, manifest.dtype.split(",")[0], None))
    config = folder_config(folder) if (folder / CONFIG_FILE).is_file() else AutoConfig.from_pretrained(base)
    model = classifier_class(config).from_pretrained(base, config=config, revision=revision, token=token,
                                                     ignore_mismatched_sizes=True, **kwargs)
    if manifest is not None:
        changed = manifest.frozen_fingerprint().changed(model)
        if changed:
            raise BaseModelChanged(base, revision, changed, len(manifest.frozen_digests))
    if (folder / POLICY_FILE).is_file():
        return load_adapter(model, folder)
    return PeftModel.from_pretrained(model, folder)
