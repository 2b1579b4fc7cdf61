"""Attack (AREA = ux): a Hugging Face user swapping transformers' run_image_classification.py for
examples/finetune_image_classification.py, and using `hf-freeze inspect/search`, the logging switches and the
`evaluate` metric modules.

Promises attacked (README "Errors, logs, metrics", examples/README.md "Bad input", "Logs and metrics"):
bad input is one line, argparse style, exit code 2, no traceback; everything that needs no model (numbers and
choices, missing local folders, ...) is checked while the arguments are parsed, before any download, dataset
load or folder creation; unknown names get a "did you mean"; what needs the model is refused before
``--output_dir`` exists; hf_freeze's messages follow --log_level / TRANSFORMERS_VERBOSITY; the metric modules give
scikit-learn's values.

The example script's checks run in process where the code path is the same as the command line's (``parse_args``
raising ValueError/OSError is exactly what ``cli()`` turns into the one-line exit-2 error); the rest runs in a
subprocess, as a user runs it. Tiny random models throughout (a saved tiny ResNet with a processor) and one
shrunk pretraining of the embedded digits base (for its log output).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from PIL import Image

import hf_freeze
from hf_freeze import cli as hf_cli
from hf_freeze.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune_image_classification.py"
PROG = "finetune_image_classification.py: error: "
THIRD_PARTY_NOISE = ("Failed to load CPU gemm_4bit_forward from kernels-community",)


def load_example():
    spec = importlib.util.spec_from_file_location("finetune_image_classification", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


example = load_example()


def env(tmp_path: Path, **extra) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_FREEZE_DEBUG", "TRANSFORMERS_VERBOSITY")}
    return {**base, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "HF_FREEZE_CACHE": str(tmp_path / "hf_freeze_cache"), "HF_DATASETS_CACHE": str(tmp_path / "ds_cache"),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra}


def run_script(tmp_path: Path, *argv: str, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=600,
                          env=env(tmp_path, **extra_env), cwd=tmp_path)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith(THIRD_PARTY_NOISE)]


def parse(tmp_path: Path, *argv: str):
    """The example's parse step, with the output folder and CPU/no-report flags every test passes."""
    return example.parse_args(["--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none", *argv])


