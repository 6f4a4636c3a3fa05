"""Argument types for the benchmarks' flags: a count of 0 or -3 is refused by argparse, with the
flag named, rather than measuring nothing or failing deep inside a sweep."""
from __future__ import annotations

import argparse
import math


def at_least(low: float, kind: type = int, high: float | None = None, exclusive: bool = False):
    """An argparse `type`: a `kind` (int or float) in [low, high] (in (low, high] when `exclusive`)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        below = value <= low if exclusive else value < low
        if not math.isfinite(value) or below or (high is not None and value > high):
            wanted = (f"more than {low}" if exclusive else f"{low} or more") if high is None else f"{low}..{high}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {wanted}")
        return value
    return parse


COUNT = at_least(1)  # sessions, ticks, repeats
NON_NEGATIVE = at_least(0)  # warm-up calls
POSITIVE = at_least(0, float, exclusive=True)  # rates, durations, sizes
