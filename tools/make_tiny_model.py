"""Generate seeded tiny random HF checkpoints (Llama/Qwen2/Qwen3) for the tests; a CLI tool."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tools.tiny_checkpoint import (
    REPO_ROOT,
    TRAINING_TEXT,
    cached_checkpoint,
    cli,
    init_parameters,
    write_json,
)

__all__ = ["ARCHS", "GENERATOR_VERSION", "REPO_ROOT", "SPECIAL_TOKENS", "build_tiny_model",
           "tiny_model_dir"]

logger = logging.getLogger(__name__)

# Bump when the generated files change meaning (the cache key also hashes this file's source and
# tools/tiny_checkpoint.py's).
GENERATOR_VERSION = 1

ARCHS: tuple[str, ...] = ("llama", "llama-mha", "qwen2", "qwen3")

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TOKENIZER_VOCAB = 500
MODEL_VOCAB = 512  # tokenizer size rounded up; rows >= len(tokenizer) are zero (never argmax)
MAX_POSITIONS = 2048

# Init scales, tuned empirically so greedy decoding is non-degenerate with clear top-1/top-2
# margins (tests/unit/test_tiny_models.py checks both). Weight std of a linear = gain / sqrt(fan_in).
EMBED_STD = 1.0  # tied archs: logits std ~= EMBED_STD * sqrt(hidden) = 8
LM_HEAD_STD = 1.0  # untied archs: logits std ~= LM_HEAD_STD * sqrt(hidden) = 8
# q/k/v/gate/up: gain 2 makes attention sharp and the MLP strongly non-linear, so the next token
# depends on the context rather than falling into "repeat token A forever" fixed points.
LINEAR_GAIN = 2.0
# o_proj/down_proj: block outputs must outweigh the token's own embedding in the residual, or a
# tied model keeps predicting its input token.
OUT_PROJ_GAIN = 20.0
BIAS_STD = 0.2
NORM_STD = 0.1  # norm weights = 1 + NORM_STD * N(0, 1): a loader that drops them cannot pass parity

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def _arch_config_kwargs(arch: str) -> tuple[str, dict[str, Any]]:
    """Return (transformers config class name, kwargs) for one architecture."""
    common: dict[str, Any] = {  # 2 layers of grouped-query attention unless an arch says otherwise
        "vocab_size": MODEL_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "initializer_range": 0.02,  # unused: weights are set by _init_weights below
        "hidden_act": "silu",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    qwen = {"rope_theta": 1000000.0, "use_sliding_window": False}
    if arch == "llama":
        return "LlamaConfig", {**common, "tie_word_embeddings": True, "rope_theta": 10000.0}
    if arch == "llama-mha":
        return "LlamaConfig", {
            **common,
            "num_key_value_heads": 4,
            "intermediate_size": 160,
            "tie_word_embeddings": False,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        }
    if arch == "qwen2":
        return "Qwen2Config", {**common, **qwen, "tie_word_embeddings": False}
    if arch == "qwen3":
        return "Qwen3Config", {
            **common, **qwen, "num_hidden_layers": 3, "head_dim": 32, "tie_word_embeddings": True}
    raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")


def _generation_config(arch: str) -> dict[str, Any]:
    """A realistic generation_config.json; qwen3 carries sampling defaults (do_sample true)."""
    if arch == "qwen3":
        # Like real Qwen checkpoints: two stop ids and sampling defaults. Greedy parity tests must
        # ask for greedy explicitly (temperature=0 / do_sample=False).
        return {
            "bos_token_id": BOS_ID,
            "eos_token_id": [EOS_ID, PAD_ID],
            "pad_token_id": PAD_ID,
            "do_sample": True,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 20,
        }
    if arch == "qwen2":
        return {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, PAD_ID], "pad_token_id": PAD_ID}
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


# Qwen2/Qwen3's pre-tokenizer split (transformers' Qwen2Tokenizer rebuilds exactly this pipeline
# from vocab + merges, ignoring tokenizer.json's, so the qwen archs must ship it to agree with HF).
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _tokenizer_style(arch: str) -> str:
    return "qwen" if arch.startswith("qwen") else "gpt2"


def _train_tokenizer(style: str) -> Any:
    """Train the byte-level BPE tokenizer (deterministic: fixed text, fixed trainer).

    style "gpt2": ByteLevel pre-tokenizer with its GPT-2 regex (Llama-3/SmolLM-like).
    style "qwen": NFC normalizer, Qwen regex split, then ByteLevel without regex (Qwen2/3-like).
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    if style == "qwen":
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif style == "gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = TRAINING_TEXT.splitlines(keepends=True)
    tokenizer.train_from_iterator(lines, trainer=trainer, length=len(lines))
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}")
    return tokenizer


