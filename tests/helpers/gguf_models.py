"""A tiny random Llama written as a GGUF file with a chosen quantization type per tensor (tests)."""

from __future__ import annotations

import json
import pathlib

import gguf
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

T = gguf.GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "Sphinx of black quartz, judge my vow. How vexingly quick daft zebras jump? 0123456789 "
) * 4
# Llama shape whose every in_features is a multiple of 256 (the K-quants' super-block)
SHAPE = {"hidden": 256, "intermediate": 512, "layers": 2, "heads": 4, "kv_heads": 2}
# Per-tensor types: fused q|k|v and gate|up mix kinds (row segments), one fused weight is part
# dense (F16: the loader dequantizes the quantized part into it), the tied embedding is Q8_0.
MIXED_TYPES: dict[str, T] = {
    "token_embd": T.Q8_0,
    "attn_q": T.Q4_0, "attn_k": T.Q4_K, "attn_v": T.Q6_K, "attn_output": T.Q4_1,
    "ffn_gate": T.Q4_K, "ffn_up": T.Q8_0, "ffn_down": T.Q6_K,
    "blk.1.ffn_up": T.F16,
}


def byte_level_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    return tok


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def k_quant_blocks(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random but valid Q4_K / Q6_K blocks (the gguf package cannot quantize K-quants): raw
    uint8 [rows, cols // 256 * block bytes], weights of magnitude about 0.05."""
    n = rows * (cols // 256)
    if qtype == T.Q4_K:  # d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        d = _f16_bytes(rng.uniform(2e-4, 4e-4, n))
        dmin = _f16_bytes(rng.uniform(2e-4, 4e-4, n))
        scales = rng.integers(0, 256, (n, 12), dtype=np.uint8)
        qs = rng.integers(0, 256, (n, 128), dtype=np.uint8)
        blocks = np.concatenate([d, dmin, scales, qs], axis=1)
    elif qtype == T.Q6_K:  # 128 bytes low nibbles, 64 bytes high bits, 16 int8 scales, d (f16)
        ql = rng.integers(0, 256, (n, 128), dtype=np.uint8)
        qh = rng.integers(0, 256, (n, 64), dtype=np.uint8)
        sc = rng.integers(-12, 13, (n, 16)).astype(np.int8).view(np.uint8)
        d = _f16_bytes(rng.uniform(1e-4, 2e-4, n))
        blocks = np.concatenate([ql, qh, sc, d], axis=1)
    else:
        raise ValueError(qtype)
    assert blocks.shape[1] == gguf.GGML_QUANT_SIZES[qtype][1]
    return np.ascontiguousarray(blocks.reshape(rows, -1))


def _tensor(w: gguf.GGUFWriter, name: str, qtype: T, shape: tuple[int, int],
            rng: np.random.Generator) -> None:
    rows, cols = shape
    if qtype in (T.Q4_K, T.Q6_K):
        w.add_tensor(name, k_quant_blocks(qtype, rows, cols, rng), raw_dtype=qtype)
        return
    values = rng.normal(0.0, 0.05, shape).astype(np.float32)
    if qtype == T.F16:
        w.add_tensor(name, values.astype(np.float16))
    elif qtype == T.F32:
        w.add_tensor(name, values)
    else:
        w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)


def write_llama_gguf(path: pathlib.Path, types: dict[str, T] | None = None,
                     seed: int = 0) -> pathlib.Path:
    """A 2-layer Llama (hidden 256) with byte-level BPE and a chat template, as `path`.
    `types` maps a tensor kind (`attn_q`) or one tensor (`blk.1.ffn_up`) to its type."""
    types = dict(MIXED_TYPES if types is None else types)
    rng = np.random.default_rng(seed)
    h, inter, heads, kv = (SHAPE[k] for k in ("hidden", "intermediate", "heads", "kv_heads"))
    head_dim = h // heads
    tok = byte_level_tokenizer()
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-quant")
    w.add_block_count(SHAPE["layers"])
    w.add_context_length(512)
    w.add_embedding_length(h)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}")

    def typ(kind: str, name: str) -> T:
        return types.get(name, types.get(kind, T.F32))

    _tensor(w, "token_embd.weight", typ("token_embd", "token_embd"), (len(tokens), h), rng)
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(h)).astype(np.float32))
    shapes = {"attn_q": (h, h), "attn_k": (kv * head_dim, h), "attn_v": (kv * head_dim, h),
              "attn_output": (h, h), "ffn_gate": (inter, h), "ffn_up": (inter, h),
              "ffn_down": (h, inter)}
    for i in range(SHAPE["layers"]):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight",
                         (1 + 0.1 * rng.standard_normal(h)).astype(np.float32))
        for kind, shape in shapes.items():
            _tensor(w, f"blk.{i}.{kind}.weight", typ(kind, f"blk.{i}.{kind}"), shape, rng)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
