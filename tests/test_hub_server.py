"""The loopback Hub (tests/hub_server.py) driven by the real huggingface_hub and transformers clients."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx2
import pytest
from conftest_hub import local_hub, local_hub_for  # noqa: F401  (fixture; tests/conftest.py may load the plugin)
from hub_server import LocalHub, git_blob_oid
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    hf_hub_download,
    snapshot_download,
    upload_file,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFolder

REPO = "test-user/tiny"


@pytest.fixture
def hub(local_hub: LocalHub):  # noqa: F811
    """``local_hub``, checked afterwards for requests the server could not route and for server-side crashes."""
    yield local_hub
    assert local_hub.unhandled == [], "the client used routes LocalHub does not implement"
    assert local_hub.errors == [], "LocalHub raised while serving a request"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A small model folder: a 5 MB binary, a README with metadata, a config and a nested file."""
    root = tmp_path / "upload"
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(os.urandom(5 * 1024 * 1024))
    (root / "README.md").write_text("---\nlicense: mit\ntags:\n- test\n---\n# Tiny\n")
    (root / "config.json").write_text(json.dumps({"hidden": 16}))
    (root / "sub" / "notes.txt").write_text("nested")
    return root


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def api_for(hub: LocalHub) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=hub.token)


def commit_folder(api: HfApi, folder: Path):
    """One create_commit of the whole folder: the path transformers' push_to_hub takes (no retry of the commit)."""
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name) for name in local_files(folder)]
    return api.create_commit(REPO, operations=operations, commit_message="add model")


def test_create_repo_exist_ok_and_default_namespace(hub: LocalHub) -> None:
    api = api_for(hub)
    url = api.create_repo(REPO)
    assert url.repo_id == REPO and url.startswith(hub.endpoint)
    assert hub.has_repo(REPO)
    assert list(hub.files(REPO)) == [".gitattributes"]  # like the Hub, a new repo has an initial commit

    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    assert len(hub.commits(REPO)) == 1

    # No namespace: the repo lands in the token owner's namespace (whoami).
    assert api.create_repo("bare-name").repo_id == f"{hub.user}/bare-name"
    assert api.whoami()["name"] == hub.user
    assert api.repo_exists(REPO) and not api.repo_exists("test-user/missing")


def test_writes_need_the_token(hub: LocalHub) -> None:
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.endpoint, token="hf_wrong").create_repo(REPO)
    assert err.value.response.status_code == 401
    assert not hub.has_repo(REPO)


def test_upload_folder_then_download_by_repo_id(hub: LocalHub, folder: Path, tmp_path: Path) -> None:
    api = api_for(hub)
    api.create_repo(REPO)
    info = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="add model")

    expected = local_files(folder)
    stored = hub.files(REPO)
    assert {k: v for k, v in stored.items() if k != ".gitattributes"} == expected
    assert hub.commits(REPO)[0].oid == info.oid and hub.commits(REPO)[0].title == "add model"
    assert sorted(api.list_repo_files(REPO)) == sorted([*expected, ".gitattributes"])

    # hf_hub_download without endpoint=: relies on the fixture's patched constants; fresh cache under HF_HOME.
    for name, content in expected.items():
        path = hf_hub_download(REPO, name)
        assert Path(path).read_bytes() == content
        assert str(tmp_path / "hf_home") in path

    snapshot = Path(snapshot_download(REPO, cache_dir=tmp_path / "fresh_cache"))
    assert snapshot.name == info.oid
    assert {k: v for k, v in local_files(snapshot).items() if k != ".gitattributes"} == expected
    local = Path(snapshot_download(REPO, local_dir=tmp_path / "local_dir"))
    assert {k: v for k, v in local_files(local).items() if not k.startswith((".cache/", ".git"))} == expected

    downloaded = {r.path for r in hub.requests if r.kind == "resolve" and r.method == "GET" and r.status == 200}
    assert f"/{REPO}/resolve/{info.oid}/model.safetensors" in downloaded


