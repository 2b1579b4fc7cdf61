"""Benchmark figures in README.md and docs/benchmarks.md are rendered from the committed result files, and the
real-BatchNorm benchmark's peer adapters (timm, fastai) and head re-initialisation do what they claim."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import render_docs  # noqa: E402
import transfer_bn  # noqa: E402


def copy_project(tmp_path: Path) -> Path:
    """README, docs page and every result file the renderer reads, at the same relative paths."""
    for rel in (*render_docs.DOCS, *render_docs.SOURCES.values()):
        src = ROOT / rel
        if src.is_file():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, tmp_path / rel)
    return tmp_path


def test_committed_figures_match_their_result_files():
    assert render_docs.stale_blocks(ROOT) == [], "run: python benchmarks/render_docs.py"


def test_every_generated_block_has_a_renderer_and_every_renderer_is_used():
    used = [name for rel in render_docs.DOCS for name in render_docs.block_names((ROOT / rel).read_text())]
    assert set(used) == set(render_docs.RENDERERS)
    text = (ROOT / "README.md").read_text()
    assert text.count("<!-- BEGIN GENERATED") == text.count("<!-- END GENERATED") == len(
        render_docs.block_names(text))


def test_a_changed_result_figure_makes_the_docs_stale(tmp_path):
    root = copy_project(tmp_path)
    path = root / render_docs.SOURCES["transfer_bn"]
    results = json.loads(path.read_text())
    run = next(r for r in results["runs"] if r["strategy_key"] == "full" and r["shots"] == results["settings"]["shots"][-1])
    run["val_accuracy"] -= 0.05
    path.write_text(json.dumps(results))
    stale = render_docs.stale_blocks(root)
    assert "README.md:readme-transfer-bn" in stale and "docs/benchmarks.md:bn-accuracy" in stale
    render_docs.update_docs(root)
    assert render_docs.stale_blocks(root) == []


def test_a_changed_search_figure_makes_the_search_blocks_stale(tmp_path):
    root = copy_project(tmp_path)
    path = root / render_docs.SOURCES["search"]
    results = json.loads(path.read_text())
    results["rows"][0]["eval_accuracy"] += 0.01
    path.write_text(json.dumps(results))
    assert set(render_docs.stale_blocks(root)) == {"README.md:readme-search", "docs/benchmarks.md:search-mobilenet"}


def test_a_hand_edited_figure_inside_a_block_is_caught(tmp_path):
    root = copy_project(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    start = text.index("<!-- BEGIN GENERATED readme-classic-drift -->")
    end = text.index("<!-- END GENERATED readme-classic-drift -->")
    drift = json.loads((ROOT / render_docs.SOURCES["classic_drift"]).read_text())
    figure = f"{drift['classic']['backbone_tensors_changed']} of"
    assert figure in text[start:end]
    readme.write_text(text[:start] + text[start:end].replace(figure, "155 of") + text[end:])
    assert render_docs.stale_blocks(root) == ["README.md:readme-classic-drift"]


def test_mobilenet_top1_column_is_the_largest_data_size_not_the_mean_over_sizes():
    results = json.loads((ROOT / render_docs.SOURCES["transfer"]).read_text())
    table = render_docs.mobilenet_readme_table(results)
    shots = sorted(results["settings"]["shots"])
    for config in results["configs"]:
        runs = config["runs"]
        if runs[0]["shots"] != shots[-1]:
            continue
        top1 = sum(r["imagenet_top1"] for r in runs) / len(runs)
        row = next(line for line in table.splitlines() if line.startswith(f"| {runs[0]['strategy']} |"))
        assert f"| {top1:.1f}/20 |" in row
    # a synthetic check that the column would differ from the over-sizes mean: change only the smaller sizes
    changed = copy.deepcopy(results)
    for config in changed["configs"]:
        if config["runs"][0]["shots"] != shots[-1]:
            for r in config["runs"]:
                r["imagenet_top1"] = 0
    def top1_column(text):
        return [line.split("|")[-3] for line in text.splitlines()[2:] if line.startswith("| ")]

    assert top1_column(render_docs.mobilenet_readme_table(changed)) == top1_column(table)


def stats(mean, std):
    return {"mean": mean, "std": std}


def test_dominance_needs_both_axes_within_seed_noise():
    peer = {"acc": stats(0.80, 0.01), "ret": stats(0.70, 0.02)}
    assert render_docs.dominates({"acc": stats(0.795, 0.01), "ret": stats(0.90, 0.0)}, peer)  # within noise
    assert not render_docs.dominates({"acc": stats(0.78, 0.01), "ret": stats(0.90, 0.0)}, peer)  # less accurate
    assert not render_docs.dominates({"acc": stats(0.85, 0.01), "ret": stats(0.60, 0.02)}, peer)  # keeps less


def test_one_frontier_plot_per_data_size(tmp_path):
    results = json.loads((ROOT / render_docs.SOURCES["transfer_bn"]).read_text())
    paths = render_docs.plot_transfer_bn(results, tmp_path)
    assert [p.name for p in paths] == [f"transfer_bn_{s}.png" for s in results["settings"]["shots"]]
    assert all(p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_results_hold_every_strategy_seed_and_size_once():
    results = json.loads((ROOT / render_docs.SOURCES["transfer_bn"]).read_text())
    st = results["settings"]
    keys = [(r["strategy_key"], r["shots"], r["seed"]) for r in results["runs"]]
    assert len(keys) == len(set(keys))
    assert set(keys) == {(k, s, seed) for k in transfer_bn.DEFAULT for s in st["shots"] for seed in st["seeds"]}
    assert not st["quick"] and all(r["val_images"] == results["base"]["val_images"] for r in results["runs"])
    for r in results["runs"]:  # the same number of optimizer steps for every strategy at a data size
        same = {x["steps"] for x in results["runs"] if x["shots"] == r["shots"]}
        assert same == {r["steps"]}, (r["shots"], same)


def test_every_search_run_stayed_within_the_peer_points_budget():
    results = json.loads((ROOT / render_docs.SOURCES["transfer_bn"]).read_text())
    peers = results["settings"]["search"]["peers"]
    assert set(peers) == {"full", "fastai", "lightning", "lightning_train", "timm"}
    searches = [r for r in results["runs"] if r["strategy_key"] == "search"]
    assert len(searches) == len(results["settings"]["shots"]) * len(results["settings"]["seeds"])
    for r in searches:
        q = r["search"]
        peer_steps = sum(x["steps"] for x in results["runs"]
                         if x["strategy_key"] in peers and x["shots"] == r["shots"] and x["seed"] == r["seed"])
        assert q["budget"]["total"] == peer_steps and q["budget"]["final"] == r["steps"]
        assert q["trial_steps"] + r["steps"] <= peer_steps and q["trial_steps"] == q["trials"] * q["steps_per_trial"]
        assert r["policy"] == q["rows"][0]["policy"] and len(q["rows"]) == q["trials"] <= q["candidates"]
        assert q["search_train_images"] + q["heldout_images"] == r["train_images"]


def test_search_finding_names_the_peers_it_beats_and_why_it_misses_the_others():
    def point(acc, ret, std=0.01):
        return {"acc": stats(acc, std), "ret": stats(ret, std)}

    summary = {("search", 10): point(0.85, 0.90), ("full", 10): point(0.855, 0.70), ("timm", 10): point(0.90, 0.80),
               ("gradual", 10): point(0.90, 0.85)}
    r = {"settings": {"search": {"peers": ["full", "timm"]}}}
    text = render_docs.search_finding(r, summary, 10, ["gradual"], lambda k: k)
    assert "matches or beats on both axes: full;" in text
    assert "not: timm (short on accuracy; matched by the hand-set gradual)" in text
    assert "Higher on both means than the search: none" not in text and "on the frontier of the means" in text
    summary["gradual", 10] = point(0.90, 0.95)
    assert "Higher on both means than the search: gradual." in render_docs.search_finding(
        r, summary, 10, ["gradual"], lambda k: k)


def test_holdout_split_is_stratified_disjoint_and_seeded():
    import numpy as np

    labels = np.repeat(np.arange(5), 10)
    train, held = transfer_bn.holdout_split(labels, 0.4, seed=1)
    assert not set(train) & set(held) and sorted([*train, *held]) == list(range(50))
    assert all((labels[held] == c).sum() == 4 for c in range(5))
    again, _ = transfer_bn.holdout_split(labels, 0.4, seed=1)
    other, _ = transfer_bn.holdout_split(labels, 0.4, seed=2)
    assert list(again) == list(train) and list(other) != list(train)
    budget = transfer_bn.search_budget(10, 30)
    assert budget == {"per_run": 60, "total": 300, "trials": 240, "final": 60}


# ---------------------------------------------------------------------------------------------- the peers' set-up
def test_timm_layer_decay_needs_a_group_matcher_on_an_hf_model():
    model = tiny_model("resnet")
    optimizer, facts = transfer_bn.timm_optimizer(model, 1e-3, 0.5)
    assert facts["timm_lr_scales_without_group_matcher"] == [1.0]  # timm's own fallback: one layer, no decay
    index = transfer_bn.layer_index(model)
    depth = max(index.values())
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(1e-3 * 0.5 ** (depth - index[name]))
    assert not hasattr(model, "group_matcher")


def test_transfer_model_gets_a_new_head_and_the_base_backbone(tmp_path):
    base = tiny_model("resnet", num_labels=5)
    base.save_pretrained(tmp_path)
    model = transfer_bn.load_for_transfer(tmp_path, seed=0)
    assert model.config.id2label[0] == "Sandal"
    for name, value in base.state_dict().items():
        same = torch.equal(value, model.state_dict()[name])
        assert same == (not name.startswith("classifier.")), name


def test_fastai_fine_tune_takes_the_same_steps_as_the_trainer():
    pytest.importorskip("fastai")
    model = tiny_model("resnet", num_labels=3)
    g = torch.Generator().manual_seed(0)
    task = transfer_bn.Task(torch.randn(40, 3, 32, 32, generator=g), torch.randint(0, 3, (40,), generator=g),
                            None, None, None, None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    facts = transfer_bn.train_fastai(model, task, epochs=3, batch_size=16, lr=1e-3, seed=0)
    assert facts["steps"] == 3 * 3  # 40 images at batch 16, last partial batch kept, one frozen + two unfrozen epochs
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "resnet.embedder.embedder.convolution.weight" in moved and "classifier.1.weight" in moved
