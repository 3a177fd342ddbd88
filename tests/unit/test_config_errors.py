"""Bad engine arguments and bad model folders raise typed errors with clear messages."""

from __future__ import annotations

import json
import shutil

import pytest

from fornax.runtime import LLM, SamplingParams
from fornax.runtime.config import make_engine_config
from fornax.runtime.errors import ConfigError, FornaxError, ModelLoadError


@pytest.mark.parametrize("kwargs, message", [
    ({"block_size": 0}, "block_size must be a positive integer"),
    ({"block_size": 16, "max_num_batched_tokens": 8}, "at least the block size"),
    ({"max_num_seqs": -1}, "max_num_seqs"),
    ({"dtype": "int3"}, "dtype must be one of"),
    ({"load_format": "pickle"}, "load_format must be one of"),
    ({"quantization": "awq"}, "quantization must be one of gguf"),
    ({"scheduling_policy": "random"}, "scheduling policy"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"no_such_flag": 1}, "unknown engine argument"),
    ({"enable_chunked_prefill": False, "max_num_batched_tokens": 64, "max_model_len": 128},
     "without chunked prefill"),
    ({"grammar_compile_timeout_s": 0}, "grammar_compile_timeout_s"),
    ({"grammar_compile_timeout_s": float("nan")}, "grammar_compile_timeout_s"),
    ({"grammar_compile_threads": 1000}, "grammar_compile_threads must be at most"),
    ({"grammar_cache_bytes": -1}, "grammar_cache_bytes"),
])
def test_bad_engine_arguments_raise_config_error(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        make_engine_config("some-model", **kwargs)


def test_missing_model_path(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        LLM(str(tmp_path))


def test_unknown_architecture(tiny_model, tmp_path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported model architecture.*FancyNew"):
        LLM(str(folder))


def test_missing_weights_and_corrupt_weights(tiny_model, tmp_path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LLM(str(folder))
    weights.unlink()
    with pytest.raises(ModelLoadError, match="no .safetensors weights"):
        LLM(str(folder))


def test_context_longer_than_the_model_is_refused(tiny_model) -> None:
    with pytest.raises(ConfigError, match="larger than the model's maximum context"):
        LLM(str(tiny_model("llama")), max_model_len=1_000_000)


def test_kv_pool_smaller_than_one_sequence_is_refused(tiny_model) -> None:
    with pytest.raises(ConfigError, match="less than one sequence"):
        LLM(str(tiny_model("llama")), max_model_len=512, num_gpu_blocks=4)


def test_dummy_weights_need_no_checkpoint(tiny_model, tmp_path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_model("qwen3"), folder)
    (folder / "model.safetensors").unlink()
    llm = LLM(str(folder), load_format="dummy", max_model_len=128)
    out = llm.generate("hello", None)
    assert out[0].outputs[0].token_ids
    assert issubclass(ModelLoadError, FornaxError) and issubclass(ConfigError, FornaxError)


def test_rotary_tables_cover_a_context_named_by_another_key(tiny_model, tmp_path) -> None:
    """A config that gives its context as max_seq_len (no max_position_embeddings): the rotary
    tables cover all of max_model_len (they held 2,048 positions, and the C kernels read the
    positions past them out of bounds), and a prompt past position 2,048 generates."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("max_position_embeddings", None)
    config["max_seq_len"] = 2304
    (folder / "config.json").write_text(json.dumps(config))
    llm = LLM(str(folder), enable_prefix_caching=False)
    rotary = llm.engine.runner.model.model.layers[0].self_attn.rotary
    assert llm.engine.max_model_len == 2304 and rotary.cos_cache.shape[0] >= 2304
    out = llm.generate({"prompt_token_ids": [(5 * i) % 90 + 5 for i in range(2200)]},
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8


def test_an_empty_or_padded_api_key_is_refused(monkeypatch) -> None:
    """An empty --api-key let in `Authorization: Bearer` with no key; a padded one could never
    match (the presented key is stripped). An empty variable still means no key."""
    from fornax.api.server.api_keys import server_keys

    for keys in ([""], ["k", " k2"], ["k\t"]):
        with pytest.raises(ConfigError, match="--api-key"):
            server_keys(keys)
    monkeypatch.setenv("FORNAX_API_KEY", "")
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert server_keys(None) == [] and server_keys(["a b", "k"]) == ["a b", "k"]
