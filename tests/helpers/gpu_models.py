"""GPU-shaped tiny checkpoints for the `gpu` tests: the tiny models' tokenizers, head_dim 128.

The CPU tiny models use head dims 16/32, which FlashInfer's kernels do not serve (the engine falls
back to torch_ref there); these variants keep the tiny vocabulary and depth but use real head
dims, so the GPU tests exercise FlashInfer, torch.compile and CUDA graphs end to end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SHAPES = {
    # arch -> config overrides (hidden = heads x head_dim for Llama, free for Qwen3)
    "llama": {"hidden_size": 512, "num_attention_heads": 4, "num_key_value_heads": 1,
              "head_dim": 128, "intermediate_size": 1024, "num_hidden_layers": 2},
    "qwen3": {"hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2,
              "head_dim": 128, "intermediate_size": 512, "num_hidden_layers": 2},
}
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "generation_config.json", "chat_template.jinja")


def gpu_shaped_checkpoint(tiny_dir: Path, arch: str, out_dir: Path, seed: int = 0) -> Path:
    """Write `arch`'s tiny checkpoint reshaped to SHAPES[arch] into out_dir (once)."""
    if (out_dir / "config.json").exists():
        return out_dir
    import torch
    import transformers
    from tokenizers import Tokenizer

    from tools.make_tiny_model import _init_weights

    base = transformers.AutoConfig.from_pretrained(str(tiny_dir))
    data = base.to_dict()
    data.update(SHAPES[arch])
    if data.get("layer_types"):
        data["layer_types"] = ["full_attention"] * data["num_hidden_layers"]
    config = type(base).from_dict(data)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    vocab_used = Tokenizer.from_file(str(tiny_dir / "tokenizer.json")).get_vocab_size(
        with_added_tokens=True)
    _init_weights(model, seed, vocab_used)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for name in _COPIED:
        if (tiny_dir / name).exists():
            shutil.copy(tiny_dir / name, out_dir / name)
    data = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    data["head_dim"] = SHAPES[arch]["head_dim"]
    (out_dir / "config.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    return out_dir
