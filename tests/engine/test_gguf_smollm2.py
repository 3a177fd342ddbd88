"""The packaged SmolLM2 GGUF, prepared by fornax, against transformers' own GGUF loader."""

from __future__ import annotations

import json
import random
import time
import unicodedata

import pytest
import torch
import transformers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors.torch import load_file
from tokenizers import Tokenizer, pre_tokenizers

from fornax.runtime.loaders.gguf_loader import prepare_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(packaged_gguf, tmp_path_factory):
    cache = tmp_path_factory.mktemp("fornax_cache")
    t0 = time.perf_counter()
    folder = prepare_gguf(packaged_gguf, cache)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = prepare_gguf(packaged_gguf, cache)
    state_dict = load_file(again / "model.safetensors")
    cached = time.perf_counter() - t0
    print(f"\nSmolLM2 prepare: first {first:.2f} s, cached prepare+load_file {cached:.3f} s")
    assert again == folder
    return {"folder": folder, "first_s": first, "cached_s": cached, "state_dict": state_dict}


@pytest.fixture(scope="module")
def hf_tokenizer(packaged_gguf):
    return transformers.AutoTokenizer.from_pretrained(
        str(packaged_gguf.parent), gguf_file=packaged_gguf.name
    )


def test_cached_prepare_is_fast(prepared):
    assert prepared["cached_s"] < 2.0, prepared


def test_weights_equal_transformers_gguf_loader(prepared, packaged_gguf):
    cfg = json.loads((prepared["folder"] / "config.json").read_text())
    expected = {  # MODELS.md
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "architectures": ["LlamaForCausalLM"],
    }
    assert {k: cfg[k] for k in expected} == expected
    # Passing our config skips transformers' second GGUF metadata parse (~10 s); the weights (and
    # the Q/K head counts it de-permutes with) still come from its own reading of the GGUF file.
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(packaged_gguf.parent),
        gguf_file=packaged_gguf.name,
        config=transformers.AutoConfig.from_pretrained(prepared["folder"]),
        dtype=torch.float32,
    )
    ref_sd = reference.state_dict()
    ours = prepared["state_dict"]
    assert set(ours) == set(ref_sd) - {"lm_head.weight"}  # tied: no separate lm_head
    assert torch.equal(ref_sd["lm_head.weight"], ours["model.embed_tokens.weight"])
    for name, value in ours.items():
        assert value.dtype == torch.float32 and torch.equal(value, ref_sd[name]), name


def _strings() -> list[str]:
    hand = [
        "",
        " ",
        "  ",
        "\n",
        "\n\n\n",
        "\t\t",
        " \n \n",
        "Hello, world!",
        "hello world",
        " Hello",
        "What is the capital of France?",
        "The year 2024 had 366 days; 3.14159 ≈ π.",
        "1234567890",
        " 1 22 333 4444",
        "x1y2z3",
        "½ ² ³ ⅓ ٣ ५",
        "I'm you're he's we'll they'd",
        "can't won't DON'T",
        "café naïve résumé Ångström",
        "Привет, мир!",
        "Γειά σου κόσμε",
        "中文分词测试。",
        "東京タワーは高い",
        "한국어 텍스트",
        "مرحبا بالعالم",
        "שלום עולם",
        "हिन्दी पाठ",
        "emoji 🙂🚀👍🏽 👨‍👩‍👧‍👦 🇫🇷",
        "tabs\tand\ttabs",
        "trailing spaces   ",
        "   leading spaces",
        "line1\r\nline2\rline3",
        "def f(x):\n    return x ** 2  # square\n",
        "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }",
        '<div class="a">&amp;</div>',
        "SELECT * FROM users WHERE id = 42;",
        '{"key": [1, 2.5, null, true]}',
        "https://example.com/path?q=1&r=two#frag",
        "user@example.com",
        "$100.00 + €50 = ¥?",
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
        "a<|im_end|>b",
        "<|endoftext|>",
        "text <|im_start|> inside",
        "<|im_start|><|im_end|><|endoftext|>",
        "<|im_start",
        "|im_end|>",
        "<repo_name>fornax<file_sep>main.py",
        "    indented\n        more\n",
        "~!@#$%^&*()_+-=[]{}|;':,./<>?",
        "\u00a0non-breaking\u2009thin\u200bzero-width",
        "A" * 300,
        "ab " * 100,
        "\\n literal \\t",
        "mixed中English文字123混合",
        "ﬁ ligature Ｆｕｌｌｗｉｄｔｈ",
        "\x00\x01 control \x7f",
    ]
    rng = random.Random(1234)
    alphabet = (
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        + list(" \t\n.,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`")
        + list("éüñçøßæœ抱歉你好世界日本語한글ЖжЩщ€£¥©®™°±×÷αβγδπΩ")
        + ["🙂", "🚀", "👍🏽", "🇫🇷", "\u200d", "\u00a0", "  ", "\n\n", "<|im_start|>", "<|im_end|>"]
    )
    words = [
        "the",
        "The",
        " of",
        "and",
        "capital",
        "Paris",
        "France",
        "tokenizer",
        "GGUF",
        "2024",
        "don't",
        "it's",
        "x",
        "==",
        "->",
        "::",
        "    ",
        "\n",
    ]
    generated = []
    for _ in range(300):
        n = rng.randint(1, 40)
        pool = alphabet if rng.random() < 0.5 else words + alphabet
        generated.append("".join(rng.choice(pool) for _ in range(n)))
        if rng.random() < 0.3:
            generated[-1] = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
    return hand + generated


