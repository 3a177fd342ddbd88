"""A `vllm serve` launch line run as `fornax serve`: it starts, logs its no-ops, and bad ones exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from helpers.api_server import REPO_ROOT, serving, tiny_model_path

# what the template shows: the default kwarg comes from --default-chat-template-kwargs
TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
            "{{ ' thinking' if enable_thinking else ' quiet' }}")


def _rendered(url: str, **extra: object) -> str:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], **extra}
    ids = httpx.post(url + "/tokenize", json=body, timeout=30).json()["tokens"]
    return str(httpx.post(url + "/detokenize", json={"model": "tiny", "tokens": ids},
                          timeout=30).json()["prompt"])


def test_a_vllm_launch_line_with_many_flags_serves(tmp_path):
    config = tmp_path / "server.yaml"
    config.write_text("served_model_name: tiny\nmax-model-len: 512\ndtype: float32\n"
                      "enable-prefix-caching: true\ndata-parallel-size: 1\n")
    args = ("--config", str(config), "--disable-log-stats", "-pp", "1", "-dp", "1",
            "--kv-cache-dtype", "auto", "--async-scheduling", "--max_num_seqs", "8",
            "--default-chat-template-kwargs", '{"enable_thinking": false}',
            "--enable-prompt-tokens-details", "--attention-backend", "TORCH_SDPA", "-O3",
            "-cc.cudagraph_mode", "NONE", "-cc.splitting_ops+", "a,b", "--trust-remote-code",
            "--max-num-queued-reqs", "64", "--disable-lora", "--uvicorn-log-level", "WARNING",
            "--gpu-memory-utilization", "0.5", "-tp", "1", "--chat-template", TEMPLATE, "--load-format", "DUMMY",
            "--tokenizer-mode", "auto", "--enable-chunked-prefill", "--no-enable-log-outputs")
    with serving(str(tiny_model_path("llama")), *args) as server:
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        models = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
        assert models[0]["id"] == "tiny" and models[0]["max_model_len"] == 512
        assert _rendered(server.url).endswith("hello quiet")
        assert _rendered(server.url, chat_template_kwargs={"enable_thinking": True}
                         ).endswith("hello thinking")
        out = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]}).json()
        assert out["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        log = server.log()
    for line in ("--disable-log-stats true: accepted, no effect in fornax",
                 "--pipeline-parallel-size 1: accepted", "--data-parallel-size 1: accepted",
                 "--kv-cache-dtype auto: accepted", "--async-scheduling true: accepted",
                 '--compilation-config splitting_ops=["a", "b"]: accepted, no effect',
                 "--trust-remote-code true: accepted", "--enable-lora false: vLLM's default",
                 "--uvicorn-log-level warning: accepted"):
        assert line in log, line
    assert "'attention_backend': 'torch_ref'" in log and "'use_cuda_graphs': False" in log


def _serve_fails(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fornax.api.cli", "serve",
                           str(tiny_model_path("llama")), "--port", "1", *args],
                          capture_output=True, text=True, timeout=60, cwd=str(REPO_ROOT),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_unsupported_flags_and_bad_values_exit_2_naming_the_flag(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("max-model-len: 512\nswap-space: 4\n")
    for args, named in ((["-pp", "2"], "--pipeline-parallel-size 2: not supported by fornax"),
                        (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8: not supported"),
                        (["--enable-lora"], "--enable-lora true: not supported by fornax: LoRA"),
                        (["--speculative-config", '{"method": "ngram"}'],
                         "--speculative-config"),
                        (["--max_model_len", "many"], "argument --max-model-len: not a size"),
                        (["--attention-backend", "FLASH_ATTN"],
                         "argument --attention-backend: invalid choice 'FLASH_ATTN'"),
                        (["--config", str(bad_yaml)], "unknown key 'swap-space'"),
                        (["-ac.backend", "TRITON_ATTN"], "--attention-config backend"),
                        (["--no-such-flag"], "unrecognized arguments: --no-such-flag")):
        out = _serve_fails(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert named in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr and "starting the engine core" not in out.stderr
