"""FSDP2 for real: two CPU processes (torchrun, gloo), a tiny ResNet and a tiny ViT sharded the way accelerate does.

``tests/scripts/fsdp_train.py`` applies the policy to the unsharded model, shards it, trains with a mid-run unfreeze
driven by ``FreezeCallback``, verifies, gathers, saves a delta on rank 0, resumes into a fresh sharded model, loads
rank 0's weights into a rank that started on meta, and corrupts one frozen value on rank 1's shard. The split-
independent digest itself is checked here on every split of a multi-leaf tensor, without processes.
"""

import json

import pytest
import torch
from helpers import identical, tiny_model
from torchrun import torchrun_script

import hf_freeze
from hf_freeze import fingerprint as fp
from hf_freeze.groups import layer_groups

MODELS = ("resnet", "vit")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun_script("fsdp_train.py", out, *MODELS, expect=[f"{m}/rank{r}.pt" for m in MODELS for r in (0, 1)])
    return out, {m: [torch.load(out / m / f"rank{r}.pt", weights_only=False) for r in (0, 1)] for m in MODELS}


def _params(record):
    return [n for n in record["final"] if n in dict(tiny_model(record["model_type"], seed=1).named_parameters())]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODELS)
def test_unsharded_fingerprint_stays_valid_after_sharding(runs, model_type):
    r0, r1 = runs[1][model_type]
    assert r0["world_size"] == 2 and r0["units"] >= 2  # accelerate's auto-wrap units, then the root
    assert set(r0["sharded_params"]) == set(_params(r0))  # every parameter is a DTensor shard
    assert r0["fingerprint_unsharded"] == r0["fingerprint_sharded"] == r1["fingerprint_sharded"]
    whole, sharded = r0["big_linear"]
    assert sharded == r1["big_linear"][1]
    assert whole == {n: d for n, d in sharded.items() if "@" not in n}  # FSDP2 dim-0 shards
    assert sharded["weight@S(1)"] == sharded["weight@R"] == whole["weight"]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODELS)
def test_training_with_a_mid_run_unfreeze_keeps_frozen_tensors_bit_identical(runs, model_type):
    r0, r1 = runs[1][model_type]
    unfrozen = {"resnet": ["stage.1"], "vit": ["stage.1", "neck"]}[model_type]
    assert [e["groups"] for e in r0["events_log"]] == [unfrozen] and r0["events_log"][0]["step"] == 3
    assert r0["unfrozen"] == r1["unfrozen"] == {g: ("step 3", 0.5) for g in unfrozen}
    groups = layer_groups(tiny_model(model_type))
    # still-frozen tensors (buffers included) are bit-identical to the base on both ranks' gathered copies
    for r in (r0, r1):
        assert r["tracked"] and [n for n in r["tracked"] if not identical(r["final"][n], r["base"][n])] == []
    # both ranks gathered the same parameters; the unfrozen groups and the head trained
    assert [n for n in _params(r0) if not identical(r0["final"][n], r1["final"][n])] == []
    moved = {groups.group_of()[n] for n in _params(r0) if not identical(r0["final"][n], r0["base"][n])}
    assert moved == {"head", *unfrozen}
    # per-group learning rates: layer decay 0.5 per group below the head, x lr_scale 0.5 once unfrozen
    depth = {g: len(groups) - 1 - i for i, g in enumerate(groups.names)}
    expected = {g: 0.05 * 0.5 ** depth[g] * (0.5 if g in unfrozen else 1.0) for g in ("head", *unfrozen)}
    assert {name.split("/")[0]: lr for name, lr in r0["lr"].items()} == pytest.approx(expected)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODELS)