def _splits_may_differ(text: str) -> bool:
    """Where splitting numerals first can change the result: a non-ASCII numeral anywhere, or a
    numeral right after whitespace (`"\\n\\n7"`: GPT-2's regex alone gives `\\n`,`\\n7`)."""
    numeral = [unicodedata.category(c).startswith("N") for c in text]
    return any(n and ord(c) > 127 for c, n in zip(text, numeral)) or any(
        numeral[i + 1] and text[i].isspace() for i in range(len(text) - 1)
    )


def test_tokenizer_parity(prepared, hf_tokenizer):
    """Same ids and text as transformers' GGUF tokenizer, with one deliberate difference.

    The file says `tokenizer.ggml.pre = smollm`: llama.cpp (and SmolLM2's original tokenizer.json,
    Digits(individual_digits) + ByteLevel) split every numeral alone (`\\p{N}`) before the GPT-2
    regex. transformers' GGUF tokenizer ignores that key and uses the GPT-2 regex alone. Both give
    the same ids unless whitespace precedes a numeral or a numeral is non-ASCII (the vocabulary has
    no multi-digit or space+digit tokens). fornax follows llama.cpp / the original: every string is
    compared with transformers' tokenizer with the original pre-tokenizer put back, and every
    string outside those cases with transformers' GGUF tokenizer as it is.
    """
    ours = Tokenizer.from_file(str(prepared["folder"] / "tokenizer.json"))
    original = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    strings = _strings()
    assert len(strings) >= 300
    num_deviations = 0
    for text in strings:
        ids = ours.encode(text).ids
        assert ids == original.encode(text).ids, repr(text)
        if _splits_may_differ(text):
            num_deviations += ids != hf_tokenizer.encode(text)
        else:
            assert ids == hf_tokenizer.encode(text), repr(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
                ids, skip_special_tokens=skip
            ), repr(text)
    assert num_deviations >= 1  # the case above is really exercised
    assert ours.encode("<|im_start|>user").ids[0] == 1  # special token kept whole
    assert ours.get_vocab_size() == hf_tokenizer.vocab_size == 49152
    tc = json.loads((prepared["folder"] / "tokenizer_config.json").read_text())
    assert tc["bos_token"] == hf_tokenizer.bos_token == "<|im_start|>"
    assert tc["eos_token"] == hf_tokenizer.eos_token == "<|im_end|>"
    assert tc["add_bos_token"] is False


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Count: 1, 2, 3 🙂\nnext line"},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_renders_like_transformers(prepared, hf_tokenizer, generation_prompt):
    template = json.loads((prepared["folder"] / "tokenizer_config.json").read_text())[
        "chat_template"
    ]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    compiled = env.from_string(template)
    for messages in CONVERSATIONS:
        ours = compiled.render(
            messages=messages,
            add_generation_prompt=generation_prompt,
            **hf_tokenizer.special_tokens_map,
        )
        ref = hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        assert ours == ref


def test_greedy_generation_mentions_paris(prepared):
    folder = prepared["folder"]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = torch.tensor([Tokenizer.from_file(str(folder / "tokenizer.json")).encode(prompt).ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text