def refused_while_parsing(tmp_path: Path, *argv: str) -> str:
    """The message of the refusal ``cli()`` prints as the one-line error (ValueError/OSError from parse_args)."""
    with pytest.raises((ValueError, OSError)) as err:
        parse(tmp_path, *argv)
    assert not (tmp_path / "out").exists()
    return str(err.value)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A saved tiny random ResNet (3 labels) with a 32 px image processor: loads in milliseconds."""
    from transformers import ViTImageProcessor

    path = tmp_path_factory.mktemp("tiny_base")
    tiny_model("resnet").save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    colours = {"a": (255, 0, 0), "b": (0, 0, 255), "c": (0, 255, 0)}
    for split, classes, n in (("train", "abc", 4), ("validation", "abc", 2), ("val_ab", "ab", 2),
                              ("val_one", "a", 3), ("corrupt", "ab", 3)):
        for label in classes:
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), colours[label]).save(root / split / label / f"{i}.png")
    (root / "corrupt" / "a" / "broken.png").write_bytes(b"this is not a PNG")
    for label, colour in (("chat_é", (200, 0, 0)), ("犬", (0, 0, 200))):
        (root / "unicodé données" / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), colour).save(root / "unicodé données" / label / f"{i}.png")
    (root / "empty").mkdir()
    (root / "a_file.txt").write_text("not a folder")
    # a local dataset (what --dataset_name DIR loads) whose label column is an integer, not a ClassLabel
    for split, n in (("train", 6), ("validation", 3)):
        (root / "int_labels" / split).mkdir(parents=True)
        rows = ["file_name,label"]
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / "int_labels" / split / f"{i}.png")
            rows.append(f"{i}.png,{i % 3}")
        (root / "int_labels" / split / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


# ================================================================== silent wrong results
@pytest.mark.parametrize("flag", ["--train_dir", "--model_name_or_path", "--freeze_policy_file", "--freeze"])
def test_empty_path_value_is_refused_not_replaced_by_the_embedded_default(tmp_path, flag):
    # `--train_dir "$DATA"` with DATA unset: upstream stops ("You must specify either a dataset name from the hub
    # or a train and/or validation directory"); here it fine-tunes the digits task and exits 0.
    message = refused_while_parsing(tmp_path, f"{flag}=")
    assert flag in message


def test_top_k_accuracy_of_nan_logits_is_not_perfect():
    import evaluate
    from transformers import EvalPrediction

    logits = np.full((4, 7), np.nan, dtype=np.float32)  # what a diverged (or fp16-overflowed) model returns
    labels = np.array([0, 3, 5, 6])
    top_k = evaluate.load(hf_freeze.metrics.TOP_K_ACCURACY)
    for compute in (lambda: top_k.compute(predictions=logits, references=labels, k=5)["top_k_accuracy"],
                    lambda: hf_freeze.metrics.classification_metrics(
                        EvalPrediction(predictions=logits, label_ids=labels))["top5_accuracy"]):
        try:
            value = compute()
        except ValueError:
            continue  # refusing NaN scores, as sklearn's top_k_accuracy_score does, keeps the promise
        assert value == 0.0, f"top-5 accuracy of all-NaN logits: {value}"
    # and the accuracy: numpy's argmax of a NaN row is class 0, which counted label 0 as a hit
    metrics = hf_freeze.metrics.classification_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics["accuracy"] == 0.0, metrics


@pytest.mark.parametrize("argv", [["--learning_rate", "inf"], ["--learning_rate", "nan"], ["--epochs", "nan"],
                                  ["--lr_scales", "1,nan"]])
def test_search_refuses_nan_and_inf_numbers_while_parsing(tmp_path, monkeypatch, capsys, argv):
    import hf_freeze.demo.pretrain as pretrain

    def got_past_parsing(*a, **k):
        raise AssertionError(f"{argv} was accepted: search went on to pretrain the base")

    monkeypatch.setattr(pretrain, "pretrained_base", got_past_parsing)
    out = tmp_path / "search_out"
    with pytest.raises(SystemExit) as exit_:
        hf_cli.main(["search", "--demo", "--output_dir", str(out), *argv])
    assert exit_.value.code == 2 and argv[0] in capsys.readouterr().err
    assert not out.exists()


def test_delta_base_model_missing_folder_is_refused_while_parsing(tmp_path):
    # checked by hand: the full run exits 0 and writes freeze_delta.json {"base_model": "./no/such", ...}
    message = refused_while_parsing(tmp_path, "--save_delta", "--delta_base_model", "./no/such")
    assert "--delta_base_model" in message and "./no/such" in message


# ================================================================== false refusals (drop-in broken)
def test_image_processor_name_accepts_a_processor_only_folder(tmp_path):
    from transformers import AutoImageProcessor, ViTImageProcessor

    folder = tmp_path / "my_processor"
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["preprocessor_config.json"]
    AutoImageProcessor.from_pretrained(folder)  # transformers reads it
    model_args, _, _ = parse(tmp_path, "--image_processor_name", str(folder))
    assert model_args.image_processor_name == str(folder)


# ================================================================== crashes and late / unclear errors
@pytest.mark.parametrize("argv", [["--max_train_samples", "0"], ["--max_train_samples", "-1"],
                                  ["--max_eval_samples", "0"], ["--max_eval_samples", "-1"]])
def test_non_positive_sample_counts_are_refused_while_parsing(tmp_path, argv):
    assert argv[0] in refused_while_parsing(tmp_path, *argv)


@pytest.mark.parametrize("argv", [["--learning_rate", "-1"], ["--learning_rate", "nan"],
                                  ["--num_train_epochs", "-1"], ["--per_device_train_batch_size", "0"]])
def test_training_numbers_are_checked_while_parsing(tmp_path, argv):
    assert argv[0] in refused_while_parsing(tmp_path, *argv)


@pytest.mark.parametrize("fields", [{"learning_rate": "abc"}, {"num_train_epochs": "3", "unfreeze": "epoch2:1"}])
def test_args_json_with_a_wrongly_typed_value_is_a_clear_error(tmp_path, monkeypatch, fields):
    args_json = tmp_path / "args.json"
    args_json.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": "none",
                                     **fields}))
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), str(args_json)])
    with pytest.raises((ValueError, OSError)) as err:
        example.parse_args()
    assert next(iter(fields)) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_one_class_validation_folder_is_a_clear_error(tmp_path, images):
    _, data_args, _ = parse(tmp_path, "--train_dir", str(images / "train"), "--validation_dir",
                            str(images / "val_one"))
    with pytest.raises(ValueError, match="--validation_dir"):
        example.load_data(data_args, example.ModelArguments(cache_dir=str(tmp_path / "ds")), 0)


def test_integer_label_column_works(tmp_path, images, tiny_base):
    """Fixed by making it work: integer class ids keep their value as the class id (names '0', '1', '2')."""
    model_args, data_args, training_args = parse(tmp_path, "--dataset_name", str(images / "int_labels"),
                                                 "--model_name_or_path", str(tiny_base), "--cache_dir",
                                                 str(tmp_path / "ds"), "--freeze", "backbone")
    trainer, _ = example.prepare(model_args, data_args, training_args)
    assert trainer.model.config.id2label == {0: "0", 1: "1", 2: "2"}
    assert [row["labels"] for row in trainer.train_dataset] == [i % 3 for i in range(6)]


def test_unreadable_image_is_a_one_line_error(tmp_path, images, tiny_base):
    out = tmp_path / "out"
    proc = run_script(tmp_path, "--model_name_or_path", str(tiny_base), "--train_dir", str(images / "corrupt"),
                      "--train_val_split", "0.5", "--output_dir", str(out), "--use_cpu", "--report_to", "none",
                      "--num_train_epochs", "1", "--save_strategy", "no", "--freeze", "backbone",
                      "--disable_tqdm", "true", "--dataloader_num_workers", "0")
    assert "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert proc.returncode == 2
    assert error_lines(proc.stderr)[-1].startswith(PROG) and "broken.png" in error_lines(proc.stderr)[-1]
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--feature_cache", "memory"], ["--feature_cache", "disk", "--augment", "crop"],
                                  ["--feature_cache", "disk", "--augment", "none", "--feature_cache_dir", "FILE"]])
def test_feature_cache_conflicts_are_refused_while_parsing(tmp_path, images, argv):
    argv = [str(images / "a_file.txt") if a == "FILE" else a for a in argv]
    assert "--feature_cache" in refused_while_parsing(tmp_path, "--freeze", "backbone", *argv)


def test_forced_feature_cache_without_augmentation_is_accepted(tmp_path):
    _, data_args, training_args = parse(tmp_path, "--freeze", "backbone", "--feature_cache", "memory", "--augment", "none")
    assert (training_args.feature_cache, data_args.augment) == ("memory", "none")


@pytest.mark.parametrize("value", ["wandbb", "wandb"])
def test_report_to_is_checked_while_parsing(tmp_path, value):
    if value == "wandb" and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises((ValueError, OSError)) as err:
        example.parse_args(["--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", value])
    assert value in str(err.value)


def test_inspect_a_type_needing_a_missing_package_is_one_line(tmp_path, capsys):
    if importlib.util.find_spec("natten") is not None:
        pytest.skip("natten is installed here")
    assert hf_cli.main(["inspect", "tiny:dinat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-freeze inspect: error:") and "natten" in err[0]


def test_search_output_dir_that_is_a_file_is_refused_before_anything(tmp_path, images, monkeypatch, capsys):
    import hf_freeze.demo.pretrain as pretrain

    def got_past_parsing(*a, **k):
        raise AssertionError("--output_dir FILE was accepted: search went on to pretrain the base")

    monkeypatch.setattr(pretrain, "pretrained_base", got_past_parsing)
    target = images / "a_file.txt"
    try:
        code = hf_cli.main(["search", "--demo", "--output_dir", str(target)])
    except SystemExit as e:
        code = e.code
    assert code == 2 and "--output_dir" in capsys.readouterr().err
    assert target.read_text() == "not a folder"


# ================================================================== logging
def test_embedded_pretraining_follows_the_log_level(tmp_path, monkeypatch):
    """The script pretrains the embedded base (``resolve_model_path``) after ``setup_logging`` applied --log_level;
    run that step with transformers' verbosity at ERROR (what ``--log_level error`` sets). The recipe is shrunk
    (1 epoch, narrow layers) so the test is quick; what it prints is the same code path."""
    import hf_freeze.demo.pretrain as pretrain

    real = pretrain.PretrainSettings
    monkeypatch.setattr(pretrain, "PretrainSettings", lambda seed=0: real(seed=seed, epochs=1, hidden_sizes=(8, 8, 8)))
    monkeypatch.setenv("HF_FREEZE_CACHE", str(tmp_path / "cache"))
    _, _, training_args = parse(tmp_path, "--log_level", "error")
    level = transformers.logging.get_verbosity()
    printed = io.StringIO()
    try:
        transformers.logging.set_verbosity_error()
        with contextlib.redirect_stderr(printed), contextlib.redirect_stdout(printed):
            path = example.resolve_model_path(example.ModelArguments(), training_args, 0)
    finally:
        transformers.logging.set_verbosity(level)
    assert (Path(path) / "config.json").is_file()
    assert "[hf_freeze demo]" not in printed.getvalue(), printed.getvalue()


def _reset_logging(level):
    transformers.logging.set_verbosity(level)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.stdout:
            root.removeHandler(handler)


def test_log_level_warning_hides_hf_freeze_info_in_the_example(tmp_path):
    _, _, training_args = parse(tmp_path, "--log_level", "warning")
    level = transformers.logging.get_verbosity()
    try:
        example.setup_logging(training_args)
        hf_freeze.freeze_report  # noqa: B018 -- loads the submodules (and the hf_freeze logger under transformers')
        from hf_freeze._logging import get_logger

        assert not get_logger("hf_freeze.callback").isEnabledFor(logging.INFO)
        example.setup_logging(parse(tmp_path, "--log_level", "info")[2])
        assert get_logger("hf_freeze.callback").isEnabledFor(logging.INFO)
    finally:
        _reset_logging(level)


def test_transformers_verbosity_error_quiets_the_example(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    _, _, training_args = parse(tmp_path)
    level = transformers.logging.get_verbosity()
    try:
        transformers.logging.set_verbosity(transformers.logging._get_default_logging_level())  # as at start-up
        example.setup_logging(training_args)
        from hf_freeze._logging import get_logger

        assert not get_logger("hf_freeze.callback").isEnabledFor(logging.INFO)
    finally:
        _reset_logging(level)


# ================================================================== metrics
@pytest.fixture(scope="module")
def metric_modules():
    import evaluate

    return evaluate.load(hf_freeze.metrics.ACCURACY), evaluate.load(hf_freeze.metrics.TOP_K_ACCURACY)


def test_metric_edge_cases_match_sklearn(metric_modules):
    import warnings

    from sklearn.metrics import accuracy_score, top_k_accuracy_score

    accuracy, top_k = metric_modules
    # all wrong, all right with a single class
    assert accuracy.compute(predictions=[1, 1, 1], references=[0, 0, 0])["accuracy"] == accuracy_score([0] * 3, [1] * 3)
    assert accuracy.compute(predictions=[0, 0], references=[0, 0])["accuracy"] == 1.0
    # k larger than the number of classes: a perfect score, as sklearn (which warns)
    rng = np.random.default_rng(0)
    scores, labels = rng.random((9, 3)).astype(np.float32), np.arange(9) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert top_k.compute(predictions=scores, references=labels, k=10)["top_k_accuracy"] == \
            top_k_accuracy_score(labels, scores, k=10, labels=[0, 1, 2]) == 1.0
    # no ties: every k equals sklearn
    scores, labels = rng.random((50, 8)).astype(np.float32), rng.integers(0, 8, 50)
    for k in (1, 2, 5, 8):
        assert top_k.compute(predictions=scores, references=labels, k=k)["top_k_accuracy"] == pytest.approx(
            top_k_accuracy_score(labels, scores, k=k, labels=range(8)))
    # bad k, out-of-range labels: named
    for bad in ({"k": 0}, {"k": -1}):
        with pytest.raises(ValueError, match="k must be"):
            top_k.compute(predictions=scores, references=labels, **bad)
    with pytest.raises(ValueError, match="references must be class ids"):
        top_k.compute(predictions=scores, references=labels + 8, k=1)


def test_top_k_ties_rank_as_argmax_and_the_docs_say_so(metric_modules):
    """Finding (doc): the READMEs promised scikit-learn's top_k_accuracy_score values, but on tied scores the module
    ranks the lower class first (as numpy.argmax; sklearn the higher). The tie rule is deliberate: top-1 then equals
    the argmax accuracy the Trainer reports (tests/test_metrics.py::test_top_1_is_argmax_accuracy_even_with_ties),
    so the fix is in the docs: both READMEs now state the tie rule where they compare with scikit-learn."""
    from sklearn.metrics import top_k_accuracy_score

    _, top_k = metric_modules
    scores = np.array([[0.5, 0.5, 0.0], [0.2, 0.4, 0.4], [1.0, 1.0, 1.0]], dtype=np.float32)
    labels = np.array([0, 1, 2])
    top_1 = top_k.compute(predictions=scores, references=labels, k=1)["top_k_accuracy"]
    assert top_1 == float((scores.argmax(-1) == labels).mean()) == pytest.approx(2 / 3)
    assert top_1 != pytest.approx(top_k_accuracy_score(labels, scores, k=1, labels=[0, 1, 2]))  # the documented gap
    for readme in (ROOT / "README.md", ROOT / "examples" / "README.md"):
        assert "tied scores" in readme.read_text(), readme


def test_metric_degenerate_inputs_are_named_errors(metric_modules):
    accuracy, top_k = metric_modules
    with pytest.raises(ValueError):
        accuracy.compute(predictions=[], references=[])
    with pytest.raises(ValueError):
        accuracy.compute(predictions=[0, 1], references=[0, 0], sample_weight=[0, 0])
    scores = np.eye(6, dtype=np.float32)
    assert top_k.compute(predictions=scores, references=np.arange(6), k=np.int64(5))["top_k_accuracy"] == 1.0


# ================================================================== did you mean / message quality (cosmetic)
@pytest.mark.parametrize("argv, meant", [(["--eval_strategy", "epoc"], "epoch"), (["--log_level", "debugg"], "debug"),
                                         (["--model_type", "ViT", "--model_name_or_path", "org/m"], "vit")])
def test_choice_typos_get_did_you_mean(tmp_path, capsys, argv, meant):
    try:
        parse(tmp_path, *argv)
    except SystemExit as e:
        assert e.code == 2
        message = capsys.readouterr().err
    except ValueError as e:
        message = str(e)
    else:
        raise AssertionError(f"{argv} accepted")
    assert f"did you mean '{meant}'?" in message, message


def test_old_use_auth_token_flag_points_to_token(tmp_path):
    message = refused_while_parsing(tmp_path, "--use_auth_token", "hf_xxx")
    assert "unrecognized arguments" in message and "'--token'" in message and "--use_cache" not in message


def test_args_json_unknown_key_gets_did_you_mean(tmp_path, monkeypatch):
    args_json = tmp_path / "args.json"
    args_json.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "frezee": "backbone"}))
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), str(args_json)])
    with pytest.raises(ValueError) as err:
        example.parse_args()
    assert "frezee" in str(err.value) and "did you mean '--freeze'?" in str(err.value).replace("'freeze'", "'--freeze'")


def test_one_class_train_folder_names_the_real_problem(tmp_path, images):
    _, data_args, _ = parse(tmp_path, "--train_dir", str(images / "val_one"))
    with pytest.raises(ValueError) as err:
        example.load_data(data_args, example.ModelArguments(cache_dir=str(tmp_path / "ds")), 0)
    assert "class" in str(err.value) and "--label_column_name" not in str(err.value)


def test_search_one_class_validation_folder_names_the_problem(tmp_path, images, tiny_base, capsys):
    code = hf_cli.main(["search", "--model", str(tiny_base), "--train_dir", str(images / "train"),
                        "--validation_dir", str(images / "val_one"), "--output_dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "class" in err, err


def test_small_train_folder_split_error_names_the_flag(tmp_path, images):
    _, data_args, _ = parse(tmp_path, "--train_dir", str(images / "train"))  # 12 images, 3 classes, 0.15 held out
    try:
        data = example.load_data(data_args, example.ModelArguments(cache_dir=str(tmp_path / "ds")), 0)
    except ValueError as e:
        assert "--train_val_split" in str(e) or "--validation_dir" in str(e), str(e)
    else:
        assert len(data["validation"]) >= 1


def test_error_line_quotes_the_path_as_given(tmp_path, capsys):
    missing = str(tmp_path / "my  data")
    assert example.cli(["--output_dir", str(tmp_path / "out"), "--train_dir", missing]) == 2
    assert repr(missing) in capsys.readouterr().err


@pytest.mark.parametrize("value", ["no", "off"])
def test_debug_variable_off_values(monkeypatch, value):
    monkeypatch.setenv("HF_FREEZE_DEBUG", value)
    assert not hf_cli.debug_enabled()


def test_examples_readme_states_the_embedded_policy_that_runs():
    text = (ROOT / "examples" / "README.md").read_text()
    assert f"`{example.EMBEDDED_POLICY.to_string()}`" in text


# ================================================================== what held
@pytest.mark.parametrize("argv, words", [
    (["--layer_lr_decay", "0"], "layer_lr_decay must be in (0, 1]"),
    (["--layer_lr_decay", "nan"], "layer_lr_decay must be in (0, 1]"),
    (["--layer_lr_decay", "inf"], "layer_lr_decay must be in (0, 1]"),
    (["--unfreeze", "epoch1:1@0"], "lr_scale must be a finite number > 0"),
    (["--unfreeze", "epoch1:1@nan"], "lr_scale must be a finite number > 0"),
    (["--unfreeze", "epoch0:1"], "at_epoch must be a number > 0"),
    (["--unfreeze", "epoch3:1"], "would never happen: training stops after num_train_epochs=3"),
    (["--adapter", "lora", "--lora_r", "0"], "r must be an integer >= 1"),
    (["--adapter", "lora", "--lora_dropout", "1.5"], "dropout must be in [0, 1)"),
    (["--adapter", "lora", "--lora_alpha", "-1"], "alpha must be a number > 0"),
    (["--freeze", "backbone,stem"], "is a keyword and stands alone"),
    (["--min_crop_scale", "nan"], "--min_crop_scale must be in (0, 1]"),
    (["--image_size", "-5"], "--image_size must be a positive number"),
    (["--train_val_split", "1"], "--train_val_split must be between 0 and 1"),
    (["--train_dir", "A_FILE"], "is not a folder"),
    (["--validation_dir", "A_FILE"], "--validation_dir needs --train_dir"),
    (["--image_processor_name", "A_FILE"], "is a file"),
    (["--resume_from_checkpoint", "A_FILE"], "is not a folder"),
    (["--freeze_policy_file", "A_FILE"], "--freeze_policy_file"),
    (["--model_type", "mobilenet-v2", "--model_name_or_path", "org/m"], "did you mean 'mobilenet_v2'?"),
    (["--lerning_rate", "0.1"], "did you mean '--learning_rate'?"),
    (["--overwrite_output_dir"], "unrecognized arguments: --overwrite_output_dir"),
    (["--load_best_model_at_end", "--eval_strategy", "epoch", "--save_strategy", "no"], "load_best_model_at_end"),
])
def test_bad_values_are_refused_while_parsing(tmp_path, images, argv, words):
    argv = [str(images / "a_file.txt") if a == "A_FILE" else a for a in argv]
    assert words in refused_while_parsing(tmp_path, *argv)


def test_bad_flag_in_a_subprocess_is_one_line_and_creates_nothing(tmp_path, images):
    out, data_cache = tmp_path / "sortie é", tmp_path / "données cache"
    proc = run_script(tmp_path, "--train_dir", str(images / "unicodé données"), "--output_dir", str(out),
                      "--cache_dir", str(data_cache), "--use_cpu", "--report_to", "none", "--unfreeze", "epoch2:stag.1")
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(PROG), proc.stderr[-2000:]
    assert "did you mean 'stage.1'?" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists() and not data_cache.exists() and not (tmp_path / "hf_freeze_cache").exists()
    assert not (tmp_path / "ds_cache").exists()


def test_unicode_folders_and_class_names_train_and_save(tmp_path, images, tiny_base):
    out = tmp_path / "sortie é" / "猫"
    proc = run_script(tmp_path, "--model_name_or_path", str(tiny_base), "--train_dir", str(images / "unicodé données"),
                      "--train_val_split", "0.5", "--output_dir", str(out), "--use_cpu", "--report_to", "none",
                      "--num_train_epochs", "2", "--unfreeze", "epoch1:1", "--freeze", "backbone", "--save_strategy",
                      "no", "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--per_device_train_batch_size", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert sorted(config["id2label"].values()) == ["chat_é", "犬"]
    assert "eval_accuracy" in json.loads((out / "all_results.json").read_text())
    assert [e["groups"] for e in json.loads((out / "freeze_events.json").read_text())] == [["stage.1"]]
    # the report and the unfreeze line were logged on the (only, main) process at the script's INFO level
    assert "hf_freeze: freeze policy at the start of training:" in proc.stderr
    assert "hf_freeze: unfroze stage.1 at epoch 1" in proc.stderr


def test_empty_train_folder_is_a_clear_error_and_writes_no_cache(tmp_path, images):
    _, data_args, _ = parse(tmp_path, "--train_dir", str(images / "empty"))
    with pytest.raises((ValueError, OSError), match="doesn't contain any data files"):
        example.load_data(data_args, example.ModelArguments(cache_dir=str(tmp_path / "ds")), 0)
    assert not (tmp_path / "ds").exists()


def test_validation_classes_that_differ_are_named(tmp_path, images):
    _, data_args, _ = parse(tmp_path, "--train_dir", str(images / "train"), "--validation_dir", str(images / "val_ab"))
    with pytest.raises(ValueError, match=r"--train_dir classes \['a', 'b', 'c'\] differ from --validation_dir classes "
                                         r"\['a', 'b'\]"):
        example.load_data(data_args, example.ModelArguments(cache_dir=str(tmp_path / "ds")), 0)


@pytest.mark.parametrize("argv, error, words", [
    (["--freeze", "stage.9"], hf_freeze.FreezePolicyError, "freeze selector 'stage.9' matches no group"),
    (["--model_type", "vit"], ValueError, "--model_type vit but"),
    (["--freeze", "none", "--unfreeze", "epoch1:1"], hf_freeze.FreezePolicyError, "only 0 are still frozen"),
    (["--adapter", "lora", "--adapter_groups", "head"], hf_freeze.FreezePolicyError, "the head is trained whole"),
])
def test_what_needs_the_model_is_refused_before_output_dir(tmp_path, images, tiny_base, argv, error, words):
    model_args, data_args, training_args = parse(tmp_path, "--model_name_or_path", str(tiny_base), "--train_dir",
                                                 str(images / "train"), "--validation_dir", str(images / "validation"),
                                                 "--cache_dir", str(tmp_path / "ds"), *argv)
    with pytest.raises(error, match=words.replace("(", r"\(")):
        example.prepare(model_args, data_args, training_args)
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_is_refused_and_kept(tmp_path, images, tiny_base):
    target = tmp_path / "results.txt"
    target.write_text("my results")
    model_args, data_args, training_args = example.parse_args(
        ["--output_dir", str(target), "--use_cpu", "--report_to", "none", "--model_name_or_path", str(tiny_base),
         "--train_dir", str(images / "train"), "--validation_dir", str(images / "validation"),
         "--cache_dir", str(tmp_path / "ds")])
    with pytest.raises(OSError):
        example.prepare(model_args, data_args, training_args)
    assert target.read_text() == "my results"


def _cli_error(capsys, argv) -> str:
    try:
        code = hf_cli.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("argv, words", [
    ([], "hf-freeze: error: the following arguments are required: command"),
    (["inspect"], "hf-freeze inspect: error: the following arguments are required: model"),
    (["inspect", "tiny:resnet", "--freeze", "backbone", "--policy", "freeze=none"], "not allowed with argument"),
    (["inspect", "tiny:resnet", "--freeze", "-1"], "must be >= 0"),
    (["inspect", "tiny:resnet", "--freeze", "99"], "the model has only 4 groups"),
    (["inspect", "tiny:resnet", "--policy", ""], "must be non-empty strings"),
    (["inspect", "tiny:resnet", "--policy", "freeze=backbone;unfreze=epoch1:1"], "unknown policy string field(s) "
                                                                                 "['unfreze']"),
    (["inspect", "tiny:resnet", "--policy", "freeze=backbone;layer_lr_decay=abc"], "layer_lr_decay='abc'"),
    (["inspect", "tiny:shieldgemma2"], "not a pixel_values -> labels classifier"),
    (["inspect", "BAD_CONFIG"], "its config could not be read"),
    (["inspect", "BERT_CONFIG"], "model type 'bert' has no image-classification class"),
    (["inspect", "A_FILE"], "is a file"),
    (["inspect", "google/vit-base-patch16-224"], "could not be loaded from the Hugging Face Hub"),
    (["search", "--demo", "--epochs", "-1"], "argument --epochs: must be > 0"),
    (["search", "--demo", "--n_trials", "2.5"], "expected an integer"),
    (["search", "--demo", "--train_bn_choices", "yes"], "value 'yes' is not valid; valid: true, false"),
])
def test_hf_freeze_misuse_is_one_line(tmp_path, images, capsys, argv, words):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    subst = {"BAD_CONFIG": str(tmp_path / "bad"), "BERT_CONFIG": str(tmp_path / "bert"),
             "A_FILE": str(images / "a_file.txt")}
    line = _cli_error(capsys, [subst.get(a, a) for a in argv])
    assert words in line, line


def test_hf_freeze_command_typo_gets_did_you_mean(capsys):
    assert "did you mean 'inspect'?" in _cli_error(capsys, ["inspekt", "tiny:resnet"])