def test_unchanged_files_are_not_committed_again(hub: LocalHub, folder: Path) -> None:
    api = api_for(hub)
    api.create_repo(REPO)
    first = api.upload_folder(repo_id=REPO, folder_path=folder)
    again = api.upload_folder(repo_id=REPO, folder_path=folder)  # preupload reports the same blob oids
    assert again.oid == first.oid
    assert len(hub.commits(REPO)) == 2
    assert [r.kind for r in hub.requests].count("commit") == 1


def test_transformers_push_to_hub_and_from_pretrained(hub: LocalHub) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=3
    )
    model = transformers.ResNetForImageClassification(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits

    model.push_to_hub("tiny-resnet")  # no namespace: goes to the token owner's namespace
    repo_id = f"{hub.user}/tiny-resnet"
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub.files(repo_id))

    reloaded = transformers.AutoModelForImageClassification.from_pretrained(repo_id).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, expected)
    assert any(r.kind == "resolve" and r.path.endswith("/model.safetensors") for r in hub.requests)


def test_model_card_push_and_load(hub: LocalHub) -> None:
    api_for(hub).create_repo(REPO)
    card = ModelCard.from_template(ModelCardData(license="mit", tags=["frozen"]), model_description="A tiny model.")
    card.push_to_hub(REPO)  # module-level upload_file + validate-yaml: needs the patched singleton/constants

    loaded = ModelCard.load(REPO)
    assert loaded.data.license == "mit" and loaded.data.tags == ["frozen"]
    assert str(loaded) == str(card)
    assert hub.files(REPO)["README.md"] == str(card).encode()


@pytest.mark.parametrize("drop", [False, True], ids=["http-500", "connection-dropped"])
def test_failed_commit_raises_commits_nothing_and_retry_succeeds(hub: LocalHub, folder: Path, drop: bool) -> None:
    api = api_for(hub)
    api.create_repo(REPO)
    before = hub.commits(REPO)

    hub.fail_next("commit", status=500, drop=drop)
    if drop:
        with pytest.raises(httpx2.RemoteProtocolError, match="disconnected"):
            commit_folder(api, folder)
    else:
        with pytest.raises(HfHubHTTPError, match="500") as err:
            commit_folder(api, folder)
        assert err.value.response.status_code == 500
        assert "injected failure" in str(err.value)
    assert hub.pending_failures == 0
    assert hub.commits(REPO) == before  # nothing committed
    assert list(hub.files(REPO)) == [".gitattributes"]

    info = commit_folder(api, folder)  # the retry goes through
    assert [c.oid for c in hub.commits(REPO)] == [info.oid, *(c.oid for c in before)]
    assert hub.files(REPO)["model.safetensors"] == (folder / "model.safetensors").read_bytes()


def test_lost_commit_response_then_retry_is_a_no_op(hub: LocalHub, folder: Path) -> None:
    api = api_for(hub)
    api.create_repo(REPO)
    hub.fail_next("commit", status=502, after_apply=True)  # the commit lands, its answer is lost
    with pytest.raises(HfHubHTTPError, match="502"):
        commit_folder(api, folder)
    landed = hub.commits(REPO)[0]
    assert landed.title == "add model"

    info = commit_folder(api, folder)
    assert info.oid == landed.oid  # preupload reports the same blob oids: the client skips the commit
    assert len(hub.commits(REPO)) == 2


def test_upload_folder_retries_a_5xx_commit_but_not_a_4xx(hub: LocalHub, folder: Path) -> None:
    # With hf_xet installed, upload_folder goes through huggingface_hub's pipelined upload, which retries the
    # commit POST on 5xx/connection errors (1 s, 2 s, 4 s, 8 s, 8 s) -- unlike create_commit/upload_file.
    api = api_for(hub)
    api.create_repo(REPO)
    hub.fail_next("commit", status=403)
    with pytest.raises(HfHubHTTPError, match="403"):
        api.upload_folder(repo_id=REPO, folder_path=folder)
    assert len(hub.commits(REPO)) == 1

    hub.fail_next("commit", status=503)
    api.upload_folder(repo_id=REPO, folder_path=folder)
    assert [r.status for r in hub.requests if r.kind == "commit"] == [403, 503, 200]
    assert len(hub.commits(REPO)) == 2


