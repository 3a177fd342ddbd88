"""Tokenizer front: a Rust `tokenizers` tokenizer plus the model's chat template (torch-free)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from fornax.runtime.errors import ModelLoadError, RequestError
from fornax.runtime.text.chat_template import render_chat


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class TokenizerFront:
    """Encode, decode and render chat prompts for one model folder."""

    def __init__(self, model_dir: str | Path, chat_template: str | None = None) -> None:
        path = Path(model_dir)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise ModelLoadError(f"{path} has no tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ModelLoadError(f"cannot read {tok_file}: {exc}") from exc
        # BERT-style tokenizer.json files carry fixed padding/truncation (e.g. 128 tokens) for
        # training; transformers ignores them unless asked, and so do we.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        cfg: dict[str, Any] = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.exists():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ModelLoadError(f"{cfg_file} is not valid JSON: {exc}") from exc
        self.config = cfg  # tokenizer_config.json as read (GET /tokenizer_info shows it)
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.pad_token = _token_text(cfg.get("pad_token"))
        self.unk_token = _token_text(cfg.get("unk_token"))
        self.model_max_length = cfg.get("model_max_length")
        self.chat_template = chat_template or self._find_template(path, cfg)
        # `fornax serve --default-chat-template-kwargs`: under every render's own kwargs
        self.default_template_kwargs: dict[str, Any] = {}
        self.special_ids = {tok.content: tid for tid, tok in
                            self.tokenizer.get_added_tokens_decoder().items() if tok.special}
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def _find_template(path: Path, cfg: dict[str, Any]) -> str | None:
        jinja_file = path / "chat_template.jinja"
        if jinja_file.exists():
            return jinja_file.read_text(encoding="utf-8")
        tmpl = cfg.get("chat_template")
        if isinstance(tmpl, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
            tmpl = named.get("default") or next(iter(named.values()), None)
        json_file = path / "chat_template.json"
        if tmpl is None and json_file.exists():
            tmpl = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
        return tmpl

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL (encode holds it): a huge prompt tokenized on a worker
        # thread then does not stall the API worker's event loop
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts,
                                                           add_special_tokens=add_special_tokens)]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict[str, Any]], *,
                            add_generation_prompt: bool = True,
                            continue_final_message: bool = False,
                            tools: list[dict[str, Any]] | None = None,
                            documents: list[dict[str, Any]] | None = None,
                            chat_template: str | None = None, content_format: str = "auto",
                            template_kwargs: dict[str, Any] | None = None) -> str:
        """Render the conversation; a model without a template cannot chat (RequestError)."""
        source = chat_template or self.chat_template
        if not source:
            raise RequestError(
                "this model has no chat template, so chat requests cannot be formatted; pass "
                "--chat-template or use the completions API", "messages")
        specials = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                      ("pad_token", self.pad_token), ("unk_token", self.unk_token))
                    if v is not None}
        return render_chat(source, messages, add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message, tools=tools,
                           documents=documents, content_format=content_format,
                           special_tokens=specials,
                           template_kwargs={**self.default_template_kwargs,
                                            **(template_kwargs or {})})

    def chat_prompt_ids(self, text: str) -> list[int]:
        """Token ids of a rendered chat prompt: the template already placed special tokens."""
        return self.encode(text, add_special_tokens=False)