def test_delta_saved_from_the_gathered_state_dict_resumes_and_reloads_unsharded(runs, model_type):
    out, records = runs
    r0, r1 = records[model_type]
    manifest = json.loads((out / model_type / "delta" / "freeze_delta.json").read_text())
    assert manifest["version"] == 2 and sorted(manifest["frozen_digests"]) == r0["tracked"]
    assert manifest["frozen_digests"] == {n: r0["fingerprint_unsharded"][n] for n in r0["tracked"]}
    # rank 0 wrote the card's preservation line alone, from the last check made on every rank
    assert r0["card"] == {"preserved": True, "frozen_tensors": len(r0["tracked"]), "fingerprint": manifest["fingerprint"]}
    # resume on the sharded model: events re-fired from the step, delta loaded through torch's state-dict API
    for r in (r0, r1):
        assert r["resumed_unfrozen"] == r0["unfrozen"]
        assert [n for n in r0["final"] if not identical(r["resumed"][n], r0["final"][n])] == []
    # the same delta rebuilds the trained model on an unsharded base, in this process; so does the full checkpoint
    model = tiny_model(model_type, seed=1)
    hf_freeze.apply_delta(model, out / model_type / "delta")
    full = hf_freeze.from_pretrained(out / model_type / "full")
    assert (out / model_type / "full" / "freeze_policy.json").is_file()
    for m in (model, full):
        state = dict(m.named_parameters()) | dict(m.named_buffers())
        assert [n for n in r0["final"] if not identical(state[n], r0["final"][n])] == []


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODELS)
def test_rank_that_started_on_meta_verifies_against_rank_0(runs, model_type):
    r0, r1 = runs[1][model_type]
    assert [n for n in r0["base"] if not identical(r1["late_loaded"][n], r0["base"][n])] == []


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODELS)
def test_corrupting_one_ranks_shard_raises_the_same_error_on_every_rank(runs, model_type):
    r0, r1 = runs[1][model_type]
    assert r0["raised"] is not None and r0["raised"] == r1["raised"]
    assert r0["raised"]["changed"] == sorted(r0["corrupted"])
    assert r0["corrupted"][0] in r0["raised"]["message"] and "after corruption" in r0["raised"]["message"]


# --------------------------------------------------------------------------- the digest, without processes
def _split_digest(t: torch.Tensor, rows: list[int], replicas: int = 1) -> str:
    """What ranks holding ``rows`` consecutive rows each would send, assembled as rank 0 does."""
    total = t.numel() * t.element_size()
    row_bytes = total // t.shape[0]
    parts, start = [], 0
    for n in rows:
        data = fp._host_bytes(t[start:start + n]) if n else memoryview(b"")
        for replica in range(replicas):
            parts.append(((replica,), *fp._leaves_of(start * row_bytes, data, total)))
        start += n
    return fp._assemble("t", t.dtype, t.shape, total, parts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_digest_does_not_depend_on_the_split(dtype):
    t = (torch.randn(37, 1500, generator=torch.Generator().manual_seed(0)) * 50).to(dtype)  # 3-9 leaves
    whole = fp.tensor_digest(t)
    for rows in ([37], [19, 18], [1, 36], [36, 1], [10, 10, 10, 7], [5] * 7 + [2], [0, 37], [13, 0, 24], [1] * 37):
        assert _split_digest(t, rows) == whole, rows
    assert _split_digest(t, [19, 18], replicas=2) == whole  # HSDP: every replica assembles the same digest


def test_digest_sees_any_change_position_and_metadata():
    t = torch.randn(37, 1500, generator=torch.Generator().manual_seed(1))
    whole = fp.tensor_digest(t)
    flat = t.reshape(-1)
    for i in (0, 4095, 4096, 4097, flat.numel() - 1):  # around the first leaf boundary (16 KiB = 4096 floats)
        u = flat.clone()
        u[i] = torch.nextafter(u[i], torch.tensor(float("inf")))
        assert fp.tensor_digest(u.reshape(t.shape)) != whole
        assert _split_digest(u.reshape(t.shape), [19, 18]) != whole
    swapped = torch.cat([t[1:2], t[0:1], t[2:]])
    assert fp.tensor_digest(swapped) != whole  # position matters
    assert fp.tensor_digest(t.reshape(1500, 37)) != whole  # shape is in the header
    assert fp.tensor_digest(t.view(torch.int32)) != whole  # so is dtype
    # a replica that diverged is a change
    total = t.numel() * 4
    bad = flat.clone()
    bad[7] += 1
    parts = [((0,), *fp._leaves_of(0, fp._host_bytes(t), total)), ((1,), *fp._leaves_of(0, fp._host_bytes(bad), total))]
    assert fp._assemble("t", t.dtype, t.shape, total, parts) != whole


def test_a_missing_piece_is_an_error_not_a_digest():
    t = torch.randn(37, 1500)
    total = t.numel() * 4
    parts = [((), *fp._leaves_of(0, fp._host_bytes(t[:19]), total))]  # rank 1's rows never arrived
    with pytest.raises(RuntimeError, match="do not cover leaf"):
        fp._assemble("t", t.dtype, t.shape, total, parts)
