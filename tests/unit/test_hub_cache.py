"""Hub ids from the local Hugging Face cache (runtime/loaders/hub_cache.py): refs and commit
hashes, the order of the caches, the tokenizer's own id and revision, the error that names every
place looked at; and that the loader has no network code at all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fornax.runtime.config import make_engine_config
from fornax.runtime.errors import ConfigError, ModelLoadError
from fornax.runtime.loaders import hub_cache, model_files
from fornax.runtime.loaders.model_files import files_for, resolve_model_path
from helpers.hub_layout import commit_hash, write_snapshot

_CACHE_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_HOME",
               "XDG_CACHE_HOME")
REPO = "tiny-org/tiny-llama"


@pytest.fixture
def caches(tmp_path, monkeypatch) -> Path:
    """No cache variable set, the home folder in tmp_path (so the default cache is empty)."""
    for name in _CACHE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture(scope="module")
def llama(tiny_model) -> Path:
    return tiny_model("llama")


def test_default_revision_is_refs_main_a_tag_and_a_hash_pick_their_snapshot(caches, monkeypatch,
                                                                            llama):
    cache = caches / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    main, tagged = commit_hash("main"), commit_hash("v1")
    write_snapshot(cache, REPO, llama, main, refs=("main",))
    write_snapshot(cache, REPO, llama, tagged, refs=("v1", "pr/7"))
    assert resolve_model_path(REPO).name == main
    assert resolve_model_path(REPO, "v1").name == tagged
    assert resolve_model_path(REPO, "pr/7").name == tagged  # nested refs, as refs/pr/7
    assert resolve_model_path(REPO, tagged).name == tagged  # a commit hash needs no ref
    files = model_files.resolve_model_files(REPO, revision="v1")
    assert files.path.name == tagged and files.source == REPO
    assert files.hf_config["model_type"] == "llama" and files.tokenizer_path == files.path
    with pytest.raises(ModelLoadError, match=r"no ref 'v2' \(refs: main, pr/7, v1\)"):
        resolve_model_path(REPO, "v2")
    with pytest.raises(ModelLoadError, match="not a branch, tag or commit hash"):
        resolve_model_path(REPO, "../../etc")
    with pytest.raises(ConfigError, match="revision '../x' is not a branch"):
        make_engine_config(REPO, revision="../x")


def test_the_caches_are_searched_in_order_and_the_first_snapshot_wins(caches, monkeypatch, llama):
    places = {"download": caches / "dl", "HF_HUB_CACHE": caches / "a",
              "HUGGINGFACE_HUB_CACHE": caches / "b", "TRANSFORMERS_CACHE": caches / "c",
              "HF_HOME": caches / "home-hf"}
    for label, folder in places.items():
        cache = folder / "hub" if label == "HF_HOME" else folder
        write_snapshot(cache, REPO, llama, commit_hash(label))
        if label != "download":
            monkeypatch.setenv(label, str(folder))
    order = list(places)
    for i, label in enumerate(order):
        download = str(places["download"]) if i == 0 else None
        assert resolve_model_path(REPO, download_dir=download).name == commit_hash(label)
        if label != "download":
            monkeypatch.delenv(label)
    # nothing set: $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub
    write_snapshot(caches / "home" / ".cache" / "huggingface" / "hub", REPO, llama,
                   commit_hash("home"))
    assert resolve_model_path(REPO).name == commit_hash("home")
    monkeypatch.setenv("XDG_CACHE_HOME", str(caches / "xdg"))
    write_snapshot(caches / "xdg" / "huggingface" / "hub", REPO, llama, commit_hash("xdg"))
    assert resolve_model_path(REPO).name == commit_hash("xdg")


def test_a_missing_model_names_every_place_looked_at(caches, monkeypatch, llama):
    monkeypatch.setenv("HF_HUB_CACHE", str(caches / "a"))
    monkeypatch.setenv("TRANSFORMERS_CACHE", str(caches / "c"))
    monkeypatch.setenv("HF_HOME", str(caches / "hf"))
    write_snapshot(caches / "c", REPO, llama, commit_hash("old"), refs=("v0",))
    with pytest.raises(ModelLoadError) as err:
        resolve_model_path(REPO, download_dir=str(caches / "dl"))
    text = str(err.value)
    for folder, source in ((caches / "dl", "--download-dir"), (caches / "a", "HF_HUB_CACHE"),
                           (caches / "c", "TRANSFORMERS_CACHE"), (caches / "hf" / "hub",
                                                                  "$HF_HOME/hub")):
        assert f"{folder / 'models--tiny-org--tiny-llama'} ({source}:" in text
    assert "no ref 'main' (refs: v0)" in text and "never downloads" in text
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path("./no/such/folder")  # not a hub id: a missing path
    with pytest.raises(ModelLoadError, match=r"no snapshot [0-9a-f]{40}"):
        resolve_model_path(REPO, commit_hash("never written"), str(caches / "c"))


def test_the_tokenizer_is_a_hub_id_with_its_own_revision(caches, monkeypatch, llama):
    cache = caches / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    write_snapshot(cache, REPO, llama, commit_hash("model"))
    template = "TOKREPO {{ messages[0]['content'] }}"
    tok = write_snapshot(cache, "tiny-org/tok", llama, commit_hash("tok"), refs=("main", "t1"),
                         skip=("model.safetensors", "config.json"),
                         replace={"chat_template.jinja": template})
    files = files_for(make_engine_config(REPO, tokenizer="tiny-org/tok",
                                         tokenizer_revision="t1").model_config)
    assert files.tokenizer_path == tok and files.path.name == commit_hash("model")
    assert files_for(make_engine_config(REPO, tokenizer=REPO).model_config).tokenizer_dir is None
    with pytest.raises(ModelLoadError, match="tokenizer 'tiny-org/tok' .*no ref 'nope'"):
        files_for(make_engine_config(REPO, tokenizer="tiny-org/tok",
                                     tokenizer_revision="nope").model_config)
    with pytest.raises(ModelLoadError, match="has no tokenizer.json"):
        files_for(make_engine_config(REPO, tokenizer=str(caches)).model_config)


def test_the_hub_cache_module_has_no_network_code():
    """Nothing that could reach a hub: no HTTP client, socket or huggingface_hub import."""
    source = Path(hub_cache.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "logging", "re", "dataclasses", "pathlib", "fornax"}