def test_failed_push_to_hub_of_transformers_model(hub: LocalHub) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic")
    model = transformers.ResNetForImageClassification(config)

    hub.fail_next("create", status=500)
    with pytest.raises(HfHubHTTPError, match="500"):
        model.push_to_hub(REPO)
    assert not hub.has_repo(REPO)

    hub.fail_next("commit", status=503)
    with pytest.raises(HfHubHTTPError, match="503"):
        model.push_to_hub(REPO)
    assert list(hub.files(REPO)) == [".gitattributes"]  # repo created, upload not committed
    model.push_to_hub(REPO)
    assert "model.safetensors" in hub.files(REPO)


def test_preupload_5xx_is_retried_by_the_client(hub: LocalHub, folder: Path) -> None:
    api = api_for(hub)
    api.create_repo(REPO)
    hub.fail_next("preupload", status=503)  # http_backoff retries it (after ~1 s)
    api.upload_folder(repo_id=REPO, folder_path=folder)
    assert [r.status for r in hub.requests if r.kind == "preupload"] == [503, 200]
    assert "config.json" in hub.files(REPO)


def test_download_failure_raises(hub: LocalHub, tmp_path: Path) -> None:
    hub.create_repo(REPO)
    hub.commit(REPO, {"config.json": "{}"})
    hub.fail_next("resolve", status=500, method="GET")  # the HEAD succeeds, the GET of the content fails
    with pytest.raises(HfHubHTTPError, match="500"):
        hf_hub_download(REPO, "config.json", cache_dir=tmp_path / "c")
    assert Path(hf_hub_download(REPO, "config.json", cache_dir=tmp_path / "c")).read_text() == "{}"


def test_old_revision_stays_downloadable(hub: LocalHub, tmp_path: Path) -> None:
    api = api_for(hub)
    api.create_repo(REPO)
    v1 = upload_file(path_or_fileobj=b'{"v": 1}', path_in_repo="config.json", repo_id=REPO).oid
    v2 = upload_file(path_or_fileobj=b'{"v": 2}', path_in_repo="config.json", repo_id=REPO).oid
    assert v1 != v2
    assert [c.oid for c in hub.commits(REPO)[:2]] == [v2, v1]
    assert [c.commit_id for c in api.list_repo_commits(REPO)][:2] == [v2, v1]

    cache = tmp_path / "cache"
    assert Path(hf_hub_download(REPO, "config.json", cache_dir=cache)).read_bytes() == b'{"v": 2}'
    assert Path(hf_hub_download(REPO, "config.json", revision=v1, cache_dir=cache)).read_bytes() == b'{"v": 1}'
    old = Path(snapshot_download(REPO, revision=v1, cache_dir=tmp_path / "snap"))
    assert (old / "config.json").read_bytes() == b'{"v": 1}'
    assert hub.files(REPO, revision=v1)["config.json"] == b'{"v": 1}'
    assert api.model_info(REPO, revision=v1).sha == v1


