"""The models a many-model `fornax serve` runs: `--models` / a config file's `models:` list, or the
packaged trio when no MODEL is given (main process).

Each entry is a model with its own flags, named as on the command line (`model`, `dtype`,
`max_model_len`, `served_model_name`, `chat_template`, ...): the command line's engine flags apply
to every entry and an entry's own flags win. With neither a MODEL nor a `models:` list, `fornax
serve` runs SmolLM2 (chat), all-MiniLM-L6-v2 (embeddings) and Whisper tiny.en (speech) from one
port; the command line's engine flags then apply to the chat model, as before.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from dataclasses import dataclass
from typing import Any

from fornax.api.server.args import engine_kwargs
from fornax.runtime.errors import ConfigError
from fornax.runtime.limits import MAX_SERVED_MODELS

logger = logging.getLogger(__name__)

# the flags an entry may carry besides the engine flags (the rest are the server's)
_MODEL_FLAGS = frozenset({"model", "model_flag", "served_model_name", "chat_template",
                          "reasoning_parser", "tool_call_parser", "idle_timeout", "idle_action"})
EMBED_MODEL, EMBED_NAME = "sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"
SPEECH_MODEL, SPEECH_ALIAS = "whisper-tiny.en", "openai/whisper-tiny.en"


@dataclass
class ModelEntry:
    """One model of the server: what its engine gets and what it answers to."""

    model: str
    root: str
    served: list[str]
    aliases: list[str]
    kwargs: dict[str, Any]  # make_engine_config keyword arguments
    chat_template: str | None = None  # the flag's value (a file or the template)
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    idle_timeout: float = 0.0  # seconds without requests before it is unloaded (0: never)
    idle_action: str = "stop"  # what idle_timeout does: stop the engine, or put it to sleep


def model_entries(args: argparse.Namespace,
                  serve_parser: argparse.ArgumentParser) -> list[ModelEntry] | None:
    """The many-model server's entries; None for a one-model command line (served as always).
    ConfigError (exit 2) naming the entry and the flag for a bad one."""
    listed = getattr(args, "models", None)
    if listed:
        if args.model or args.model_flag:
            raise ConfigError("give either MODEL or --models (models: in --config), not both")
        entries = [_entry(i, item, args, serve_parser) for i, item in enumerate(listed)]
    elif args.model or args.model_flag:
        if args.max_loaded_models or args.idle_timeout or args.max_loaded_memory \
                or args.idle_action:
            raise ConfigError("--max-loaded-models, --max-loaded-memory, --idle-timeout and "
                              "--idle-action need several models (--models, or models: in "
                              "--config)")
        return None
    else:
        entries = packaged_trio(args)
    if len(entries) > MAX_SERVED_MODELS:
        raise ConfigError(f"--models: at most {MAX_SERVED_MODELS} models, got {len(entries)}")
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        for name in entry.served:
            if name in seen:
                raise ConfigError(f"models[{i}]: the name {name!r} is already models[{seen[name]}]"
                                  "'s; give it another served_model_name")
            seen[name] = i
    return entries


def _entry(index: int, item: str, args: argparse.Namespace,
           serve_parser: argparse.ArgumentParser) -> ModelEntry:
    """One `--models` word: a model (folder, .gguf, packaged name, hub id), or a JSON object of
    flags with `model` (a config file's `models:` entries arrive as such objects)."""
    where = f"models[{index}]"
    if item.lstrip().startswith("{"):
        try:
            flags = json.loads(item)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not a JSON object ({exc})") from None
        if not isinstance(flags, dict):
            raise ConfigError(f"{where}: a model or a mapping of its flags is expected")
    else:
        flags = {"model": item}
    model = flags.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}: `model` (a folder, .gguf file, packaged name or hub id) is "
                          "required")
    words = [model]
    options = serve_parser._option_string_actions
    for raw_key, value in flags.items():
        key = str(raw_key).lstrip("-").replace("_", "-")
        if key == "model" or value is None:
            continue
        action = options.get(f"--{key}")
        if action is None:
            raise ConfigError(f"{where}.{raw_key}: unknown flag")
        if action.dest not in _MODEL_FLAGS and action.dest not in _engine_dests():
            raise ConfigError(f"{where}.{raw_key}: a server flag; give it once, outside models")
        words += _words(f"--{key}", value, action, f"{where}.{raw_key}")
    try:
        ns = serve_parser.parse_args(words)
    except SystemExit:  # argparse printed what it refused
        raise ConfigError(f"{where} ({model}): a flag above was refused") from None
    from fornax.api.routes.chat_features import check_chat_flags

    problem = check_chat_flags(ns)  # the entry's own tool and reasoning parsers exist
    if problem:
        raise ConfigError(f"{where} ({model}): {problem}")
    served = list(ns.served_model_name or [model])
    kwargs = {**engine_kwargs(args), **engine_kwargs(ns)}
    idle = ns.idle_timeout if ns.idle_timeout is not None else args.idle_timeout
    return ModelEntry(model, model, served, [n for n in [model] if n not in served], kwargs,
                      ns.chat_template or args.chat_template, ns.reasoning_parser,
                      ns.tool_call_parser, idle or 0.0,
                      ns.idle_action or args.idle_action or "stop")


