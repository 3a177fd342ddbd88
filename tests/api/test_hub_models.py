"""`fornax serve org/name` with the model only in a local Hugging Face cache layout (a real
server, nothing downloaded): a tag picks its snapshot, --tokenizer is a hub id of its own,
/v1/models shows the id as given, a missing model or tokenizer stops at start with exit 2 naming
every place looked at; a commit hash from --download-dir through the offline LLM. The server
here also checks the switches of the optional routes: --enable-tokenizer-info-endpoint and
--disable-fastapi-docs (main_server has neither: tests/api/test_vllm_routes.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from helpers.api_server import REPO_ROOT, serving, tiny_model_path
from helpers.hub_layout import commit_hash, write_snapshot

REPO, TOK_REPO = "tiny-org/tiny-llama", "tiny-org/tiny-tokenizer"
TEMPLATE = "TOKREPO{% for m in messages %} [{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
GOOD, BROKEN = commit_hash("good"), commit_hash("broken")
KEY = "hub-key"
_CACHE_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_HOME",
               "XDG_CACHE_HOME")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """An HF_HOME whose hub/ holds the tiny llama: main is a broken snapshot (no weights), tag
    v1 the good one; and a tokenizer repo with its own chat template (tag t1)."""
    root = tmp_path_factory.mktemp("hf-home")
    llama = tiny_model_path("llama")
    write_snapshot(root / "hub", REPO, llama, BROKEN, refs=("main",), skip=("model.safetensors",))
    write_snapshot(root / "hub", REPO, llama, GOOD, refs=("v1",))
    write_snapshot(root / "hub", TOK_REPO, llama, commit_hash("tok"), refs=("main", "t1"),
                   skip=("model.safetensors", "config.json"),
                   replace={"chat_template.jinja": TEMPLATE})
    return root


def _env(**values: str) -> dict[str, str]:
    """The server's environment: no inherited cache variable, HOME in the test's folders."""
    return {**{name: "" for name in _CACHE_VARS}, **values}


def test_serve_a_hub_id_by_tag_with_a_hub_tokenizer(home, tmp_path):
    with serving(REPO, "--revision", "v1", "--tokenizer", TOK_REPO, "--tokenizer-revision", "t1",
                 "--max-model-len", "256", "--dtype", "float32", "--api-key", KEY,
                 "--enable-tokenizer-info-endpoint", "--disable-fastapi-docs",
                 env=_env(HF_HOME=str(home), HOME=str(tmp_path))) as server:
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                            timeout=60)
        models = http.get("/v1/models").json()["data"]
        assert [(m["id"], m["root"]) for m in models] == [(REPO, REPO)]  # as given, as vLLM
        r = http.post("/v1/completions", json={"model": REPO, "prompt": "Once upon a time",
                                               "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        rendered = http.post("/v1/chat/completions/render", json={
            "messages": [{"role": "user", "content": "hi"}]}).json()
        assert rendered["prompt"].startswith("TOKREPO [user] hi")  # the tokenizer repo's template
        for path in ("/tokenizer_info", "/get_tokenizer_info"):
            info = http.get(path).json()
            assert info["chat_template"] == TEMPLATE and info["tokenizer_class"].endswith("Fast")
            assert "tokenizer_file" not in info and "vocab_file" not in info
        assert httpx.get(server.url + "/tokenizer_info").status_code == 401  # behind the key
        for path in ("/docs", "/openapi.json"):  # --disable-fastapi-docs: gone, as in vLLM
            assert httpx.get(server.url + path).status_code == 404
        assert http.get("/health").status_code == 200


def test_llm_takes_a_hub_id_by_commit_hash_from_download_dir(home, tmp_path, monkeypatch):
    """--download-dir (download_dir=) comes first; the default cache (home/hub, where main is
    broken) is not reached; a commit hash needs no ref. The offline LLM resolves as the server."""
    from fornax.runtime import LLM

    for name in _CACHE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    download = tmp_path / "dl"
    write_snapshot(download, REPO, tiny_model_path("llama"), GOOD, refs=())
    llm = LLM(REPO, revision=GOOD, download_dir=str(download), dtype="float32", max_model_len=128)
    assert llm.engine.files.path == download / "models--tiny-org--tiny-llama" / "snapshots" / GOOD
    assert len(llm.generate(["Once upon a time"])[0].outputs[0].token_ids) > 0


def _serve_fails(*args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "fornax.api.cli", "serve", *args, "--port", "1"],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO_ROOT),
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_a_missing_model_or_tokenizer_exits_2_naming_every_place(home, tmp_path):
    places = {"--download-dir": tmp_path / "dl", "HF_HUB_CACHE": tmp_path / "hub-cache",
              "TRANSFORMERS_CACHE": tmp_path / "tf-cache", "$HF_HOME/hub": home / "hub"}
    env = _env(HF_HUB_CACHE=str(places["HF_HUB_CACHE"]), HOME=str(tmp_path),
               TRANSFORMERS_CACHE=str(places["TRANSFORMERS_CACHE"]), HF_HOME=str(home))
    log = _serve_fails("tiny-org/absent", "--download-dir", str(places["--download-dir"]),
                       env=env)
    for source, folder in places.items():
        assert f"{folder / 'models--tiny-org--absent'} ({source}: no such folder)" in log, log
    assert "never downloads" in log and "starting the engine core" not in log
    log = _serve_fails(REPO, "--revision", "v9", env=env)
    assert "no ref 'v9' (refs: main, v1)" in log
    log = _serve_fails(str(tiny_model_path("llama")), "--tokenizer", "tiny-org/absent-tok",
                       env=env)
    assert "tokenizer 'tiny-org/absent-tok'" in log and str(places["HF_HUB_CACHE"]) in log
