"""Argument types for the benchmarks' flags: a count of 0 or -3 is refused by argparse, with the
flag named, rather than measuring nothing or failing deep inside a sweep."""
from __future__ import annotations

import argparse
import math
import os


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


def shape(text: str) -> tuple[int, int]:
    """IN x OUT, e.g. 512x2048."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give IN x OUT as two positive integers, e.g. 512x2048")
    return int(parts[0]), int(parts[1])


def writable_prefix(text: str) -> str:
    """An output prefix whose folder can be made and written, checked before a sweep runs."""
    folder = os.path.dirname(text) or "."
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot make {folder}: {e.strerror or e}")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{folder} is not writable")
    return text


COUNT = at_least(1)  # sessions, ticks, repeats
NON_NEGATIVE = at_least(0)  # warm-up calls
POSITIVE = at_least(0, float, exclusive=True)  # rates, durations, sizes


def add_kv_flags(ap: argparse.ArgumentParser, default_page_size: int = 16) -> None:
    """`lockstep serve`'s KV pool flags, for the benchmarks that run the engine."""
    ap.add_argument("--kv-policy", default="reserve", choices=["reserve", "elastic"])
    ap.add_argument("--kv-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32", "fp8"])
    ap.add_argument("--kv-pages", type=NON_NEGATIVE, default=0, help="0: what the slots need, or memory holds")
    ap.add_argument("--kv-page-size", type=COUNT, default=default_page_size)
    ap.add_argument("--kv-min-seconds", type=at_least(0.01, float), default=60.0)


def kv_fields(args: argparse.Namespace) -> dict:
    """The EngineConfig fields `add_kv_flags` gave."""
    return {name: getattr(args, name) for name in ("kv_policy", "kv_dtype", "kv_pages", "kv_page_size",
                                                    "kv_min_seconds")}
