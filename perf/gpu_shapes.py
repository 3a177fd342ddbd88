"""Built-in model shapes for `--load-format dummy` benchmarks without a model hub (CLI process).

A shape folder holds the real architecture's config.json and the tiny test tokenizer (token ids
are random in benchmarks, so only the vocabulary's upper bound matters). Random weights of the
real shape give real timings: `fornax bench decode-floor --shape llama-3.1-8b`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from fornax.runtime.loaders.cache_folders import cache_root

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE, "tie_word_embeddings": False, "hidden_act": "silu",
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    },
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "bfloat16",
        "attention_bias": False, "use_sliding_window": False, "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # CPU smoke tests of the benchmarks themselves
    "tiny": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "hidden_act": "silu", "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
    },
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def shape_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """The folder for shape `name` (written on first use under $FORNAX_CACHE/shapes)."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    out = cache_root(root) / "shapes" / name
    config = out / "config.json"
    if config.exists() and json.loads(config.read_text(encoding="utf-8")) == SHAPES[name]:
        return out
    tokenizer_src = _tiny_model_dir()("llama")
    out.mkdir(parents=True, exist_ok=True)
    for fname in _TOKENIZER_FILES:
        shutil.copy(tokenizer_src / fname, out / fname)
    config.write_text(json.dumps(SHAPES[name], indent=2), encoding="utf-8")
    return out


def _tiny_model_dir() -> Any:
    """tools/make_tiny_model.py's builder (the repo's tiny tokenizer); `tools` is a folder of the
    checkout, not of the installed package, so run the benches from the repo root."""
    import sys

    try:
        from tools.make_tiny_model import tiny_model_dir
    except ImportError:
        root = Path.cwd()
        if not (root / "tools" / "make_tiny_model.py").exists():
            raise SystemExit("built-in shapes need the repo's tools/ folder: run from the repo "
                             "root, or pass --model DIR") from None
        sys.path.insert(0, str(root))
        from tools.make_tiny_model import tiny_model_dir
    return tiny_model_dir


def weight_bytes_read_per_step(model: Any) -> int:
    """Bytes of weights one decode step reads: every parameter once, except an untied input
    embedding, of which a step reads only its batch's rows."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    if head is None or head.data_ptr() != embed.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total
