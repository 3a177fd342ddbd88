"""Test helper: the "thinker" model (the tiny llama with Qwen3's <think> and <tool_call> tokens
and a chat template that thinks and takes tools) and the flags that serve it with the hermes tool
parser and the qwen3 reasoning parser; shared by the tool-calling and reasoning tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx

from helpers.api_server import tiny_model_path

ADDED = ("<think>", "</think>", "<tool_call>", "</tool_call>")
TEMPLATE = """\
{%- if tools %}<|im_start|>system
Tools:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" %}<|im_start|>assistant
{% if message.reasoning_content %}<think>{{ message.reasoning_content }}</think>
{% endif %}{{ message.content or "" }}
{%- for call in message.tool_calls or [] %}<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"""
def thinker_model(root: Path) -> str:
    """The tiny llama with four more (non-special) tokens, as Qwen3 has them."""
    src = tiny_model_path("llama")
    dst = root / "thinker"
    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    next_id = max([*tok["model"]["vocab"].values(), *(t["id"] for t in tok["added_tokens"])]) + 1
    for i, text in enumerate(ADDED):
        tok["added_tokens"].append({"id": next_id + i, "content": text, "single_word": False,
                                    "lstrip": False, "rstrip": False, "normalized": False,
                                    "special": False})
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    (root / "template.jinja").write_text(TEMPLATE)
    return str(dst)


def thinker_args(root: Path) -> tuple[str, ...]:
    """`fornax serve` flags for thinker_model(root) (after it wrote root/template.jinja)."""
    return ("--max-model-len", "1024", "--seed", "0", "--dtype", "float32", "--chat-template",
            str(root / "template.jinja"), "--enable-auto-tool-choice",
            "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
            "--served-model-name", "thinker")


def end_think_id(http: httpx.Client) -> int:
    """The one token id of </think> (its logit bias makes a random model end its thinking)."""
    ids = http.post("/tokenize", json={"prompt": "</think>", "add_special_tokens": False})
    assert len(ids.json()["tokens"]) == 1
    return ids.json()["tokens"][0]
