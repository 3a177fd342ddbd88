"""Typed errors raised by the engine for bad user input (any process)."""

from __future__ import annotations


class FornaxError(Exception):
    """Base class of every error fornax raises on purpose."""


class ConfigError(FornaxError, ValueError):
    """An engine argument or model configuration is invalid."""


class ModelLoadError(FornaxError):
    """Model files are missing, unreadable or of an unsupported kind."""


class RequestError(FornaxError, ValueError):
    """A request (prompt or sampling parameters) is invalid; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestFailedError(FornaxError):
    """The engine failed a request while serving it (offline API; the server answers 4xx/5xx)."""
