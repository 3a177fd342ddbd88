"""One clean log format for every fornax serve process: main, engine core, API workers."""

from __future__ import annotations

import logging
import logging.config
from typing import Any

from fornax.runtime import env

LOG_FORMAT = "%(levelname)s %(asctime)s [%(processName)s %(name)s] %(message)s"
DATE_FORMAT = "%m-%d %H:%M:%S"


def log_level() -> str:
    """The level from FORNAX_LOG_LEVEL (default INFO)."""
    return env.LOG_LEVEL.get().upper()


def logging_dictconfig() -> dict[str, Any]:
    """A dictConfig for fornax's and Granian's loggers, all to stderr in one format."""
    level = log_level()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "generic": {"()": "logging.Formatter", "fmt": LOG_FORMAT, "datefmt": DATE_FORMAT},
            "access": {"()": "logging.Formatter", "fmt": "%(message)s"},
        },
        "handlers": {
            "console": {"formatter": "generic", "class": "logging.StreamHandler",
                        "stream": "ext://sys.stderr"},
            "access": {"formatter": "access", "class": "logging.StreamHandler",
                       "stream": "ext://sys.stderr"},
        },
        "loggers": {
            "fornax": {"handlers": ["console"], "level": level, "propagate": False},
            "_granian": {"handlers": ["console"], "level": level, "propagate": False},
            "granian.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }


def setup_logging(process_name: str | None = None) -> None:
    """Configure logging for this process (call once at its start)."""
    if process_name:
        import multiprocessing

        multiprocessing.current_process().name = process_name
    logging.config.dictConfig(logging_dictconfig())