def test_branches_tags_and_pull_requests(hub: LocalHub, tmp_path: Path) -> None:
    api = api_for(hub)
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"main", path_in_repo="f.txt", repo_id=REPO)
    api.create_branch(REPO, branch="dev")
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="f.txt", repo_id=REPO, revision="dev")
    api.create_tag(REPO, tag="v1", revision="dev")
    pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="f.txt", repo_id=REPO, create_pr=True)
    pr_folder = tmp_path / "pr2"
    pr_folder.mkdir()
    (pr_folder / "f.txt").write_bytes(b"pr2")
    pr2 = api.upload_folder(repo_id=REPO, folder_path=pr_folder, create_pr=True)  # opens the PR first

    assert pr.pr_revision == "refs/pr/1"
    assert hub.files(REPO)["f.txt"] == b"main"
    assert hub.files(REPO, "v1")["f.txt"] == b"dev"
    assert hub.files(REPO, "refs/pr/1")["f.txt"] == b"pr"
    assert pr2.pr_revision == "refs/pr/2" and hub.files(REPO, "refs/pr/2")["f.txt"] == b"pr2"
    assert Path(hf_hub_download(REPO, "f.txt", revision="refs/pr/1", cache_dir=tmp_path)).read_bytes() == b"pr"
    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "dev"} and [t.name for t in refs.tags] == ["v1"]
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1", "refs/pr/2"]


def test_missing_repo_revision_and_file_raise_typed_errors(hub: LocalHub, tmp_path: Path) -> None:
    hub.create_repo(REPO)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-user/missing", "config.json", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="nope", cache_dir=tmp_path)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "config.json", cache_dir=tmp_path)


def test_private_repo_is_invisible_without_token(hub: LocalHub) -> None:
    api_for(hub).create_repo(REPO, private=True)
    assert api_for(hub).model_info(REPO).private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info(REPO)


def test_fail_next_rejects_unknown_route_kinds() -> None:
    with LocalHub() as hub, pytest.raises(ValueError, match="unknown route kind"):
        hub.fail_next("comit")


def test_server_side_helpers_match_what_clients_see(hub: LocalHub) -> None:
    hub.create_repo(REPO, repo_type="dataset")
    oid = hub.commit(REPO, {"data/train.csv": "a,b\n1,2\n"}, repo_type="dataset")
    tree = {f.path: f for f in api_for(hub).list_repo_tree(REPO, repo_type="dataset", recursive=True)}
    assert isinstance(tree["data"], RepoFolder)
    assert tree["data/train.csv"].blob_id == git_blob_oid(b"a,b\n1,2\n")
    assert api_for(hub).dataset_info(REPO).sha == oid


def test_resolve_headers_and_range_requests(hub: LocalHub) -> None:
    hub.create_repo(REPO)
    content = bytes(range(256)) * 40
    oid = hub.commit(REPO, {"weights/w.bin": content})
    url = f"{hub.endpoint}/{REPO}/resolve/main/weights/w.bin"

    head = httpx2.head(url)
    assert head.status_code == 200
    assert head.headers["X-Repo-Commit"] == oid
    assert head.headers["ETag"] == f'"{git_blob_oid(content)}"'
    assert int(head.headers["Content-Length"]) == len(content)

    part = httpx2.get(url, headers={"Range": "bytes=100-"})
    assert part.status_code == 206 and part.content == content[100:]
    assert part.headers["Content-Range"] == f"bytes 100-{len(content) - 1}/{len(content)}"

    entries = api_for(hub).list_repo_tree(REPO, path_in_repo="weights")
    assert [(e.path, e.size) for e in entries] == [("weights/w.bin", len(content))]


def test_local_hub_for_rebuilds_and_restores_transformers_shared_api(tmp_path: Path) -> None:
    tf_hub = pytest.importorskip("transformers.utils.hub")
    stale = HfApi(endpoint="http://127.0.0.1:9")  # e.g. built by an earlier test against another endpoint
    endpoint_before = constants.ENDPOINT
    with pytest.MonkeyPatch.context() as outer:
        outer.setattr(tf_hub, "_hf_api", stale)
        with pytest.MonkeyPatch.context() as mp, local_hub_for(mp, tmp_path) as hub:
            assert tf_hub.hf_api().endpoint == hub.endpoint
            assert constants.ENDPOINT == hub.endpoint and os.environ["HF_ENDPOINT"] == hub.endpoint
            assert constants.HF_HUB_CACHE == str(tmp_path / "hub")
        assert tf_hub._hf_api is stale
        assert constants.ENDPOINT == endpoint_before
