"""argparse types shared by the benchmark scripts: a bad number, file or device is a one-line usage error."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


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


def random_seed(text: str) -> int:
    """A seed the trainer takes too: 0 <= seed < 2**32 (numpy's range, as `--seed` of train_accelerate.py)."""
    value = _number(int, text, 0, f"an integer from 0 to {2**32 - 1}")
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer from 0 to {2**32 - 1}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a time budget: nan compared false with every elapsed time, so no budget stopped a run)."""
    value = _number(float, text, 0.0, "a finite number > 0")
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0")
    return value


def text_file(text: str) -> Path:
    """A file that exists (a corpus to read)."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: no such file; pass a UTF-8 text file")
    return path


def torch_device(text: str) -> str:
    """A torch device this machine has (`cpu`, `cuda`, `cuda:1`, ...), as given."""
    import torch  # only the scripts that take a device pay for the import here

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cpu":
        return text
    backend = getattr(torch, device.type, None)
    if backend is None or not backend.is_available() or (device.index or 0) >= backend.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no such device; use cpu")
    return text