def _tokenizer_config(arch: str) -> dict[str, Any]:
    added = {
        str(i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, tok in enumerate(SPECIAL_TOKENS)
    }
    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": "<|im_start|>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": MAX_POSITIONS,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    if arch != "qwen3":  # qwen3 keeps its template in chat_template.jinja instead
        config["chat_template"] = CHATML_TEMPLATE
    return config


def _param_std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """Return (mean, std) of the random init for one parameter, chosen by its name."""
    if name.endswith("norm.weight"):
        return 1.0, NORM_STD
    if name.endswith(".bias"):
        return 0.0, BIAS_STD
    if name.endswith("embed_tokens.weight"):
        return 0.0, EMBED_STD
    if name == "lm_head.weight":
        return 0.0, LM_HEAD_STD
    if len(shape) == 2:
        gain = (
            OUT_PROJ_GAIN if name.endswith(("o_proj.weight", "down_proj.weight")) else LINEAR_GAIN
        )
        return 0.0, gain / shape[1] ** 0.5
    raise ValueError(f"no init rule for parameter {name} {shape}")


def _init_weights(model: Any, seed: int, vocab_used: int) -> None:
    """Fill every parameter from its own generator seeded by (seed, name): order-independent."""

    def values(name: str, param: Any, noise: Any) -> Any:
        mean, std = _param_std(name, tuple(param.shape))
        out = noise * std + mean
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            out[vocab_used:] = 0.0  # padded ids: logit 0, far below the max of ~500 randoms
        return out

    init_parameters(model, seed, values)


def _legacy_rope_config(config_path: Path) -> None:
    """Rewrite config.json in the pre-v5 form real Llama-3.x checkpoints ship.

    transformers 5 saves ``rope_parameters`` (theta inside); Llama-3.1 on the hub has top-level
    ``rope_theta`` + ``rope_scaling`` and ``torch_dtype``. llama-mha uses the legacy spelling so the
    engine's config reader sees both forms.
    """
    data = json.loads(config_path.read_text(encoding="utf-8"))
    rope = dict(data.pop("rope_parameters"))
    data["rope_theta"] = rope.pop("rope_theta")
    data["rope_scaling"] = rope
    if "dtype" in data:
        data["torch_dtype"] = data.pop("dtype")
    write_json(config_path, data)


def build_tiny_model(arch: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of ``arch`` into ``out_dir`` (created); return its path.

    The same (arch, seed) gives byte-identical files.
    """
    import torch
    import transformers

    config_cls_name, kwargs = _arch_config_kwargs(arch)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(_tokenizer_style(arch))
    vocab_used = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_used > MODEL_VOCAB:
        raise RuntimeError(f"tokenizer has {vocab_used} tokens > model vocab {MODEL_VOCAB}")

    config = getattr(transformers, config_cls_name)(**kwargs)
    config.dtype = torch.float32
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_weights(model, seed, vocab_used)
    model.eval()
    model.generation_config = transformers.GenerationConfig(**_generation_config(arch))
    progress_was_on = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
    finally:
        if progress_was_on:
            transformers.utils.logging.enable_progress_bar()
    # save_pretrained writes the generation config with transformers' own extras; rewrite both
    # JSON files sorted so the bytes depend only on their content.
    write_json(out / "generation_config.json", _generation_config(arch))
    config_data = json.loads((out / "config.json").read_text(encoding="utf-8"))
    write_json(out / "config.json", config_data)
    if arch == "llama-mha":
        _legacy_rope_config(out / "config.json")

    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    write_json(out / "tokenizer_config.json", _tokenizer_config(arch))
    write_json(
        out / "special_tokens_map.json",
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    )
    if arch == "qwen3":
        (out / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")
    for path in out.iterdir():
        path.chmod(0o644)  # save_pretrained leaves some files 0600
    logger.info(
        "built tiny %s checkpoint (seed %d, vocab %d/%d) in %s",
        arch,
        seed,
        vocab_used,
        MODEL_VOCAB,
        out,
    )
    return out


def tiny_model_dir(
    arch: str,
    cache_root: str | Path | None = None,
    *,
    seed: int = 0,
    builder: Callable[..., Path] | None = None,
) -> Path:
    """Return a cached checkpoint dir for (arch, seed), building it once; safe under races.

    The key holds GENERATOR_VERSION and a hash of this file, of tools/tiny_checkpoint.py and of
    the transformers/tokenizers/torch versions, so editing the generator or upgrading them rebuilds.
    """
    _arch_config_kwargs(arch)  # validate early
    return cached_checkpoint(__file__, GENERATOR_VERSION, arch, seed, cache_root,
                             builder or build_tiny_model)


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, ARCHS, build_tiny_model, argv)


if __name__ == "__main__":
    raise SystemExit(main())
