"""argparse value types shared by the command lines (`fornax serve`, `fornax bench`); any process."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """A whole number of at least 1; argparse's exit 2 naming the flag otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value
