"""Push and pull through the real huggingface_hub client and a loopback Hub (tests/hub_server.py).

Full, delta and adapter checkpoints go up through the Trainer's own push path or ``hf_freeze.push_folder``, come
back by repo id and give identical logits; the pushed README parses with ``ModelCard.load``; a push that fails
mid-way leaves the local folder intact and a retry succeeds.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_hub import local_hub  # noqa: F401  (fixture)
from helpers import TinyImages, tiny_model, training_args
from huggingface_hub import ModelCard
from transformers import AutoModelForImageClassification

import hf_freeze
from hf_freeze import BaseModelChanged, FreezeTrainer, PushFailed
from hf_freeze.folder import DELTA_MANIFEST, DELTA_WEIGHTS

POLICY = "freeze=backbone;unfreeze=step3:1@0.5"
IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def hub(local_hub):  # noqa: F811
    yield local_hub
    assert local_hub.unhandled == [] and local_hub.errors == []


@pytest.fixture
def base_id(hub):
    """A tiny ResNet pushed as the 'pretrained' base ``test-user/tiny-base``."""
    tiny_model("resnet", seed=3).push_to_hub("tiny-base")
    return f"{hub.user}/tiny-base"


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=IMAGES).logits


def accuracy(pred):
    return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}


def make_trainer(base_id, tmp_path, **kw):
    model = AutoModelForImageClassification.from_pretrained(base_id)
    args = training_args(tmp_path, num_train_epochs=1, eval_strategy="epoch", **kw)
    return FreezeTrainer(model=model, args=args, train_dataset=TinyImages(), eval_dataset=TinyImages(n=16, seed=1),
                         compute_metrics=accuracy, freeze_policy=POLICY)


def pushed(hub, repo) -> dict[str, bytes]:
    """The repo's files at main, without the .gitattributes every new repo starts with."""
    return {k: v for k, v in hub.files(repo).items() if k != ".gitattributes"}


