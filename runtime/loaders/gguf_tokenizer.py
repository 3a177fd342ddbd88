"""Builds a `tokenizers` tokenizer + HF configs from GGUF metadata (engine core, model load)."""

from __future__ import annotations

import logging
import pathlib
from typing import Any, Protocol

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from fornax.runtime.errors import ModelLoadError

logger = logging.getLogger(__name__)


class GGUFMetadata(Protocol):
    """The metadata access `build_tokenizer` needs (gguf_loader's reader wrapper provides it)."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def strings(self, key: str) -> list[str] | None: ...


# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Split regexes by tokenizer.ggml.pre, as llama.cpp and transformers' GGUF loader use them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_BY_PRE = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"],
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2_SPLIT),
}
# llama.cpp splits each digit alone, then applies the GPT-2 regex, for these (= HF's
# Digits(individual_digits) + ByteLevel pre-tokenizers in the original tokenizer.json).
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_tokenizer(
    meta: GGUFMetadata, path: pathlib.Path, config: dict[str, Any]
) -> tuple[Tokenizer, dict[str, Any], dict[str, Any]]:
    """A `tokenizers.Tokenizer` plus tokenizer_config.json and generation_config.json contents.

    `config` is the model config built from the same file (token ids, context length).
    """
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.strings("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise ModelLoadError(f"{path}: the file carries no tokenizer (tokenizer.ggml.model/tokens)")
    token_types = list(meta.get("tokenizer.ggml.token_type") or [])
    merges = meta.strings("tokenizer.ggml.merges")

    if model == "gpt2":
        tokenizer, vocab = _byte_level_bpe(meta, tokens, merges)
        default_add_bos = False
    elif model == "llama":
        tokenizer, vocab = _sentencepiece_bpe(meta, tokens, merges, path)
        default_add_bos = True
    else:
        raise ModelLoadError(
            f"{path}: unsupported tokenizer type {model!r} (supported: 'gpt2', 'llama')"
        )

    def token_at(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is None or not 0 <= int(token_id) < len(tokens):
            return None
        return tokens[int(token_id)]

    named = {
        "bos_token": token_at("bos_token_id"),
        "eos_token": token_at("eos_token_id"),
        "unk_token": token_at("unknown_token_id"),
        "pad_token": token_at("padding_token_id"),
    }
    control = [tok for tok, kind in zip(tokens, token_types) if kind == _TOKEN_CONTROL]
    specials = [tok for tok in dict.fromkeys([*control, *named.values()]) if tok is not None]
    tokenizer.add_special_tokens(
        [AddedToken(tok, normalized=False, special=True) for tok in specials if tok in vocab]
    )
    user_defined = [
        AddedToken(tok, normalized=False, special=False)
        for tok, kind in zip(tokens, token_types)
        if kind == _TOKEN_USER_DEFINED and tok in vocab
    ]
    if user_defined:
        tokenizer.add_tokens(user_defined)

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = named["bos_token"], named["eos_token"]
    single, pair, template_specials = ["$A:0"], ["$A:0"], []
    if add_bos and bos is not None:
        single.insert(0, bos)
        template_specials.append((bos, vocab[bos]))
    if add_eos and eos is not None:
        single.append(eos)
        template_specials.append((eos, vocab[eos]))
    pair = [*single, *(x if x != "$A:0" else "$B:1" for x in single)]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(dict.fromkeys(template_specials))
    )

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: v for k, v in named.items() if v is not None},
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    chat_template = meta.get("tokenizer.chat_template")
    if isinstance(chat_template, str):
        tokenizer_config["chat_template"] = chat_template

    generation_config: dict[str, Any] = {}
    if "bos_token_id" in config:
        generation_config["bos_token_id"] = config["bos_token_id"]
    eos_ids = [
        int(v)
        for v in (meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom"))
        if v is not None
    ]
    eos_ids = list(dict.fromkeys(eos_ids))
    if eos_ids:
        generation_config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if "pad_token_id" in config:
        generation_config["pad_token_id"] = config["pad_token_id"]
    return tokenizer, tokenizer_config, generation_config


def _byte_level_bpe(
    meta: GGUFMetadata, tokens: list[str], merges: list[str] | None
) -> tuple[Tokenizer, dict[str, int]]:

    byte_chars = _bytes_to_unicode()
    alphabet = set(byte_chars.values())

    def spell(token: str) -> str:  # tokens stored as raw text are re-spelled in the byte alphabet
        if set(token) <= alphabet:
            return token
        return "".join(byte_chars[b] for b in token.encode("utf-8"))

    vocab = {spell(tok): i for i, tok in enumerate(tokens)}
    merge_pairs = [_merge_pair(m) for m in merges or []]
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merge_pairs,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _SPLIT_BY_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_BY_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _DIGITS_THEN_GPT2:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        if pre not in ("default", "gpt2", "gpt-2"):
            logger.warning("GGUF pre-tokenizer %r unknown; using the GPT-2 split", pre)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, vocab


def _sentencepiece_bpe(
    meta: GGUFMetadata, tokens: list[str], merges: list[str] | None, path: pathlib.Path
) -> tuple[Tokenizer, dict[str, int]]:

    vocab = {tok: i for i, tok in enumerate(tokens)}
    if merges:
        merge_pairs = [_merge_pair(m) for m in merges]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ModelLoadError(f"{path}: sentencepiece tokenizer without merges or scores")
        merge_pairs = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merge_pairs,
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer, vocab


def _merge_pair(merge: str) -> tuple[str, str]:
    """A GGUF merge line 'a b' -> ('a', 'b')."""
    first, sep, second = merge.partition(" ")
    if not sep:
        raise ModelLoadError(f"malformed BPE merge {merge!r} in the GGUF tokenizer")
    return first, second


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two known
    pieces, best token score first (as transformers' and tokenizers' converters do)."""
    found: list[tuple[str, str, float]] = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        found.extend(local)
    found.sort(key=lambda x: (x[2], len(x[0]), len(x[1])), reverse=True)
    return [(left, right) for left, right, _ in found]
