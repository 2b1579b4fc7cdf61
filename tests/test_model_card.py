"""Model cards from a real FreezeTrainer run: metadata, model-index, freeze table, unfreeze schedule, check, plot."""

import numpy as np
import pytest
import torch
from helpers import TinyImages, tiny_model, training_args
from huggingface_hub import ModelCard
from PIL import Image

import hf_freeze
from hf_freeze import CardConfig, FreezeTrainer, write_model_card
from hf_freeze.model_card import eval_metrics, plot_series, unfreeze_events

POLICY = "freeze=backbone;unfreeze=step3:1@0.5,epoch2:stage.0@0.1;layer_lr_decay=0.8"


def accuracy(pred):
    return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny ResNet trained 3 epochs (12 steps) with two unfreeze events and an evaluation per epoch."""
    tmp = tmp_path_factory.mktemp("card")
    model = tiny_model("resnet")
    args = training_args(tmp, num_train_epochs=3, eval_strategy="epoch", per_device_eval_batch_size=16)
    trainer = FreezeTrainer(model=model, args=args, train_dataset=TinyImages(), eval_dataset=TinyImages(n=16, seed=1),
                            compute_metrics=accuracy, freeze_policy=POLICY)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(dataset="tiny_images", license="apache-2.0", dataset_name="Tiny images", tags=["demo"])
    return trainer, tmp / "out"


def test_card_metadata_parses_with_modelcard_load(trained):
    trainer, out = trained
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert data.license == "apache-2.0" and data.datasets == ["tiny_images"]
    assert {"hf_freeze", "image-classification", "generated_from_trainer", "demo"} <= set(data.tags)
    assert data.base_model is None  # tiny_model() comes from no checkpoint: nothing to name
    final = trainer.state.log_history[-2]  # last evaluation (the last entry is the train summary)
    assert "eval_accuracy" in final
    (result,) = data.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_name) == ("image-classification", "tiny_images", "Tiny images")
    assert result.metric_type == "accuracy" and result.metric_value == pytest.approx(final["eval_accuracy"])
    assert data.to_dict()["hf_freeze"] == {"checkpoint": "full", "policy": hf_freeze.FreezePolicy.from_string(POLICY).to_string(),
                                           "preserved": True, "frozen_tensors": len(hf_freeze.get_state(trainer.model).fingerprint),
                                           "fingerprint": hf_freeze.get_state(trainer.model).fingerprint.combined()}


def test_card_shows_the_freeze_table_schedule_params_and_check(trained):
    trainer, out = trained
    text = (out / "README.md").read_text()
    report = hf_freeze.freeze_report(trainer.model)
    assert report.to_markdown() in text
    assert "| stage.1 |" in text and "unfrozen at step 3" in text and "unfrozen at epoch 2" in text
    # the schedule table: one row per event, with the step it fired at, its LR scale and the trainable count after
    events = trainer.freeze_callback.events_log
    assert [(e["step"], e["groups"], e["lr_scale"]) for e in events] == [(3, ["stage.1"], 0.5), (8, ["stage.0"], 0.1)]
    for e in events:
        assert f"| {e['step']} | {e['epoch']:g} | {', '.join(e['groups'])} | {e['when']} | {e['lr_scale']:g} | {e['trainable_params']:,} |" in text
    assert f"{report.trainable_params:,} trainable of {report.total_params:,}" in text
    assert "**Passed.** All" in text and hf_freeze.get_state(trainer.model).fingerprint.combined() in text
    assert "### Training results" in text and "| Validation Loss |" in text.replace("  ", " ").replace("  ", " ")
    assert "- learning_rate: 0.05" in text
    assert "freeze/" not in text  # the freeze metrics stay out of the Trainer's results table
    assert "AutoModelForImageClassification.from_pretrained(" in text


def test_training_plot_marks_the_unfreeze_events(trained):
    trainer, out = trained
    series = plot_series(trainer.state.log_history, unfreeze_events(trainer.model, trainer.freeze_callback.events_log))
    assert [s for s, _ in series["train_loss"]] == list(range(1, 13))
    assert [s for s, _ in series["eval_loss"]] == [4, 8, 12]
    assert list(series["metrics"]) == ["accuracy"]
    assert [(s, label.split("\n")[0]) for s, label in series["events"]] == [(3, "unfreeze stage.1"), (8, "unfreeze stage.0")]
    with Image.open(out / "training_curves.png") as img:
        assert img.format == "PNG" and img.size == (1000, 360)
    assert "![Training curves" in (out / "README.md").read_text() and "](training_curves.png)" in (out / "README.md").read_text()


def test_a_broken_preservation_check_is_reported_not_hidden(tmp_path):
    model = tiny_model("resnet")
    hf_freeze.apply_policy(model, "backbone")
    with torch.no_grad():
        model.resnet.embedder.embedder.convolution.weight[0, 0, 0, 0] += 1.0
    card = write_model_card(model, tmp_path, CardConfig(model_name="broken"))
    assert "**FAILED**: 1 of" in card.text and "`resnet.embedder.embedder.convolution.weight`" in card.text
    assert card.data.to_dict()["hf_freeze"]["preserved"] is False


def test_manual_unfreezes_without_a_trainer_and_no_log(tmp_path):
    model = tiny_model("resnet")
    hf_freeze.apply_policy(model, "freeze=backbone;unfreeze=epoch4:1")
    hf_freeze.unfreeze_groups(model, ["stage.0"], when="step 7", lr_scale=0.25)
    card = write_model_card(model, tmp_path, CardConfig(model_name="manual"))
    assert "| 7 |  | stage.0 | step 7 | 0.25 |" in card.text
    assert "Scheduled but not reached: stage.1 at epoch 4." in card.text
    assert not (tmp_path / "training_curves.png").exists() and "## Training\n" not in card.text
    assert card.data.eval_results is None and "## Evaluation" not in card.text
    assert unfreeze_events(model, None, [{"loss": 1.0, "step": 10, "epoch": 2.0}]) == [
        {"step": 7, "epoch": "", "groups": "stage.0", "when": "step 7", "lr_scale": "0.25", "trainable": "", "resumed": False}]


def test_a_model_without_policy_gets_a_card_too(tmp_path):
    card = write_model_card(tiny_model("vit"), tmp_path, CardConfig(model_name="plain", base_model="org/vit-base"))
    assert "No hf_freeze policy was applied" in card.text
    assert card.data.base_model == "org/vit-base" and card.data.to_dict()["base_model_relation"] == "finetune"


def test_eval_metrics_takes_the_last_evaluation():
    log = [{"eval_loss": 2.0, "eval_accuracy": 0.1, "step": 1}, {"loss": 1.0, "step": 2},
           {"eval_loss": 1.0, "eval_accuracy": 0.5, "eval_runtime": 3.0, "eval_samples_per_second": 9.0, "step": 2}]
    assert eval_metrics(log) == {"loss": 1.0, "accuracy": 0.5}
    assert eval_metrics([]) == {}


def test_unknown_template_names_the_built_in_ones(tmp_path):
    model = tiny_model("resnet")
    with pytest.raises(FileNotFoundError, match=r"'nope.md' not found; built-in templates: \['model_card.md'\]"):
        write_model_card(model, tmp_path, CardConfig(template="nope.md"))
    own = tmp_path / "mine.md"
    own.write_text("---\n{{ card_data }}\n---\n# {{ model_name }}: {{ trainable_params }} of {{ total_params }}\n")
    card = write_model_card(model, tmp_path / "o", CardConfig(model_name="m", template=str(own)))
    assert card.text.strip() == f"# m: {sum(p.numel() for p in model.parameters())} of {sum(p.numel() for p in model.parameters())}"


def test_the_templates_live_once_in_model_cards_and_the_package_reads_them():
    """``model_cards/`` at the top of the repository is the templates' one home; the package's
    ``hf_freeze/model_cards`` is a link to it (a wheel holds the files themselves), so the card renders from it."""
    from pathlib import Path

    from hf_freeze.model_card import TEMPLATES

    root = Path(__file__).resolve().parents[1]
    if not (root / "model_cards").is_dir():
        pytest.skip("an installed hf_freeze without the source tree")
    assert TEMPLATES.resolve() == (root / "model_cards").resolve()
    templates = sorted(p.name for p in (root / "model_cards").glob("*.md"))
    assert "model_card.md" in templates
    copies = [p for p in (root / "hf_freeze").rglob("*.md") if p.resolve().parent != (root / "model_cards").resolve()]
    assert not [p for p in copies if p.name in templates], copies