def files_in(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_trainer_push_to_hub_full_model_card_policy_and_reload(hub, base_id, tmp_path):
    trainer = make_trainer(base_id, tmp_path, hub_model_id="tiny-ft")
    trainer.train()
    trainer.push_to_hub(dataset="tiny_images", license="apache-2.0")
    repo = f"{hub.user}/tiny-ft"
    remote = pushed(hub, repo)
    assert {"README.md", "training_curves.png", "freeze_policy.json", "config.json", "model.safetensors"} <= set(remote)
    assert not any(name.startswith("checkpoint-") for name in remote)
    local = files_in(tmp_path / "out")
    assert remote == local  # byte for byte the local output folder
    assert json.loads(remote["config.json"])["freeze_policy"] == trainer.freeze_policy.to_dict()
    assert hf_freeze.FreezePolicy.from_dict(json.loads(remote["freeze_policy.json"])) == trainer.freeze_policy

    card = ModelCard.load(repo)  # over HTTP, like any Hub user
    data = card.data.to_dict()
    assert data["base_model"] == base_id and data["base_model_relation"] == "finetune"
    assert data["library_name"] == "transformers" and "hf_freeze" in data["tags"] and data["datasets"] == ["tiny_images"]
    last_eval = [h for h in trainer.state.log_history if "eval_accuracy" in h][-1]
    assert card.data.eval_results[0].metric_value == pytest.approx(last_eval["eval_accuracy"])
    assert card.data.model_name == "tiny-ft" and data["hf_freeze"]["preserved"] is True
    assert "unfrozen at step 3" in card.text and f"[{base_id}](https://huggingface.co/{base_id})" in card.text

    for reloaded in (hf_freeze.from_pretrained(repo), AutoModelForImageClassification.from_pretrained(repo)):
        assert torch.equal(logits(reloaded), logits(trainer.model))


def test_delta_pushed_during_and_after_training_rebuilds_from_the_base(hub, base_id, tmp_path):
    trainer = make_trainer(base_id, tmp_path, save_delta=True, push_to_hub=True, hub_model_id="tiny-delta",
                           save_strategy="steps", save_steps=2, hub_strategy="every_save")
    trainer.train()
    trainer.push_to_hub()
    repo = f"{hub.user}/tiny-delta"
    titles = [c.title for c in hub.commits(repo)]
    assert titles[0] == "End of training" and "Training in progress, step 2" in titles
    mid = next(c for c in hub.commits(repo) if c.title == "Training in progress, step 2")
    mid_files = hub.files(repo, revision=mid.oid)
    assert {DELTA_WEIGHTS, DELTA_MANIFEST, "freeze_policy.json", "README.md", "config.json"} <= set(mid_files)
    remote = hub.files(repo)
    assert "model.safetensors" not in remote and "model.safetensors" not in mid_files
    manifest = json.loads(remote[DELTA_MANIFEST])
    assert manifest["base_model"] == base_id and manifest["base_revision"] == hub.refs(base_id)["refs/heads/main"]
    card = ModelCard.load(repo)
    assert card.data.library_name == "hf_freeze" and card.data.base_model == base_id
    assert "delta-checkpoint" in card.data.tags and 'hf_freeze.from_pretrained("test-user/tiny-delta")' in card.text

    rebuilt = hf_freeze.from_pretrained(repo)
    assert torch.equal(logits(rebuilt), logits(trainer.model))
    # the base moves on: the delta stays pinned to the commit it was trained on ...
    changed = tiny_model("resnet", seed=4)
    changed.push_to_hub("tiny-base")
    assert torch.equal(logits(hf_freeze.from_pretrained(repo)), logits(trainer.model))
    # ... and loading it on the new weights is refused, naming what differs
    with pytest.raises(BaseModelChanged, match=r"'test-user/tiny-base' at revision main does not match"):
        hf_freeze.from_pretrained(repo, base_revision="main")


def test_a_failed_push_keeps_the_output_and_a_retry_succeeds(hub, base_id, tmp_path, monkeypatch):
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(http, "time", types.SimpleNamespace(sleep=lambda s: None))  # keep the 5 retries, skip waits
    trainer = make_trainer(base_id, tmp_path, hub_model_id="tiny-retry")
    trainer.train()
    out, repo = tmp_path / "out", f"{hub.user}/tiny-retry"
    first = None
    # a server error that outlasts upload_folder's retries, then a lost connection (6 tries each)
    for failure, cause in (({"status": 500}, "HfHubHTTPError: Server error '500"),
                           ({"drop": True}, "RemoteProtocolError: Server disconnected without sending a response")):
        hub.fail_next("commit", count=6, **failure)
        with pytest.raises(PushFailed, match=rf"(?s)pushing .*out to the Hub repo '{repo}' failed.*unchanged.*retry the push") as err:
            trainer.push_to_hub()
        assert hub.pending_failures == 0 and cause in str(err.value) and err.value.__cause__ is err.value.cause
        assert len(hub.commits(repo)) == 1 and pushed(hub, repo) == {}  # the repo exists; nothing was committed
        local = files_in(out)
        first = first or local
        assert local == first  # the second failed push changed nothing either
    # the local output is complete: weights, config with the policy, policy file, card, plot
    assert {"model.safetensors", "config.json", "freeze_policy.json", "README.md", "training_curves.png"} <= set(first)
    assert torch.equal(logits(hf_freeze.from_pretrained(out)), logits(trainer.model))
    trainer.push_to_hub()
    assert pushed(hub, repo) == files_in(out) == first
    assert torch.equal(logits(hf_freeze.from_pretrained(repo)), logits(trainer.model))


def test_push_folder_refuses_an_incomplete_folder_before_any_request(hub, tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    n = len(hub.requests)
    with pytest.raises(FileNotFoundError, match="not a complete model folder: expected config.json"):
        hf_freeze.push_folder(tmp_path / "half", "half")
    assert len(hub.requests) == n and not hub.has_repo(f"{hub.user}/half")


def test_a_peft_adapter_folder_pushes_the_same_way(hub, base_id, tmp_path):
    """A plain peft LoRA adapter (hf_freeze's own PEFT integration is not on this branch) through push_folder."""
    peft = pytest.importorskip("peft")
    base = AutoModelForImageClassification.from_pretrained(base_id)
    config = peft.LoraConfig(r=4, target_modules=["convolution"], modules_to_save=["classifier"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # a "trained" head
        model.base_model.model.classifier.modules_to_save["default"][1].weight.add_(0.5)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    hf_freeze.write_model_card(model, out, hf_freeze.CardConfig(repo_id=f"{hub.user}/tiny-lora"))
    hf_freeze.push_folder(out, "tiny-lora")
    repo = f"{hub.user}/tiny-lora"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(hub.files(repo))
    assert hub.commits(repo)[0].title.endswith("(adapter checkpoint)")
    card = ModelCard.load(repo)
    assert card.data.library_name == "peft" and card.data.base_model == base_id
    assert card.data.to_dict()["base_model_relation"] == "adapter"
    reloaded = hf_freeze.from_pretrained(repo)
    assert isinstance(reloaded, peft.PeftModel)
    assert torch.equal(logits(reloaded), logits(model))
