"""What a saved hf_freeze folder contains: the file names, the policy in it, the files that travel with a checkpoint.

A folder saved with a freeze policy holds the model in one of three kinds (:func:`checkpoint_kind`): full weights,
an hf_freeze delta (:mod:`hf_freeze.delta`) or a PEFT adapter; beside them ``freeze_policy.json`` and the same
policy under ``freeze_policy`` in ``config.json``. Every save path writes the policy through :func:`write_policy`
(``FreezeCallback.on_save``, the ``save_pretrained`` that ``Trainer.save_model`` calls, ``FreezeTrainer._save``,
``save_delta``, ``save_adapter``, ``FreezePolicy.save_pretrained``) and a push during training copies
:data:`TRAVELS` from the checkpoint. Plain file names and ``pathlib``: no model needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: the freeze policy of the folder (``FreezePolicy.to_json``)
POLICY_FILE = "freeze_policy.json"
#: in each checkpoint ``FreezeCallback.on_save`` writes: the fingerprint of the frozen tensors it verified at that save
#: (:func:`hf_freeze.checkpoints.resume_fingerprint` checks a resumed checkpoint against it)
FINGERPRINT_FILE = "freeze_fingerprint.json"
#: the key of the same policy in the model's ``config.json`` (so ``from_pretrained`` users see it)
CONFIG_KEY = "freeze_policy"
CONFIG_FILE = "config.json"
#: a delta checkpoint: the trained tensors and the manifest (base model, fingerprint of the frozen tensors)
DELTA_WEIGHTS = "freeze_delta.safetensors"
DELTA_MANIFEST = "freeze_delta.json"
#: beside an adapter saved as the delta of its run: the base it applies to and the fingerprint of the base tensors
ADAPTER_BASE = "freeze_adapter_base.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
#: the model card and its plot (:mod:`hf_freeze.model_card`)
CARD_FILE = "README.md"
PLOT_FILE = "training_curves.png"
#: a model with a task-specific head (:mod:`hf_freeze.heads`): the Hub's custom-code convention, so plain transformers
#: rebuilds the head (``trust_remote_code=True``): the config key recording it, the custom model type, the files
HEAD_KEY = "hf_freeze_head"
HEAD_MODEL_TYPE = "hf_freeze_head-{base}"
HEAD_CONFIG_CODE = "configuration_hf_freeze_head.py"
HEAD_MODELING_CODE = "modeling_hf_freeze_head.py"
HEAD_CONFIG_CLASS = "HFFreezeHeadConfig"
HEAD_MODEL_CLASS = "HFFreezeHeadForImageClassification"
#: what hf_freeze writes beside a checkpoint's weights: copied to the output folder when a checkpoint is pushed
TRAVELS = (POLICY_FILE, DELTA_MANIFEST, DELTA_WEIGHTS, ADAPTER_BASE, HEAD_CONFIG_CODE, HEAD_MODELING_CODE)


# --------------------------------------------------------------------------- the policy in a folder
def write_policy(folder: str | os.PathLike, policy) -> Path:
    """Write ``policy`` (a FreezePolicy) as ``folder/freeze_policy.json``; returns the file. A full-weight folder
    whose model carries a task-specific head gets the custom code that rebuilds it (:func:`write_head_code`)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    path = out / POLICY_FILE
    _write_atomically(path, policy.to_json() + "\n")
    write_head_code(out)
    return path


def write_fingerprint(folder: str | os.PathLike, digests: dict[str, str], scheme: int) -> Path:
    """Record the frozen tensors' ``digests`` (fingerprint ``scheme``) as ``folder/freeze_fingerprint.json``, atomically:
    a crash leaves no half-written record. Returns the file."""
    path = Path(folder) / FINGERPRINT_FILE
    _write_atomically(path, json.dumps({"scheme": scheme, "digests": digests}, indent=1, sort_keys=True) + "\n")
    return path


