"""The tool-parser registry: built-in parsers by name, and plugins (`--tool-parser-plugin FILE`)
that register their own (API workers and `fornax serve` at start).

A plugin is a Python file that defines a ToolParser subclass and registers it::

    from fornax.api.tools.base import ToolParse, ToolParser
    from fornax.api.tools.registry import register_tool_parser

    @register_tool_parser("my_format")
    class MyParser(ToolParser):
        def parse(self, text, final):
            ...
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fornax.api.tools.base import ToolParser

logger = logging.getLogger(__name__)

_PARSERS: dict[str, type[ToolParser]] = {}
_BUILTIN_MODULES = ("hermes", "llama3_json", "mistral", "pythonic", "qwen3_xml")
P = TypeVar("P", bound=type[ToolParser])


class ToolParserError(Exception):
    """An unknown parser name or a plugin that cannot be loaded."""


def register_tool_parser(name: str) -> Callable[[P], P]:
    """Class decorator: make a ToolParser subclass available as `--tool-call-parser NAME`."""

    def register(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, ToolParser)):
            raise TypeError(f"{cls!r} is not a ToolParser subclass")
        cls.name = name
        _PARSERS[name] = cls
        return cls

    return register


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"fornax.api.tools.{module}")


def tool_parser_names() -> list[str]:
    _load_builtins()
    return sorted(_PARSERS)


def get_tool_parser(name: str) -> type[ToolParser]:
    _load_builtins()
    cls = _PARSERS.get(name)
    if cls is None:
        raise ToolParserError(f"unknown tool-call parser {name!r}; available: "
                              f"{', '.join(sorted(_PARSERS))} (or add one with "
                              "--tool-parser-plugin)")
    return cls


def load_tool_parser_plugin(path: str) -> None:
    """Run a plugin file once per process (it registers its parsers when imported)."""
    file = Path(path).expanduser().resolve()
    module_name = f"fornax_tool_parser_plugin_{abs(hash(str(file)))}"
    if module_name in sys.modules:
        return
    if not file.is_file():
        raise ToolParserError(f"--tool-parser-plugin {path}: no such file")
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ToolParserError(f"--tool-parser-plugin {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ToolParserError(f"--tool-parser-plugin {path} failed to load: "
                              f"{type(exc).__name__}: {exc}") from exc
    logger.info("loaded tool-parser plugin %s", file)
