"""Synthetic speech-like inputs for `lockstep bench fidelity` where no recordings are at hand, so that
its figures can be reproduced from the repository alone (bench/RESULTS.md, bench/gpu_checks.sh).

    python -m bench.fidelity_inputs DIR [--count 7] [--seconds 8]

Each input is 24 kHz mono: a voiced tone with a wandering pitch and its second harmonic, under a
syllable-rate envelope, with breath noise; input i is drawn from its own seed, so a longer --count
keeps the first inputs as they were.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.args import COUNT, POSITIVE
from engine.audio import write_wav

RATE = 24000


def speech_like(index: int, seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + index)
    t = np.arange(int(RATE * seconds)) / RATE
    f0 = 100 + 40 * (index % 5) + 60 * np.sin(2 * np.pi * (0.3 + 0.2 * rng.random()) * t + rng.random() * 6)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * (3 + 2 * rng.random()) * t) ** 2
    voiced = 0.25 * np.sin(phase) + 0.1 * np.sin(2 * phase)
    return (envelope * voiced + 0.03 * (1 + index % 3) * rng.standard_normal(t.size)).astype(np.float32)


def write_inputs(folder: Path, count: int = 7, seconds: float = 8.0, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"speech-{i}.wav"
        write_wav(path, np.clip(speech_like(i, seconds, seed), -1, 1), RATE)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fidelity_inputs", description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--count", type=COUNT, default=7)
    ap.add_argument("--seconds", type=POSITIVE, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for path in write_inputs(Path(args.folder), args.count, args.seconds, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