# --------------------------------------------------------------------------- a task-specific head that travels
_CONFIG_CODE = '''"""Written by hf_freeze: the config of {base_class} with a task-specific head (its spec: `{key}`)."""

from transformers import {base_config}


class {config_class}({base_config}):
    model_type = "{model_type}"
'''

_MODELING_CODE = '''

# ---- written by hf_freeze: {base_class} with the head above in place of its classifier
from transformers import {base_class}

from .{config_module} import {config_class}


class {model_class}({base_class}):
    config_class = {config_class}

    def __init__(self, config):
        super().__init__(config)
        install_heads(self, config.{key})
'''


def head_spec_of(config: dict) -> dict | None:
    """The head a config dict records (None: none)."""
    spec = config.get(HEAD_KEY)
    return spec if isinstance(spec, dict) and spec.get("base_model_type") else None


def head_model_type(spec: dict) -> str:
    """The custom model type of a folder whose model carries the head ``spec`` (``hf_freeze_head-<type>``)."""
    return HEAD_MODEL_TYPE.format(base=spec["base_model_type"])


#: the ``auto_map`` of a folder whose model carries a head: transformers builds the classes from the folder's code
HEAD_AUTO_MAP = {"AutoConfig": f"{HEAD_CONFIG_CODE.removesuffix('.py')}.{HEAD_CONFIG_CLASS}",
                 "AutoModelForImageClassification": f"{HEAD_MODELING_CODE.removesuffix('.py')}.{HEAD_MODEL_CLASS}"}


def write_head_files(folder: str | os.PathLike, spec: dict) -> list[str]:
    """Write the two code files that rebuild the head ``spec`` (the config and model classes) into ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    values = dict(base_class=spec["base_class"], base_config=spec["base_config"],
                  config_class=HEAD_CONFIG_CLASS, model_class=HEAD_MODEL_CLASS, key=HEAD_KEY,
                  config_module=HEAD_CONFIG_CODE.removesuffix(".py"), model_type=head_model_type(spec))
    head_source = (Path(__file__).with_name("_head_module.py")).read_text()
    _write_atomically(out / HEAD_CONFIG_CODE, _CONFIG_CODE.format(**values))
    _write_atomically(out / HEAD_MODELING_CODE, head_source + _MODELING_CODE.format(**values))
    return [HEAD_CONFIG_CODE, HEAD_MODELING_CODE]


def _write_atomically(path: Path, text: str) -> None:
    """``path`` holds either its old content or ``text``, never a part (a crash or a full disk mid-write). The
    temporary file is this process's own: two processes writing the same file (ranks saving one checkpoint) never
    rename or delete each other's (a shared name failed one rank with FileNotFoundError, and the other rank then
    waited forever in the next collective)."""
    tmp = path.with_name(f".{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_head_code(folder: str | os.PathLike) -> list[str]:
    """Make a full-weight folder whose ``config.json`` records a head loadable by plain transformers.

    ``config.json`` gets a model type of its own (``hf_freeze_head-<type>``, which transformers cannot map without
    the folder's code: it refuses instead of building the original classifier with a re-initialised head) and an
    ``auto_map`` to two small files written beside it: a config class and a model class subclassing the original
    transformers classes, whose ``__init__`` installs the head (the source of :mod:`hf_freeze._head_module`, copied).
    A folder without full weights (a delta, an adapter) keeps the original type; stale code files are removed.
    The code files are written before ``config.json`` names them, each file atomically. Returns the files written.
    """
    out = Path(folder)
    config_path = out / CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    spec = head_spec_of(config)
    if spec is None or not has_full_weights(out) or is_delta(out):
        if spec is not None and config.get("model_type") != spec["base_model_type"]:
            _write_atomically(config_path, json.dumps(original_config(config), indent=2, sort_keys=True) + "\n")
        for name in (HEAD_CONFIG_CODE, HEAD_MODELING_CODE):
            (out / name).unlink(missing_ok=True)
        return []
    written = write_head_files(out, spec)
    config.update(model_type=head_model_type(spec), auto_map=dict(HEAD_AUTO_MAP))
    _write_atomically(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [*written, CONFIG_FILE]


def original_config(config: dict) -> dict:
    """A config dict written by :func:`write_head_code` as the original architecture's (its type, no auto_map)."""
    spec = head_spec_of(config)
    if spec is None:
        return config
    return {**{k: v for k, v in config.items() if k != "auto_map"}, "model_type": spec["base_model_type"]}


def record_in_config(config, policy) -> None:
    """Put ``policy`` under ``freeze_policy`` in a model config (None: nothing to do), for ``config.json``."""
    if config is not None:
        setattr(config, CONFIG_KEY, policy.to_dict())


def policy_in_config(config) -> dict | None:
    """The policy dict a model config records (None: it records none)."""
    recorded = getattr(config, CONFIG_KEY, None)
    return recorded if isinstance(recorded, dict) else None


def policy_dict(path: str | os.PathLike) -> dict:
    """The dict in ``freeze_policy.json`` of a folder (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / POLICY_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no {POLICY_FILE} at {path}")
    return json.loads(p.read_text())


def recorded_policy_dict(folder: str | os.PathLike) -> dict:
    """The policy a model folder was saved with: ``freeze_policy.json``, else ``config.json``'s ``freeze_policy``."""
    p = Path(folder)
    if (p / POLICY_FILE).is_file():
        return policy_dict(p)
    config = json.loads((p / CONFIG_FILE).read_text())
    if CONFIG_KEY not in config:
        raise FileNotFoundError(f"{folder} has no {POLICY_FILE} and no '{CONFIG_KEY}' in {CONFIG_FILE}")
    return config[CONFIG_KEY]


# --------------------------------------------------------------------------- which kind of checkpoint
def is_delta(folder: str | os.PathLike) -> bool:
    return (Path(folder) / DELTA_MANIFEST).is_file()


def is_adapter(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ADAPTER_FILES[0]).is_file()


def has_full_weights(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / name).is_file() for name in FULL_WEIGHTS)