def _engine_dests() -> frozenset[str]:
    from fornax.api.server.args import _ENGINE_DESTS

    return frozenset(_ENGINE_DESTS)


def _words(flag: str, value: Any, action: argparse.Action, where: str) -> list[str]:
    """An entry's flag and value as command-line words."""
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: true or false expected, got {value!r}")
        return [flag] if value else []
    if isinstance(value, list) and action.nargs in ("+", "*"):
        return [flag, *(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)]
    if isinstance(value, (dict, list)):
        return [flag, json.dumps(value)]
    return [flag, str(value).lower() if isinstance(value, bool) else str(value)]


def packaged_trio(args: argparse.Namespace) -> list[ModelEntry]:
    """SmolLM2 chat (the command line's engine flags), all-MiniLM-L6-v2 embeddings and Whisper
    tiny.en; a missing embedding or speech package is skipped with a warning naming its install
    command (a missing SmolLM2 is the usual start-up error)."""
    from fornax.runtime.loaders.default_model import DEFAULT_MODEL_NAME, default_model_path
    from fornax.runtime.loaders.packaged_models import INSTALL_HINTS, PACKAGED_MODELS
    from fornax.runtime.loaders.speech_models import PACKAGED_SPEECH_MODELS

    chat = str(default_model_path())
    served = list(args.served_model_name or [DEFAULT_MODEL_NAME])
    entries = [ModelEntry(chat, chat, served, [chat], engine_kwargs(args), args.chat_template,
                          args.reasoning_parser, args.tool_call_parser)]
    package = PACKAGED_MODELS[EMBED_MODEL][0]
    if importlib.util.find_spec(package) is not None:
        entries.append(ModelEntry(EMBED_MODEL, EMBED_MODEL, [EMBED_NAME], [EMBED_MODEL], {}))
    else:
        logger.warning("not serving %s: its package is not installed (%s)", EMBED_NAME,
                       INSTALL_HINTS[package])
    speech = PACKAGED_SPEECH_MODELS[SPEECH_MODEL]
    if all(importlib.util.find_spec(p) is not None for p, _ in speech.parts):
        entries.append(ModelEntry(SPEECH_MODEL, SPEECH_MODEL, [SPEECH_MODEL],
                                  [SPEECH_ALIAS, "tiny.en"], {}))
    else:
        logger.warning("not serving %s: its package is not installed (%s)", SPEECH_MODEL,
                       speech.install)
    for entry in entries:
        entry.idle_timeout = args.idle_timeout or 0.0
        entry.idle_action = args.idle_action or "stop"
    return entries
