"""Argument types for the jobs' command lines: a value out of range is argparse's one-line
error (exit 2) naming the option and the value, before any work starts."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(kind: type, text: str) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def at_least(low: int | float, kind: type = int) -> Callable[[str], int | float]:
    """An int (or ``kind``) >= ``low``."""

    def parse(text: str) -> int | float:
        value = _number(kind, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} >= {low}"
    return parse


def positive(kind: type = float) -> Callable[[str], int | float]:
    """A ``kind`` > 0 (and finite)."""

    def parse(text: str) -> int | float:
        value = _number(kind, text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def workers(text: str) -> int | list[int]:
    """``N`` (a fixed number of workers, >= 1) or ``MIN-MAX`` (an elastic range, 1 <= MIN <=
    MAX): the int, or the list ``[MIN, MAX]`` that ``scaling.num_workers`` takes."""
    low, dash, high = text.strip().partition("-")
    if not dash:
        return int(at_least(1)(text))
    try:
        pair = [int(low), int(high)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected N or MIN-MAX (whole numbers), got {text!r}"
        ) from None
    if pair[0] < 1 or pair[0] > pair[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text}")
    return pair


workers.__name__ = "N or MIN-MAX"