def checkpoint_kind(folder: str | os.PathLike) -> str:
    """``"delta"``, ``"adapter"`` or ``"full"``; FileNotFoundError naming the expected files otherwise."""
    f = Path(folder)
    if (f / DELTA_MANIFEST).is_file() and (f / DELTA_WEIGHTS).is_file():
        return "delta"
    if all((f / name).is_file() for name in ADAPTER_FILES):
        return "adapter"
    if has_full_weights(f) and (f / CONFIG_FILE).is_file():
        return "full"
    raise FileNotFoundError(
        f"{folder} is not a complete model folder: expected {CONFIG_FILE} + model.safetensors (full), "
        f"{DELTA_MANIFEST} + {DELTA_WEIGHTS} (hf_freeze delta) or {' + '.join(ADAPTER_FILES)} (PEFT adapter)")


def remove_weights(folder: Path, names) -> list[str]:
    """Delete weight files (and the shards an index lists) of one checkpoint kind from ``folder``."""
    removed = []
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            for shard in set(json.loads(path.read_text()).get("weight_map", {}).values()):
                (folder / shard).unlink(missing_ok=True)
                removed.append(shard)
        path.unlink()
        removed.append(name)
    return removed


@contextlib.contextmanager
def staged(folder: Path, replaces=()) -> Iterator[Path]:
    """Write a checkpoint into a temporary folder inside ``folder``; swap it in only when every write succeeded.

    On success its files replace those of the same name in ``folder``, then the weight files ``replaces`` names (another
    checkpoint kind) are removed; on failure (disk full, ...) ``folder`` keeps what it held. The temporary folder
    is removed either way.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hf_freeze-saving-", dir=folder))
    try:
        yield tmp
        for path in sorted(tmp.iterdir()):
            os.replace(path, folder / path.name)
        remove_weights(folder, replaces)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
