"""Tests of tools/make_tiny_model.py: determinism, HF loading, non-degenerate greedy, cache."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from itertools import combinations
from pathlib import Path

import pytest

from tools import make_tiny_model as mk

ARCHS = list(mk.ARCHS)
PROMPTS = ["The quick brown fox", "What is the capital of France?", "def fibonacci(n):"]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
]
CHATML = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TEXTS = [
    "Hello, world! 3.14159 and 2048 tokens.",
    "def f(x):\n\treturn x ** 2  # squares\n",
    "  leading spaces, naïve café, 東京, emoji 🙂, I'm sure you'll see.",
]


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_build_is_deterministic(tmp_path: Path, tiny_model: Callable[..., Path]) -> None:
    for arch in ARCHS:
        first = _file_bytes(mk.build_tiny_model(arch, tmp_path / f"{arch}-a", seed=0))
        second = _file_bytes(mk.build_tiny_model(arch, tmp_path / f"{arch}-b", seed=0))
        assert "model.safetensors" in first and "tokenizer.json" in first
        assert first == second, arch
        # The cached copy may come from an earlier process: this also checks across processes.
        assert _file_bytes(tiny_model(arch)) == first, arch
    other_seed = _file_bytes(mk.build_tiny_model("llama", tmp_path / "llama-s1", seed=1))
    assert other_seed["model.safetensors"] != _file_bytes(tmp_path / "llama-a")["model.safetensors"]
    assert other_seed["tokenizer.json"] == _file_bytes(tmp_path / "llama-a")["tokenizer.json"]


def test_tokenizer_training_is_deterministic_across_processes(tmp_path: Path) -> None:
    # The Rust trainer uses hash maps; a fresh process (other hash seeds) must give the same JSON.
    script = (
        "import sys; from tools import make_tiny_model as mk; "
        "sys.stdout.write(mk._train_tokenizer(sys.argv[1]).to_str(pretty=True))"
    )
    for style in ("gpt2", "qwen"):
        proc = subprocess.run(
            [sys.executable, "-c", script, style],
            check=False,
            cwd=mk.REPO_ROOT,
            env={**os.environ, "PYTHONHASHSEED": "123"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == mk._train_tokenizer(style).to_str(pretty=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_config_shapes(arch: str, tiny_model: Callable[..., Path]) -> None:
    from safetensors import safe_open

    path = tiny_model(arch)
    config = json.loads((path / "config.json").read_text())
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    num_tokens = len(tokenizer["model"]["vocab"])
    assert config["vocab_size"] >= num_tokens
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    assert config["hidden_size"] == 64 and config["max_position_embeddings"] == 2048
    assert [t["content"] for t in tokenizer["added_tokens"]] == list(mk.SPECIAL_TOKENS)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype.is_floating_point for k in keys)
        assert f.get_tensor("model.embed_tokens.weight").dtype.itemsize == 4  # float32
    assert ("lm_head.weight" in keys) == (not config["tie_word_embeddings"])
    expected = {
        "llama": ("LlamaForCausalLM", 4, 2, True),
        "llama-mha": ("LlamaForCausalLM", 4, 4, False),
        "qwen2": ("Qwen2ForCausalLM", 4, 2, False),
        "qwen3": ("Qwen3ForCausalLM", 4, 2, True),
    }[arch]
    got = (
        config["architectures"][0],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["tie_word_embeddings"],
    )
    assert got == expected
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in keys
    if arch == "qwen3":
        assert config["head_dim"] == 32 != config["hidden_size"] // config["num_attention_heads"]
        assert "model.layers.0.self_attn.q_norm.weight" in keys
    if arch == "llama-mha":  # legacy (pre-transformers-5) spelling, as Llama-3.1 ships it
        assert config["rope_scaling"]["rope_type"] == "llama3"
        assert config["rope_scaling"]["factor"] == 8.0
        assert config["rope_scaling"]["original_max_position_embeddings"] == 256
        assert "rope_theta" in config and "rope_parameters" not in config
    else:
        assert config["rope_parameters"]["rope_type"] == "default"


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_loads_and_greedy_is_non_degenerate(arch: str, tiny_model: Callable[..., Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model(arch)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if arch == "llama-mha":
        assert model.config.rope_parameters["rope_type"] == "llama3"
    outputs: list[list[int]] = []
    gaps: list[float] = []
    for prompt in PROMPTS:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        result = model.generate(
            input_ids,
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        new_ids = result.sequences[0, input_ids.shape[1] :].tolist()
        assert len(new_ids) == 24
        assert len(set(new_ids)) >= 8, (arch, prompt, new_ids)  # no short loop
        assert max(new_ids) < len(tokenizer)  # padded vocab rows never win
        outputs.append(new_ids)
        for logits in result.logits:
            top2 = logits[0].topk(2).values
            gaps.append(float(top2[0] - top2[1]))
    for a, b in combinations(outputs, 2):
        assert a != b
    assert statistics.median(gaps) > 0.1, (arch, sorted(gaps)[:5])


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_round_trip_and_chat_template(arch: str, tiny_model: Callable[..., Path]) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = tiny_model(arch)
    hf = AutoTokenizer.from_pretrained(path)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    assert 450 <= len(hf) <= 512
    for text in TEXTS:
        ids = raw.encode(text).ids
        assert hf(text).input_ids == ids  # HF and the plain `tokenizers` front agree; no BOS
        assert ids[0] != hf.bos_token_id
        assert raw.decode(ids) == text == hf.decode(ids)
    rendered = hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered == CHATML
    assert raw.encode(rendered).ids.count(1) == 3  # <|im_start|> stays one special token
    assert hf.apply_chat_template(CHAT, tokenize=False) == CHATML.removesuffix(
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_location(arch: str, tiny_model: Callable[..., Path]) -> None:
    path = tiny_model(arch)
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] is False
    if arch == "qwen3":
        assert (path / "chat_template.jinja").is_file()
        assert "chat_template" not in tokenizer_config
    else:
        assert not (path / "chat_template.jinja").exists()
        assert "<|im_start|>" in tokenizer_config["chat_template"]


def test_generation_configs(tiny_model: Callable[..., Path]) -> None:
    qwen3 = json.loads((tiny_model("qwen3") / "generation_config.json").read_text())
    assert qwen3["do_sample"] is True and qwen3["temperature"] == 0.7 and qwen3["top_p"] == 0.9
    assert qwen3["eos_token_id"] == [2, 0]
    llama = json.loads((tiny_model("llama") / "generation_config.json").read_text())
    assert llama["eos_token_id"] == 2 and "temperature" not in llama


def test_tiny_model_dir_caches_and_survives_a_race(tmp_path: Path) -> None:
    calls: list[str] = []

    def fake_builder(arch: str, out_dir: Path, *, seed: int = 0) -> Path:
        calls.append(arch)
        (Path(out_dir) / "marker").write_text(f"{arch}-{seed}-{len(calls)}")
        if len(calls) == 1:  # another process finishes the same key while we are building
            mk.tiny_model_dir(arch, tmp_path, seed=seed, builder=fake_builder)
        return Path(out_dir)

    first = mk.tiny_model_dir("llama", tmp_path, builder=fake_builder)
    assert len(calls) == 2
    assert (first / "marker").read_text() == "llama-0-2"  # the winner's files, intact
    assert mk.tiny_model_dir("llama", tmp_path, builder=fake_builder) == first
    assert len(calls) == 2  # cached: no rebuild
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # temp dirs cleaned up
    assert f"-v{mk.GENERATOR_VERSION}-" in first.name
    with pytest.raises(ValueError):
        mk.tiny_model_dir("gpt-neo", tmp_path, builder=fake_builder)
