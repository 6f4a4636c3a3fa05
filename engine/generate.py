"""`lockstep generate`: each input file is one session; at most max_sessions run at once, and a
finished session's slot goes to the next input at the next frame (continuous batching)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from engine.audio import AudioError, frames, read_audio, write_wav
from engine.config import SAMPLE_RATE, ConfigError, SamplingConfig
from engine.runner import ModelRunner
from engine.serving import EngineLoop
from engine.session import FrameOutput


@dataclass
class SessionResult:
    name: str
    text_tokens: list[int] = field(default_factory=list)
    audio_tokens: list[list[int]] = field(default_factory=list)
    pcm: list[np.ndarray] = field(default_factory=list)
    text: str = ""
    error: str | None = None


def session_seed(seed: int, name: str) -> int:
    """A per-input seed from the run's seed and the input's name, so an input draws the same noise
    whichever inputs run beside it or in which order they are given."""
    return (seed * 1_000_003 + zlib.crc32(os.fsencode(name))) % (2**63)


# Output names are kept well inside a file name's 255 bytes, with room for ".json".
MAX_NAME_BYTES = 200


def _path_hash(path: str) -> str:
    return f"{zlib.crc32(os.fsencode(path)):08x}"


def _bounded(name: str, path: str) -> str:
    if len(os.fsencode(name)) <= MAX_NAME_BYTES:
        return name
    while len(os.fsencode(name)) > MAX_NAME_BYTES - 9:
        name = name[:-1]
    return f"{name}-{_path_hash(path)}"


def output_names(paths: list[Path]) -> list[str]:
    """One output name per input, unique and independent of the inputs' order (a session's seed
    derives from it): the file's stem, or where two files share a stem, the stem and a hash of its
    absolute path; a file given again gets `-2`, `-3`, ... after that, skipping the other names."""
    where = [os.path.abspath(p) for p in paths]  # a file as named (a link is a file of its own)
    files: dict[str, set[str]] = {}
    for p, w in zip(paths, where):
        files.setdefault(p.stem, set()).add(w)
    base = {w: _bounded(p.stem if len(files[p.stem]) == 1 else f"{p.stem}-{_path_hash(w)}", w)
            for p, w in zip(paths, where)}
    owner: dict[str, str] = {}
    for w, name in base.items():
        if owner.setdefault(name, w) != w:
            raise ConfigError(f"inputs {owner[name]} and {w} would both write {name}.wav; rename one")
    seen: set[str] = set()
    out = []
    for w in where:
        name, k = base[w], 1
        while w in seen and name in owner:
            k += 1
            name = f"{base[w]}-{k}"
        owner[name] = w
        seen.add(w)
        out.append(name)
    return out


def plan_outputs(paths: list[Path], output_dir: Path) -> list[str]:
    """`output_names`, refusing a run whose outputs would overwrite one of its inputs."""
    names = output_names(paths)
    inputs = {os.path.realpath(p) for p in paths if p.exists()}
    for name in names:
        for ext in (".wav", ".json"):
            if os.path.realpath(output_dir / f"{name}{ext}") in inputs:
                raise ConfigError(f"--output-dir {output_dir}: {name}{ext} would overwrite an input; "
                                  "write the outputs elsewhere")
    return names


def run_sessions(runner: ModelRunner, inputs: dict[str, np.ndarray], sampling: dict[str, SamplingConfig],
                 progress: bool = False,
                 on_end: Callable[[SessionResult], None] | None = None) -> dict[str, SessionResult]:
    """Steps every input (name -> [F, frame_size] frames) to its end on the engine loop, unpaced;
    returns results by name, each also handed to `on_end` as soon as its session ends."""
    loop = EngineLoop(runner, max_buffer_frames=max((len(f) for f in inputs.values()), default=1),
                      max_waiting=None)
    results = {name: SessionResult(name) for name in inputs}

    def sink_for(res: SessionResult):
        def sink(event: FrameOutput | str) -> None:
            if isinstance(event, FrameOutput):
                res.text_tokens.append(event.text_token)
                res.audio_tokens.append(event.audio_tokens)
                res.pcm.append(event.pcm)
                return
            res.text = runner.tokenizer.decode(res.text_tokens)
            if on_end is not None:
                on_end(res)
        return sink

    for name, fr in inputs.items():
        session = loop.create_session(sampling[name], sink_for(results[name]), end_on_input_end=True)
        session.push(fr.reshape(-1))
        session.end_input()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(f) for f in inputs.values()), unit="frame", desc="generate")
    loop.run_offline(on_tick=(lambda plan: bar.update(len(plan.step))) if bar is not None else None)
    if bar is not None:
        bar.close()
    return results


def prepare_output_dir(output_dir: Path) -> None:
    """Makes the output folder, or says why it cannot be written, before any model is loaded."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir {output_dir} is a file; name a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--output-dir {output_dir}: cannot make it a folder ({e.strerror or e})") from e
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {output_dir}: not writable")


def generate(runner: ModelRunner, paths: list[Path], names: list[str], output_dir: Path,
             sampling: SamplingConfig) -> dict[str, SessionResult]:
    """Runs every input as a session, named as `plan_outputs` named it into `output_dir` (made by
    `prepare_output_dir`); each one's outputs are written as soon as it ends, so an interrupted run
    keeps the ones that finished."""
    inputs: dict[str, np.ndarray] = {}
    configs: dict[str, SamplingConfig] = {}
    failed: dict[str, SessionResult] = {}
    for path, name in zip(paths, names):
        try:
            inputs[name] = frames(read_audio(path, SAMPLE_RATE), runner.frame_size)
        except (AudioError, OSError) as e:
            print(f"lockstep generate: skipping {path}: {e}", file=sys.stderr)
            failed[name] = SessionResult(name, error=str(e))
            continue
        seed = sampling.seed
        configs[name] = dataclasses.replace(sampling, seed=None if seed is None else session_seed(seed, name))
    results = run_sessions(runner, inputs, configs, sys.stderr.isatty(),
                           on_end=lambda res: write_outputs(res, output_dir))
    return {**results, **failed}


def write_outputs(res: SessionResult, output_dir: Path) -> None:
    """A session's audio and tokens; one that cannot be written is reported and marked failed, the
    others still written."""
    pcm = np.concatenate(res.pcm) if res.pcm else np.zeros(0, dtype=np.float32)
    try:
        write_wav(output_dir / f"{res.name}.wav", pcm, SAMPLE_RATE)
        (output_dir / f"{res.name}.json").write_text(json.dumps(
            {"text": res.text, "text_tokens": res.text_tokens, "audio_tokens": res.audio_tokens}))
    except OSError as e:
        print(f"lockstep generate: cannot write {res.name}'s output into {output_dir}: {e}", file=sys.stderr)
        res.error = str(e)
