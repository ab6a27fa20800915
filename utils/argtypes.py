"""argparse types for numeric flags: a bad value stops at parse time with argparse's one-line message
(`script.py: error: argument --image_size: 0 is not a positive integer`), before any work."""
from __future__ import annotations

import argparse
import math


def _int(text: str, ok, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{value} is not {what}")
    return value


def _float(text: str, ok, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"{text} is not {what}")
    return value


def positive_int(text: str) -> int:
    return _int(text, lambda v: v > 0, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int(text, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _float(text, lambda v: v > 0, "a positive finite number")


def non_negative_float(text: str) -> float:
    return _float(text, lambda v: v >= 0, "a finite number >= 0")


def probability(text: str) -> float:
    return _float(text, lambda v: 0 <= v < 1, "in [0, 1)")
