"""argparse types shared by the benchmark scripts: a bad number is a one-line usage error naming the option."""

from __future__ import annotations

import argparse


def _number(kind: type, text: str, minimum: float, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (a count of steps, repeats, sequences, tokens)."""
    return _number(int, text, 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    """An integer >= 0 (a count that may be zero, e.g. warm-up steps)."""
    return _number(int, text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """A number > 0 (a time budget)."""
    value = _number(float, text, 0.0, "a number > 0")
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
    return value
